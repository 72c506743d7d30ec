"""Export LESA models to ONNX and check the exported graph with ONNX Runtime.

What is exported:

* an MMPretrain classifier: its logits, ``model(x, mode='tensor')``;
* an MMDetection detector: its features, ``model.extract_feat(x)`` (backbone
  and neck; the heads' post-processing is MMDeploy's business);
* any other module (a backbone, a LESA layer): its ``forward``.

Export uses PyTorch's dynamo exporter (``torch.onnx.export(...,
dynamo=True)``). Inside a traced, exported or compiled graph the LESA
layers run a shape-generic formulation (one attention call; the tables'
centre-or-interpolation choice as tensor operations), so one export with
dynamic height and width serves every size a ``'detection_qr'`` model
accepts. ``'classification'`` position encodings serve one size only, so
models that use them are exported with a fixed input size. mmcv's
deformable convolutions have no ONNX Runtime kernel: models that contain
them are refused with a message naming the modules.
"""
import copy
import time

import numpy as np
import torch
import torch.nn as nn

from lesa_mm.models.layers.position import RelativePosition
from lesa_mm.utils.config import model_task

#: ONNX opset of the exports.
OPSET = 18


class _Logits(nn.Module):
    """An MMPretrain classifier's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode='tensor')


class _Features(nn.Module):
    """An MMDetection detector's features (backbone and neck)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.extract_feat(x))


def exportable_module(model):
    """The module whose ``forward(image)`` is exported (see the module
    docstring), in eval mode. Raises ``ValueError`` for models that contain
    mmcv deformable convolutions."""
    from mmcv.ops import DeformConv2d, ModulatedDeformConv2d
    deformable = [
        name for name, m in model.named_modules()
        if isinstance(m, (DeformConv2d, ModulatedDeformConv2d))
    ]
    if deformable:
        raise ValueError(
            f'{len(deformable)} mmcv deformable convolutions (e.g. '
            f'{deformable[0]!r}) have no ONNX Runtime kernel; export the '
            'model without DCN, e.g. --cfg-options model.backbone.dcn=None '
            "'model.backbone.stage_with_dcn=[False,False,False,False]'")
    task = model_task(model)
    if task == 'classification':
        module = _Logits(model)
    elif task == 'detection':
        module = _Features(model)
    else:
        module = model
    return module.eval()


def serves_any_size(model):
    """Whether every LESA layer of ``model`` serves any input size (no
    ``'classification'`` position encoding)."""
    return all(m.any_size for m in model.modules()
               if isinstance(m, RelativePosition))


def export_onnx(model, path, shape, in_channels=3, dynamic=None):
    """Export ``model`` (see :func:`exportable_module`) to ``path``.

    Args:
        model (nn.Module): A model, backbone or layer.
        path (str): The ONNX file to write.
        shape (tuple[int, int]): Height and width of the example input.
        in_channels (int): Channels of the input. Defaults to 3.
        dynamic (bool, optional): Export dynamic height and width. Defaults
            to :func:`serves_any_size`. Asking for dynamic sizes of a model
            that serves one size raises ``ValueError``. A dynamic graph
            serves every height and width from 2 on (strided stages of odd
            sides included).

    Returns:
        nn.Module: The exported module (eval mode), for checking.
    """
    module = exportable_module(model)
    any_size = serves_any_size(module)
    if dynamic is None:
        dynamic = any_size
    if dynamic and not any_size:
        raise ValueError(
            "the model's 'classification' LESA position encodings serve "
            'only their trained feature size: export it with a fixed input '
            'size (dynamic=False)')
    if dynamic and min(shape) < 2:
        raise ValueError(f'the export size {tuple(shape)} must be at least '
                         f'2x2 (a traced size is symbolic from 2 on; 0 and 1 '
                         f'are specialised)')
    x = torch.randn(1, in_channels, *shape)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = ({
            2: dim('height', min=2, max=16384),
            3: dim('width', min=2, max=16384)
        }, )
    with torch.no_grad():
        torch.onnx.export(module, (x, ), path, dynamo=True,
                          dynamic_shapes=dynamic_shapes, opset_version=OPSET,
                          input_names=['input'], verbose=False)
    return module


def _median_seconds(fn, repeat=3):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _rel_error(actual, expected):
    """``max_k ||actual[k] - expected[k]|| / ||expected[k]||`` in float64."""
    return max(
        float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(
            e, np.float64)) / max(np.linalg.norm(np.asarray(e)), 1e-30))
        for a, e in zip(actual, expected))


def _outputs(module, x):
    with torch.no_grad():
        out = module(x)
    out = (out, ) if isinstance(out, torch.Tensor) else out
    return [o.numpy() for o in out]


def check_onnx(path, module, shapes, in_channels=3, repeat=3,
               float64_reference=False):
    """Run the ONNX graph at ``path`` in ONNX Runtime (CPU) and ``module``
    in PyTorch at each size of ``shapes``.

    Args:
        float64_reference (bool): Also run a float64 copy of ``module`` and
            report PyTorch's own float32 error against it (``fp32_error``):
            the round-off a model amplifies by itself, e.g. one whose
            eval-mode statistics are untrained.

    Returns:
        list[dict]: Per size: ``shape``, ``rel_error`` (the largest
        ``||onnx - torch|| / ||torch||`` over the outputs), ``onnx_s`` and
        ``torch_s`` (median seconds of ``repeat`` runs after a warm-up) and,
        with ``float64_reference``, ``fp32_error``.
    """
    import onnxruntime
    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    reference = copy.deepcopy(module).double() if float64_reference else None
    results = []
    for shape in shapes:
        x = torch.randn(1, in_channels, *shape)
        expected = _outputs(module, x)
        feed = {name: x.numpy()}
        actual = session.run(None, feed)
        if len(actual) != len(expected):
            raise RuntimeError(f'the ONNX graph returned {len(actual)} '
                               f'outputs, PyTorch {len(expected)}')
        result = dict(shape=tuple(shape),
                      rel_error=_rel_error(actual, expected))
        if reference is not None:
            result['fp32_error'] = _rel_error(expected,
                                              _outputs(reference, x.double()))
        with torch.no_grad():
            result['torch_s'] = _median_seconds(lambda: module(x), repeat)
        result['onnx_s'] = _median_seconds(lambda: session.run(None, feed),
                                           repeat)
        results.append(result)
    return results
