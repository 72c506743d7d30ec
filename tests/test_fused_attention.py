"""The fused binary term against the spec's direct formulation."""
import copy

import pytest
import torch

from lesa_mm.models import LESA, LESAResNet


def fused_and_reference(cin, c, groups, pe_type, feat, stride=1, seed=0):
    torch.manual_seed(seed)
    fused = LESA(cin, c, feat, groups=groups, stride=stride, pe_type=pe_type)
    # non-trivial norm parameters and running statistics
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(fused)
    reference.binary.attn_impl = 'reference'
    return fused, reference


def run_step(layer, x, weight=None):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    weight = torch.randn_like(y) if weight is None else weight
    (y * weight).sum().backward()
    return y, x.grad, weight


def rel_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() /
            expected.norm().clamp_min(1e-30)).item()


def assert_same_step(fused, reference, x, tol=1e-5):
    """One forward/backward of each from the same state: the same outputs,
    input and parameter gradients and running statistics, within ``tol``
    relative (float32 sums in different orders differ in the last bits)."""
    y_f, gx_f, weight = run_step(fused, x)
    y_r, gx_r, _ = run_step(reference, x, weight)
    assert rel_error(y_f, y_r) < tol
    assert rel_error(gx_f, gx_r) < tol
    for (name, p_f), (_, p_r) in zip(fused.named_parameters(),
                                     reference.named_parameters()):
        if name.endswith('logit_norm.bias'):
            # softmax ignores the shift: the gradient is exactly zero (the
            # fused detection path gives 0), the rest is float32 round-off
            weight_grad = reference.binary.logit_norm.weight.grad.norm()
            if fused.pe_type == 'detection_qr':
                assert p_f.grad.abs().max() == 0, name
            assert p_f.grad.norm() < 1e-3 * weight_grad, name
            assert p_r.grad.norm() < 1e-3 * weight_grad, name
            continue
        assert rel_error(p_f.grad, p_r.grad) < tol, name
    for (name, b_f), (_, b_r) in zip(fused.named_buffers(),
                                     reference.named_buffers()):
        assert rel_error(b_f, b_r) < tol, name


CASES = [
    # pe_type, feat, input size, stride, batch
    ('detection_qr', 8, (8, 8), 1, 2),
    ('detection_qr', 11, (7, 11), 1, 3),  # odd, non-square
    ('detection_qr', 12, (7, 11), 1, 1),  # smaller than the tables
    ('detection_qr', 6, (7, 11), 1, 2),  # larger: interpolated tables
    ('detection_qr', 8, (8, 6), 2, 3),  # strided
    ('classification', 5, (5, 5), 1, 3),
    ('classification', 4, (4, 4), 2, 1),
]


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('case', CASES,
                         ids=lambda c: f'{c[0]}-{c[2]}-s{c[3]}-n{c[4]}')
def test_fused_equals_reference(case, training):
    pe_type, feat, size, stride, batch = case
    fused, reference = fused_and_reference(32, 64, 4, pe_type, feat, stride)
    fused.train(training)
    reference.train(training)
    x = torch.randn(batch, 32, *size)
    assert_same_step(fused, reference, x)
    if training:
        assert int(fused.binary.logit_norm.num_batches_tracked) == 1


def test_fused_running_stats_follow_batchnorm_momentum_none():
    fused, reference = fused_and_reference(16, 32, 2, 'detection_qr', 6)
    for layer in (fused, reference):
        layer.binary.logit_norm.momentum = None
        layer.train()
    for _ in range(2):
        x = torch.randn(2, 16, 6, 6)
        fused(x)
        reference(x)
    torch.testing.assert_close(fused.binary.logit_norm.running_var,
                               reference.binary.logit_norm.running_var)
    torch.testing.assert_close(fused.binary.logit_norm.running_mean,
                               reference.binary.logit_norm.running_mean)


def test_fused_in_a_backbone_with_checkpointing():
    """A whole training step of a detection backbone, in float64 (a deep
    float32 network in training mode amplifies round-off past any useful
    tolerance; in float64 the two kernels agree to round-off)."""
    kwargs = dict(depth=50, strides=(1, 2, 2, 2), feat_sizes=(16, 8, 4, 2),
                  pe_type='detection_qr', out_indices=(2, 3), with_cp=True)
    torch.manual_seed(0)
    fused = LESAResNet(attn_impl='fused', **kwargs).train()
    reference = LESAResNet(attn_impl='reference', **kwargs).train()
    reference.load_state_dict(fused.state_dict())
    fused.double()
    reference.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs = [sum(o.square().mean() for o in m(x)) for m in (fused, reference)]
    assert rel_error(outs[0], outs[1]) < 1e-10
    for out in outs:
        out.backward()
    grads = [dict(m.named_parameters()) for m in (fused, reference)]
    for name, p in grads[0].items():
        if not name.endswith('logit_norm.bias'):
            assert rel_error(p.grad, grads[1][name].grad) < 1e-8, name


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_outputs_and_gradients(dtype):
    """Autocast at a detection scale (C=256, 8 heads, a 32x32 map):
    finite outputs and gradients, close to float32."""
    fused, reference = fused_and_reference(256, 256, 8, 'detection_qr', 32)
    fused.train()
    reference.train()
    x = torch.randn(2, 256, 32, 32)
    y32 = reference(x)
    x_in = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=dtype):
        y = fused(x_in)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x_in.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters()
               if p.grad is not None)
    # statistics stay float32
    assert fused.binary.logit_norm.running_var.dtype == torch.float32
    rel = (y.float() - y32).norm() / y32.norm()
    assert rel < 0.05
