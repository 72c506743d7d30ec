"""LESA models in clients nobody here wrote: ONNX Runtime (dynamo and
TorchScript exporters), torch.jit.trace, torch.compile and the meta device.

A size-dependent choice (the tables' centre or their interpolation, one
attention call or key blocks) that a graph froze at capture time would be
silently wrong at other sizes: every graph below is captured at one size and
run at smaller, equal, larger and non-square ones.
"""
import copy

import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from conftest import (REPO_ROOT, calibrate_norms, load_tool, randomize_norms,
                      rel_error)
from lesa_mm.deployment import check_onnx, export_onnx
from lesa_mm.models import LESA, LESAResNet
from lesa_mm.utils import build_model_from_config

# a LESA layer trained at 32x32: smaller, equal, larger (interpolated
# tables; key blocks in eager mode at 40x40), non-square (one axis larger)
SIZES = [(20, 20), (32, 32), (40, 40), (24, 44)]
TOL = 1e-4


def eval_layer(attn_impl='fused'):
    torch.manual_seed(0)
    layer = LESA(64, 64, feat_size=32, groups=8, attn_impl=attn_impl)
    return randomize_norms(layer).eval()


@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
def test_layer_dynamo_export_serves_every_size(tmp_path, attn_impl):
    layer = eval_layer(attn_impl)
    path = str(tmp_path / 'lesa.onnx')
    export_onnx(layer, path, (40, 40), in_channels=64)
    for r in check_onnx(path, layer, SIZES, in_channels=64, repeat=1):
        assert r['rel_error'] < TOL, r


def test_plain_dynamo_export_by_a_user(tmp_path):
    """What a user writes: ``torch.onnx.export(model.eval(), (x,), path,
    dynamo=True, dynamic_shapes=...)`` with automatic dynamic sizes (batch
    included)."""
    layer = eval_layer()
    path = str(tmp_path / 'lesa.onnx')
    auto = torch.export.Dim.AUTO
    torch.onnx.export(layer, (torch.randn(1, 64, 40, 40), ), path,
                      dynamo=True, dynamic_shapes=({0: auto, 2: auto, 3: auto}, ))
    session = onnxruntime.InferenceSession(path)
    name = session.get_inputs()[0].name
    for size in SIZES:
        x = torch.randn(2, 64, *size)
        with torch.no_grad():
            expected = layer(x)
        (actual, ) = session.run(None, {name: x.numpy()})
        assert rel_error(actual, expected) < TOL, size


@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
def test_legacy_exporter_serves_every_size(tmp_path, attn_impl):
    """The TorchScript exporter (``dynamo=False``) with dynamic axes gives
    the same shape-generic graph."""
    layer = eval_layer(attn_impl)
    path = str(tmp_path / 'lesa.onnx')
    torch.onnx.export(layer, (torch.randn(1, 64, 40, 40), ), path,
                      dynamo=False, input_names=['x'],
                      dynamic_axes={'x': {2: 'height', 3: 'width'}},
                      opset_version=17)
    session = onnxruntime.InferenceSession(path)
    for size in SIZES:
        x = torch.randn(1, 64, *size)
        with torch.no_grad():
            expected = layer(x)
        (actual, ) = session.run(None, {'x': x.numpy()})
        assert rel_error(actual, expected) < TOL, size


@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'legacy'])
@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
def test_classification_layer_through_both_exporters(tmp_path, dynamo,
                                                     attn_impl):
    """The 'classification' kernels (the fused one's products over sliding
    windows of the table) at their one size, non-square, batch 2."""
    torch.manual_seed(0)
    layer = randomize_norms(LESA(64, 64, feat_size=(7, 6), groups=8,
                                 pe_type='classification',
                                 attn_impl=attn_impl)).eval()
    x = torch.randn(2, 64, 7, 6)
    path = str(tmp_path / 'lesa.onnx')
    torch.onnx.export(layer, (x, ), path, dynamo=dynamo, input_names=['x'])
    with torch.no_grad():
        expected = layer.eval()(x)
    (actual, ) = onnxruntime.InferenceSession(path).run(None, {'x': x.numpy()})
    assert rel_error(actual, expected) < TOL


@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
def test_jit_trace_at_one_size_serves_others(attn_impl):
    layer = eval_layer(attn_impl)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 64, 40, 40),
                                 check_trace=False)
        for size in [(6, 10), *SIZES, (48, 48)]:
            x = torch.randn(1, 64, *size)
            assert rel_error(traced(x), layer(x)) < 1e-5, size


def test_export_takes_the_one_call_path_and_eager_the_key_blocks(
        block_calls):
    """The key-block kernel is an eager CPU optimisation: a 40x40 map takes
    it in eager mode, while a traced graph takes the one-call path."""
    layer = eval_layer()
    x = torch.randn(1, 64, 40, 40)
    with torch.no_grad():
        layer(x)
        assert block_calls == [(14, 14)]
        torch.jit.trace(layer, x, check_trace=False)
    assert block_calls == [(14, 14)]


def test_one_call_heads_are_aligned_to_eight(monkeypatch):
    """At 50x84 the augmented head is 16 + 50 + 84 = 150 channels wide:
    padded to 152 (a multiple of 8) for queries, keys and values."""
    from lesa_mm.models.layers import decomposed_kernels, key_blocks
    monkeypatch.setattr(key_blocks, 'key_blocks', lambda *a, **k: None)
    widths = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        widths.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(decomposed_kernels.F, "scaled_dot_product_attention",
                        spy)
    layer = LESA(256, 256, feat_size=64).eval()
    reference = copy.deepcopy(layer)
    reference.binary.attn_impl = 'reference'
    x = torch.randn(1, 256, 50, 84)
    with torch.no_grad():
        assert rel_error(layer(x), reference(x)) < 1e-5
    assert widths == [(152, 152, 152)]


# ------------------------------------------------------------ backbones
DETECTION_CONFIGS = [
    'configs/lesa/mask-rcnn_lesa-r50.py',
    'configs/baselines/mask-rcnn_sa-r50.py',  # the self-attention baseline
    'configs/lesa/mask-rcnn_lesa-r50_keep-ratio.py',
    'configs/lesa/htc_lesa-wrn50.py',
]


def detector_without_dcn(config, feat_sizes):
    from mmengine.config import Config
    cfg = Config.fromfile(f'{REPO_ROOT}/{config}')
    cfg.model.backbone.update(dcn=None, stage_with_dcn=[False] * 4,
                              init_cfg=None, feat_sizes=feat_sizes,
                              with_cp=False)
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    model.init_weights()
    calibrate_norms(model.backbone, torch.randn(2, 3, 128, 128))
    return model.eval()


@pytest.mark.parametrize('config', [
    *DETECTION_CONFIGS[:2],
    # about a minute each
    *(pytest.param(c, marks=pytest.mark.slow) for c in DETECTION_CONFIGS[2:])
])
def test_detection_configs_export_with_dynamic_sizes(tmp_path, config):
    """The shipped detection configs' features (backbone and FPN), DCN off,
    position tables sized for 128x128 images (stage maps 32, 16, 8, 4): one
    export serves smaller, equal, larger and non-square images, padded to
    the detectors' divisor (32) or not (odd sides through the strided
    stages)."""
    model = detector_without_dcn(config, (32, 16, 8, 4))
    path = str(tmp_path / 'det.onnx')
    module = export_onnx(model, path, (128, 128))
    results = check_onnx(path, module, [(64, 96), (128, 128), (192, 160),
                                        (128, 224), (97, 161)], repeat=1)
    for r in results:
        assert r['rel_error'] < TOL, r


def test_classifier_exports_at_its_trained_size(tmp_path):
    torch.manual_seed(0)
    model = build_model_from_config(
        f'{REPO_ROOT}/configs/lesa/lesa-resnet50_4xb32_in1k.py')
    model.init_weights()
    calibrate_norms(model.backbone, torch.randn(2, 3, 224, 224))
    model.eval()
    path = str(tmp_path / 'cls.onnx')
    module = export_onnx(model, path, (224, 224))
    (r, ) = check_onnx(path, module, [(224, 224)], repeat=1)
    assert r['rel_error'] < TOL, r
    with pytest.raises(ValueError, match='trained feature size'):
        export_onnx(model, path, (224, 224), dynamic=True)


@pytest.mark.parametrize('shape', [(1, 100), (32, 1)])
def test_dynamic_export_sizes_start_at_two(tmp_path, shape):
    with pytest.raises(ValueError, match=r'at least 2x2'):
        export_onnx(eval_layer(), str(tmp_path / 'x.onnx'), shape,
                    in_channels=64)


def test_deformable_convs_are_refused(tmp_path):
    layer = LESA(16, 16, feat_size=4, groups=2,
                 dcn=dict(type='DCN', deform_groups=1))
    with pytest.raises(ValueError, match='deformable.*unary.conv'):
        export_onnx(layer, str(tmp_path / 'x.onnx'), (4, 4), in_channels=16)


def test_pytorch2onnx_tool(tmp_path, capsys):
    """The tool exports the demo detector's features from a checkpoint and
    checks them at two sizes; a fixed-size check of a DCN config is
    refused."""
    tool = load_tool('tools/deployment/pytorch2onnx.py')
    config = f'{REPO_ROOT}/configs/demo/mask-rcnn_lesa-r50-slim_shapes.py'
    torch.manual_seed(0)
    model = build_model_from_config(config)
    model.init_weights()
    calibrate_norms(model.backbone, torch.randn(2, 3, 128, 128))
    checkpoint = str(tmp_path / 'demo.pth')
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    out = str(tmp_path / 'demo.onnx')
    code = tool.main([
        config, checkpoint, '--shape', '96', '128', '--check-shape', '64',
        '64', '--out', out
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert 'dynamic height and width' in printed
    assert '96x128: relative error' in printed
    assert '64x64: relative error' in printed
    with pytest.raises(ValueError, match='deformable'):
        tool.main([f'{REPO_ROOT}/configs/lesa/mask-rcnn_lesa-r50.py',
                   '--shape', '64', '64', '--out', out,
                   '--cfg-options', 'model.backbone.init_cfg=None'])


# ------------------------------------------------- devices and compilers
@pytest.mark.parametrize('pe_type,strides,feat_sizes,shape', [
    ('classification', (1, 2, 2, 1), (16, 8, 4, 4), 64),
    ('detection_qr', (1, 2, 2, 2), (16, 8, 4, 2), (72, 40)),
], ids=['classification', 'detection_qr'])
def test_backbone_is_captured_in_one_graph(pe_type, strides, feat_sizes,
                                           shape):
    """``torch._dynamo.explain`` of a LESA backbone's eval forward: one
    graph, no break (a break per LESA layer would split it into pieces
    that compile and run apart)."""
    torch._dynamo.reset()
    model = LESAResNet(depth=50, stem_channels=16, base_channels=16,
                       strides=strides, feat_sizes=feat_sizes,
                       pe_type=pe_type).eval()
    x = torch.randn(1, 3, *((shape, ) * 2 if isinstance(shape, int) else
                            shape))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == \
        (1, 0), explanation.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('pe_type,feat,size', [
    ('detection_qr', 32, (40, 24)), ('classification', (8, 6), (8, 6))])
def test_fused_path_runs_on_the_meta_device(training, pe_type, feat, size):
    """Nothing inside ``forward`` is made on a fixed device: on the meta
    device every tensor must be meta (a CPU tensor would raise)."""
    layer = LESA(64, 64, feat_size=feat, groups=8,
                 pe_type=pe_type).to('meta').train(training)
    x = torch.empty(2, 64, *size, device='meta', requires_grad=training)
    y = layer(x)
    assert y.device.type == 'meta' and y.shape == (2, 64, *size)
    if training:
        y.sum().backward()
        assert x.grad.device.type == 'meta'
        assert layer.binary.qkv.weight.grad.shape == (128, 64, 1, 1)


def test_torch_compile_eval_layer_matches_eager():
    layer = eval_layer()
    compiled = torch.compile(layer)
    for size in [(40, 40), (24, 44)]:
        x = torch.randn(1, 64, *size)
        with torch.no_grad():
            assert rel_error(compiled(x), layer(x)) < 1e-5, size


@pytest.mark.parametrize('backend', [
    'aot_eager',  # dynamo's graph capture and AOTAutograd, no code generation
    pytest.param('inductor', marks=pytest.mark.slow),  # about 3 minutes
])
def test_torch_compile_training_step_matches_eager(backend):
    """One training step of a small LESA backbone, compiled and eager, from
    the same state: loss, gradients and BatchNorm running statistics, in
    float64 (a deep float32 network in training mode amplifies round-off
    past any useful tolerance)."""
    kwargs = dict(depth=50, base_channels=16, stem_channels=16,
                  strides=(1, 2, 2, 2), feat_sizes=(16, 8, 4, 2),
                  pe_type='detection_qr', out_indices=(3, ))
    torch.manual_seed(0)
    eager = LESAResNet(**kwargs).double().train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    losses = []
    for model in (eager, compiled):
        loss = model(x)[0].square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert rel_error(losses[1], losses[0]) < 1e-10
    grads = dict(compiled_model.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is None or name.endswith('logit_norm.bias'):
            continue
        assert rel_error(grads[name].grad, p.grad) < 1e-8, name
    buffers = dict(compiled_model.named_buffers())
    for name, b in eager.named_buffers():
        if b.is_floating_point():
            assert rel_error(buffers[name], b) < 1e-10, name
