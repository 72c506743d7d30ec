"""The fused binary term against the spec's direct formulation."""
import copy

import pytest
import torch

from conftest import dense_attention, randomize_norms, rel_error
from lesa_mm.models import LESA, LESAResNet
from lesa_mm.models.layers import folded_rows, key_blocks


def fused_and_reference(cin, c, groups, pe_type, feat, stride=1, seed=0):
    torch.manual_seed(seed)
    fused = LESA(cin, c, feat, groups=groups, stride=stride, pe_type=pe_type)
    # non-trivial norm parameters and running statistics
    randomize_norms(fused, seed)
    reference = copy.deepcopy(fused)
    reference.binary.attn_impl = 'reference'
    return fused, reference


def run_step(layer, x, weight=None):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    weight = torch.randn_like(y) if weight is None else weight
    (y * weight).sum().backward()
    return y, x.grad, weight


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


# --------------------------------------------------------------------------
# key-block path of CPU inference
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    'shape',
    [
        # N, g, H, W, dq, dv, (h, w), chunk bytes
        (2, 3, 7, 11, 4, 6, (3, 4), None),  # both axes overhang
        (1, 2, 13, 5, 8, 3, (5, 5), 64),  # many small query chunks
        (3, 1, 9, 9, 2, 16, (9, 1), None),  # one-column blocks, dv > width
        (1, 2, 16, 16, 16, 32, (4, 4), 512),  # tiled exactly
    ],
    ids=str)
def test_key_block_attention_equals_dense_softmax(shape):
    """Outputs and the gradients of every input against explicit logits,
    in float64."""
    n, g, height, width, dq, dv, blocks, chunk_bytes = shape
    length = height * width
    torch.manual_seed(0)

    def randn(channels, scale=1.0):
        x = scale * torch.randn(n, g, length, channels, dtype=torch.float64)
        return x.requires_grad_(True)

    inputs = [randn(dq), randn(dq), randn(dv), randn(height, 3.0),
              randn(width, 3.0)]
    out = key_blocks.key_block_attention(*inputs, height, width, blocks,
                                         chunk_bytes)
    expected = dense_attention(*inputs, height, width)
    assert out.shape == (n, g, length, dv)
    assert rel_error(out, expected) < 1e-13
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name, grad, expected_grad in zip(['q', 'k', 'v', 'row', 'col'], grads,
                                         expected_grads):
        assert grad.shape == expected_grad.shape, name
        assert rel_error(grad, expected_grad) < 1e-12, name


def test_key_blocks_policy():
    q_s = torch.zeros(1, 1, 64 * 64, 16)
    plan = key_blocks.key_blocks
    # 16 + 16 + 16 = 48 channels instead of 16 + 64 + 64 = 144
    assert plan(q_s, 64, 64) == (16, 16)
    # near-equal blocks: 50 = 4 x 13 - 2, 84 = 6 x 14
    assert plan(q_s, 50, 84) == (13, 14)
    # blocks would not halve the width (48 vs 80): one call
    assert plan(q_s, 32, 32) is None
    assert plan(q_s, 32, 32, target=8) == (8, 8)


@pytest.mark.parametrize(
    'shape',
    [
        # N, g, H, W, dq, dv, block width, chunk bytes
        (2, 3, 7, 11, 4, 12, 5, None),  # padded column blocks, dv > dq + w
        (1, 2, 13, 5, 8, 16, 4, 200),  # taller than wide: transposed
        (2, 2, 9, 14, 3, 5, 3, 1),  # one query row per kernel call
        (1, 1, 6, 6, 4, 8, 6, None),  # one block, square
    ],
    ids=str)
def test_folded_attention_equals_dense_softmax(shape):
    """The folded kernel against explicit logits built from the same
    tables, in float64: the row logits it folds into the keys, the column
    logits it puts on the queries."""
    n, g, height, width, dq, dv, block_w, chunk_bytes = shape
    length = height * width
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, g, length, c, dtype=torch.float64)
               for c in (dq, dq, dv))
    th, tw = (torch.randn(g, 2 * s - 1, dq, dtype=torch.float64)
              for s in (height, width))
    # [g, i, j] -> table[g, j - i + size - 1]
    row_table, col_table = (
        t[:, torch.arange(s)[None] - torch.arange(s)[:, None] + s - 1]
        for t, s in ((th, height), (tw, width)))
    qr = q.view(n, g, height, width, dq)
    row_s = torch.einsum('ngyxd,gyrd->ngyxr', qr, row_table).flatten(2, 3)
    col_s = torch.einsum('ngyxd,gxcd->ngyxc', qr, col_table).flatten(2, 3)
    with torch.no_grad():
        out = folded_rows.folded_attention(q, k, v, row_table, col_table,
                                          row_s, col_s, height, width,
                                          block_w, chunk_bytes)
    expected = dense_attention(q, k, v, row_s, col_s, height, width)
    assert out.shape == (n, g, length, dv)
    assert rel_error(out, expected) < 1e-13


def test_folded_attention_refuses_autograd():
    q = torch.zeros(1, 1, 4, 2, requires_grad=True)
    table = torch.zeros(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match='inference kernel'):
        folded_rows.folded_attention(q, q, q, table, table, q, q, 2, 2, 2)


def test_folded_policy():
    q = torch.zeros(1, 1, 64 * 64, 16)
    plan = folded_rows.folded_columns
    with torch.no_grad():
        # key blocks 16 + 16 + 16 = 48 > 32 channels: folded, 16 + 16 = 32
        assert plan(q, 32, 64, 64) == 16
        assert plan(q, 32, 50, 84) == 14  # near-equal: 84 = 6 x 14
        # key blocks 32 + 13 + 16 = 61 <= 64 channels: not folded
        assert plan(torch.zeros(1, 1, 1, 32), 64, 50, 76) is None
        # fewer than 8 columns per block, or no key blocks: not folded
        assert plan(q, 20, 64, 64) is None
        assert plan(q, 32, 32, 32) is None
    # with autograd the key blocks are taken
    assert plan(q, 32, 64, 64) is None


@pytest.mark.parametrize('size', [(40, 40), (44, 30)], ids=str)
def test_layer_takes_folded_in_inference_and_equals_reference(
        block_calls, folded_calls, size):
    """Inference of a LESA layer (dq = 8, dv = 16) at a 40x40 map and a
    44x30 one (transposed): the folded kernel runs and the outputs equal
    the reference kernel's in float64; with autograd the key blocks run."""
    fused, reference = fused_and_reference(16, 32, 2, 'detection_qr', 40)
    for layer in (fused, reference):
        layer.eval().double()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        y = fused(x)
        assert rel_error(y, reference(x)) < 1e-12
    assert folded_calls == [8] and block_calls == []
    fused(x)
    assert folded_calls == [8] and len(block_calls) == 1


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_folded_under_autocast(dtype, folded_calls):
    """Low-precision inference through the folded kernel (C=256, 8 heads,
    a 32x48 map): finite, close to float32 (the merge runs in float32)."""
    fused, _ = fused_and_reference(256, 256, 8, 'detection_qr', 32)
    x = torch.randn(1, 256, 32, 48)
    with torch.no_grad():
        y32 = fused.eval()(x)
        with torch.autocast('cpu', dtype=dtype):
            y = fused(x)
    assert folded_calls == [16, 16]
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert (y.float() - y32).norm() / y32.norm() < 0.05


@pytest.mark.parametrize('mode', ['train', 'train-with_cp', 'eval'])
def test_layer_takes_key_blocks_and_equals_reference(block_calls, mode):
    """A LESA layer at a 40x40 map (blocks of 14x14, overhanging by 2):
    outputs, input and parameter gradients and running statistics equal
    the reference kernel's in float64 (with checkpointing, the forward runs
    again in the backward)."""
    fused, reference = fused_and_reference(16, 32, 2, 'detection_qr', 40)
    for layer in (fused, reference):
        layer.train(mode != 'eval').double()
        layer.with_cp = mode.endswith('with_cp')
    x = torch.randn(2, 16, 40, 40, dtype=torch.float64)
    assert_same_step(fused, reference, x, tol=1e-12)
    runs = 2 if mode.endswith('with_cp') else 1
    assert block_calls == [(14, 14)] * runs


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_key_blocks_under_autocast(dtype, monkeypatch, block_calls):
    """Low precision through the key-block path: finite outputs and
    gradients, close to float32 (the blocks' merge runs in float32)."""
    monkeypatch.setattr(key_blocks, 'KEY_BLOCK', 8)
    fused, reference = fused_and_reference(64, 64, 4, 'detection_qr', 24)
    x = torch.randn(2, 64, 24, 24)
    y32 = reference.train()(x)
    x_in = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=dtype):
        y = fused.train()(x_in)
    y.float().square().mean().backward()
    assert block_calls == [(8, 8)]
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert torch.isfinite(x_in.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters()
               if p.grad is not None)
    assert (y.float() - y32).norm() / y32.norm() < 0.05


@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('feat', [(7, 6), (1, 5)], ids=['7x6', '1x5'])
def test_classification_kernel_equals_reference_in_float64(mode, feat):
    """The classification kernel (closed-form batch statistics, products
    over sliding windows of the table) is an exact reformulation: in float64 its outputs,
    gradients and running statistics equal the reference kernel's to
    round-off."""
    fused, reference = fused_and_reference(16, 32, 4, 'classification', feat)
    for layer in (fused, reference):
        layer.train(mode == 'train').double()
    x = torch.randn(3, 16, *feat, dtype=torch.float64)
    assert_same_step(fused, reference, x, tol=1e-12)


def test_classification_kernel_on_a_single_position():
    """A 1x1 map (one key: every attention weight is 1) takes the
    single-offset case of the window reads: the outputs and input
    gradient equal the reference kernel's."""
    fused, reference = fused_and_reference(16, 32, 4, 'classification', 1)
    x = torch.randn(3, 16, 1, 1)
    for training in (True, False):
        y_f, gx_f, weight = run_step(fused.train(training), x)
        y_r, gx_r, _ = run_step(reference.train(training), x, weight)
        assert rel_error(y_f, y_r) < 1e-6 and rel_error(gx_f, gx_r) < 1e-6


# --------------------------------------------------------------------------
# higher-order autograd and torch.func
# --------------------------------------------------------------------------
@pytest.mark.parametrize('size', [(8, 8), (40, 3)], ids=['one-call', 'blocks'])
def test_second_derivative_refused_with_the_way_out(size):
    """The fused detection_qr kernels run on fused attention kernels, which
    have no second derivative: a create_graph backward is refused with a
    message naming attn_impl='reference', which computes it."""
    fused, reference = fused_and_reference(8, 16, 2, 'detection_qr', 8)
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    fused.double().eval()
    with pytest.raises(RuntimeError, match=r"first derivatives only.*"
                       r"attn_impl='reference'"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    # first derivatives are unaffected
    grad, = torch.autograd.grad(fused(x).square().sum(), x)
    reference.double().eval()
    grad_r, = torch.autograd.grad(reference(x).square().sum(), x,
                                  create_graph=True)
    assert rel_error(grad, grad_r) < 1e-12
    grad_r.square().sum().backward()  # a gradient penalty
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_classification_kernel_has_second_derivatives():
    fused, reference = fused_and_reference(8, 16, 2, 'classification', 5)
    for layer in (fused, reference):
        layer.double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    penalties = []
    for layer in (fused, reference):
        grad, = torch.autograd.grad(layer(x).square().sum(), x,
                                    create_graph=True)
        penalties.append(torch.autograd.grad(grad.square().sum(), x)[0])
    assert rel_error(*penalties) < 1e-10


@pytest.mark.parametrize('size', [(8, 8), (40, 3)], ids=['one-call', 'blocks'])
def test_torch_func_transforms_take_the_reference_kernel(size):
    """torch.func.grad (and a Hessian-vector product through jacrev of
    grad) of a fused layer equal plain autograd of the reference kernel:
    under functorch transforms the layer takes the reference kernel."""
    from torch.func import functional_call, grad, jacrev
    fused, reference = fused_and_reference(8, 16, 2, 'detection_qr', 8)
    for layer in (fused, reference):
        layer.double().eval()
    x = torch.randn(1, 8, *size, dtype=torch.float64)
    params = dict(fused.named_parameters())
    buffers = dict(fused.named_buffers())

    def loss(p, inputs):
        return functional_call(fused, (p, buffers), (inputs,)).square().sum()

    grads = grad(loss)(params, x)
    reference(x).square().sum().backward()
    for name, p in reference.named_parameters():
        if not name.endswith('logit_norm.bias'):
            assert rel_error(grads[name], p.grad) < 1e-10, name
    # second order in x: the Hessian's row for one input element
    x_grad = grad(loss, argnums=1)
    row = jacrev(lambda v: x_grad(params, v).flatten()[0])(x)
    assert torch.isfinite(row).all() and row.abs().sum() > 0
