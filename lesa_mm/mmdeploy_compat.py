"""MMDeploy 1.3 under torch >= 2.9, and LESA's export settings.

MMDeploy 1.3.1 (the latest release) fails on every detector under recent
torch, for two reasons inside MMDeploy:

* torch >= 2.9 exports with ``dynamo=True`` unless told otherwise, and
  ``mmdeploy.apis.onnx.export`` passes ``dynamic_axes`` only, the
  TorchScript exporter's argument;
* ``mmdeploy.mmcv.ops.roi_align`` imports ``_cast_Long`` from
  ``torch.onnx.symbolic_opset9``, which torch no longer has.

:func:`apply` fixes both in the running process (never in
site-packages): while :func:`legacy_onnx_export` is active (it wraps MMDeploy's
own ``export``), ``torch.onnx.export`` defaults to ``dynamo=False``, and
``_cast_Long`` is provided as the ONNX ``Cast`` to int64 it was.
``tools/deployment/mmdeploy_compat.py`` runs any MMDeploy script (its
``tools/deploy.py``, say) with them applied.

:func:`check_lesa_opset` refuses opsets below :data:`MIN_OPSET` for models
with LESA layers: below 14 the TorchScript exporter has no
``scaled_dot_product_attention``, and below 16 MMDeploy replaces
``RoiAlign`` by a workaround that changes masks on degenerate boxes, so the
exported detector would not compute what the model computes.
"""
import contextlib
import functools
import importlib

import torch

#: The lowest ONNX opset at which a LESA detector exports exactly through
#: MMDeploy (ONNX ``RoiAlign`` with ``coordinate_transformation_mode``).
MIN_OPSET = 16

_applied = False


def _cast_long(g, input, non_blocking=False):
    """``torch.onnx.symbolic_opset9._cast_Long`` of torch < 2.9: a cast to
    int64 (ONNX ``TensorProto.INT64`` = 7)."""
    return g.op('Cast', input, to_i=7)


@contextlib.contextmanager
def legacy_onnx_export():
    """``torch.onnx.export`` defaults to the TorchScript exporter
    (``dynamo=False``) inside the block."""
    export = torch.onnx.export

    @functools.wraps(export)
    def torchscript_export(*args, **kwargs):
        kwargs.setdefault('dynamo', False)
        return export(*args, **kwargs)

    torch.onnx.export = torchscript_export
    try:
        yield
    finally:
        torch.onnx.export = export


def apply():
    """Make MMDeploy 1.3 export under this torch (idempotent)."""
    global _applied
    if _applied:
        return
    # the package attribute mmdeploy.apis.torch2onnx imports the function
    # by (it shadows the submodule of the same name)
    onnx_apis = importlib.import_module('mmdeploy.apis.onnx')
    # after importing MMDeploy, which replaces torch's symbolic modules
    symbolic_opset9 = importlib.import_module('torch.onnx.symbolic_opset9')
    if not hasattr(symbolic_opset9, '_cast_Long'):
        symbolic_opset9._cast_Long = _cast_long
    mmdeploy_export = onnx_apis.export

    @functools.wraps(mmdeploy_export)
    def export(*args, **kwargs):
        with legacy_onnx_export():
            return mmdeploy_export(*args, **kwargs)

    onnx_apis.export = export
    _applied = True


def check_lesa_opset(deploy_cfg, build_model):
    """Raise a ValueError if the deploy config's ONNX opset is below
    :data:`MIN_OPSET` and the model (``build_model()``, called only then)
    has LESA layers."""
    from lesa_mm.models import LESA
    opset = deploy_cfg.get('onnx_config', {}).get('opset_version', 11)
    if opset >= MIN_OPSET:
        return
    if any(isinstance(m, LESA) for m in build_model().modules()):
        raise ValueError(
            f'a LESA model exports exactly through MMDeploy from ONNX opset '
            f'{MIN_OPSET} (scaled_dot_product_attention needs 14, MMDeploy\'s '
            f'RoiAlign below 16 changes masks on degenerate boxes); the '
            f'deploy config sets onnx_config.opset_version={opset}: use '
            f'configs/deploy/ or set opset_version>={MIN_OPSET}')


def _load(deploy_cfg, model_cfg):
    from mmdeploy.utils import load_config
    return load_config(deploy_cfg, model_cfg)


def export(deploy_cfg, model_cfg, checkpoint, image, work_dir):
    """MMDeploy's ``torch2onnx`` with :func:`apply` and
    :func:`check_lesa_opset`; returns the path of the ONNX file.

    Args:
        deploy_cfg, model_cfg (str | Config): MMDeploy's deploy config and
            the model's config.
        checkpoint (str): The model's checkpoint.
        image (str): An image the export traces with (resized as the
            deploy config's ``input_shape`` or the model's test pipeline
            says).
        work_dir (str): Where the ONNX file is written.
    """
    import os.path as osp

    from mmdeploy.apis import torch2onnx
    from mmdeploy.apis.utils import build_task_processor
    apply()
    deploy_cfg, model_cfg = _load(deploy_cfg, model_cfg)
    check_lesa_opset(deploy_cfg, lambda: build_task_processor(
        model_cfg, deploy_cfg, 'cpu').build_pytorch_model(checkpoint))
    save_file = deploy_cfg.onnx_config.save_file
    torch2onnx(image, work_dir, save_file, deploy_cfg, model_cfg, checkpoint,
               device='cpu')
    return osp.join(work_dir, save_file)


@torch.no_grad()
def compare_with_onnxruntime(deploy_cfg, model_cfg, checkpoint, onnx_file,
                             image, input_shapes=(None, )):
    """Run the exported detector in ONNX Runtime and the same deploy graph
    (the model with MMDeploy's rewrites, as it was exported) in PyTorch on
    ``image`` resized to each of ``input_shapes`` (``(width, height)``, or
    None for the model's test pipeline); the model and the ONNX Runtime
    session are built once.

    Returns:
        list[dict]: One per input shape: ``size`` (h, w), ``detections``,
        the largest absolute differences of the ``boxes`` (pixels),
        ``scores`` and ``masks`` (probabilities), whether the ``labels``
        agree, and the times of one run (after a first one) of the model's
        own inference in PyTorch (``torch_s``) and of the export in ONNX
        Runtime (``ort_s``).
    """
    import time

    import onnxruntime as ort
    from mmdeploy.apis.utils import build_task_processor
    from mmdeploy.core import RewriterContext, patch_model
    from mmdeploy.utils import IR, get_backend, get_ir_config
    apply()
    deploy_cfg, model_cfg = _load(deploy_cfg, model_cfg)
    task = build_task_processor(model_cfg, deploy_cfg, 'cpu')
    model = task.build_pytorch_model(checkpoint)
    backend = get_backend(deploy_cfg).value
    opset = get_ir_config(deploy_cfg).get('opset_version', 11)
    patched = patch_model(model, cfg=deploy_cfg, backend=backend, ir=IR.ONNX)
    session = ort.InferenceSession(onnx_file,
                                   providers=['CPUExecutionProvider'])

    def timed(run):  # the second of two runs (the first warms up)
        run()
        start = time.perf_counter()
        out = run()
        return out, time.perf_counter() - start

    def max_diff(a, b):
        return (a.float() - b.float()).abs().max().item() if a.numel() \
            else 0.0

    rows = []
    for input_shape in input_shapes:
        data, inputs = task.create_input(
            image, input_shape, data_preprocessor=model.data_preprocessor)
        with RewriterContext(cfg=deploy_cfg, backend=backend, ir=IR.ONNX,
                             opset=opset):
            expected = patched.forward(inputs, data['data_samples'],
                                       mode='predict')
        # the model's own inference in PyTorch, for the time (the deploy
        # graph in PyTorch re-patches MMDeploy's rewrites at every call)
        _, torch_s = timed(lambda: model.forward(
            inputs, data['data_samples'], mode='predict'))
        got, ort_s = timed(
            lambda: session.run(None, {'input': inputs.numpy()}))
        dets, labels, masks = (torch.from_numpy(v) for v in got)
        ref_dets, ref_labels, ref_masks = expected
        if dets.shape != ref_dets.shape or masks.shape != ref_masks.shape:
            raise AssertionError(
                f'ONNX Runtime gives {tuple(dets.shape)} detections and '
                f'masks {tuple(masks.shape)}, PyTorch '
                f'{tuple(ref_dets.shape)} and {tuple(ref_masks.shape)}')
        rows.append(dict(
            size=tuple(inputs.shape[-2:]), detections=int(dets.shape[1]),
            boxes=max_diff(dets[..., :4], ref_dets[..., :4]),
            scores=max_diff(dets[..., 4], ref_dets[..., 4]),
            masks=max_diff(masks, ref_masks),
            labels_equal=bool(torch.equal(labels, ref_labels)),
            torch_s=torch_s, ort_s=ort_s))
    return rows
