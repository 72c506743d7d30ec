"""lesa_mm.models.LESA against the naive spec implementation in
spec_reference.py, on reference-layout weights converted by our converter."""
import copy

import pytest
import torch

from lesa_mm.models.layers import LogitBatchNorm
from lesa_mm.models import LESA
from lesa_mm.utils import convert
from lesa_mm.utils.official_checkpoint import reference_fusion_cfg
from spec_reference import reference_state_dict, spec_lesa

CASES = [
    # cin, c, groups, pe_type, feat (P), input size, stride
    (16, 32, 4, 'detection_qr', 6, (6, 6), 1),
    (16, 32, 4, 'detection_qr', 6, (5, 3), 1),  # smaller: centre of tables
    (16, 32, 4, 'detection_qr', 6, (6, 6), 2),
    (16, 32, 4, 'classification', 5, (5, 5), 1),
    (16, 32, 4, 'classification', 4, (4, 4), 2),
    (8, 16, 1, 'detection_qr', 4, (4, 4), 1),  # groups=1: no pointwise conv
]


def build_pair(cin, c, groups, pe_type, feat, stride, dcn=False, seed=0,
               attn_impl='fused'):
    sd = reference_state_dict(cin, c, groups, pe_type, feat, dcn=dcn, seed=seed)
    layer = LESA(cin, c, feat, groups=groups, stride=stride, pe_type=pe_type,
                 dcn=dict(type='DCN', deform_groups=1) if dcn else None,
                 attn_impl=attn_impl)
    layer.load_state_dict(convert(sd), strict=True)
    return sd, layer


def grad_leaves(sd):
    return {
        k: v.clone().requires_grad_(True)
        if v.is_floating_point() and 'running_' not in k else v
        for k, v in sd.items()
    }


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, what=''):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f'{what}: {m}')


@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c[3]}-{c[5]}-s{c[6]}-g{c[2]}')
def test_matches_spec_outputs_gradients_and_stats(case, training, attn_impl):
    cin, c, groups, pe_type, feat, size, stride = case
    torch.manual_seed(1)
    sd, layer = build_pair(cin, c, groups, pe_type, feat, stride,
                           attn_impl=attn_impl)
    check_against_spec(layer, sd, size, groups, pe_type, feat, stride,
                       training)


def check_against_spec(layer, sd, size, groups, pe_type, feat, stride,
                       training, fusion='gate'):
    """``layer`` (holding the converted ``sd``) equals the spec in float64:
    output, input and parameter gradients, running statistics."""
    cin, c = layer.in_channels, layer.out_channels
    layer.train(training)
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    layer.double()
    sd64 = grad_leaves({k: v.double() if v.is_floating_point() else v
                        for k, v in sd.items()})

    x_ref = x.clone().requires_grad_(True)
    y_ref, stats = spec_lesa(x_ref, sd64, groups, pe_type, feat, stride,
                             training=training, fusion=fusion)
    x_mm = x.clone().requires_grad_(True)
    y_mm = layer(x_mm)
    assert y_mm.shape == (2, c, size[0] // stride, size[1] // stride)
    assert_close(y_mm, y_ref, what='output')

    weight = torch.randn_like(y_ref)
    (y_ref * weight).sum().backward()
    (y_mm * weight).sum().backward()
    assert_close(x_mm.grad, x_ref.grad, what='input gradient')
    converted_grads = convert({k: v.grad for k, v in sd64.items()
                               if k != 'flatten_index' and v.grad is not None})
    params = dict(layer.named_parameters())
    assert set(converted_grads) == set(params)
    for name, grad in converted_grads.items():
        assert_close(params[name].grad, grad, what=f'grad of {name}')

    buffers = dict(layer.named_buffers())
    if training:
        converted_stats = convert(stats)
        assert len(converted_stats) == len(
            [k for k in buffers if 'running_' in k])
        for name, value in converted_stats.items():
            assert_close(buffers[name], value, what=name)
    else:
        for name, value in convert(
                {k: v for k, v in sd64.items() if 'running_' in k}).items():
            assert_close(buffers[name], value, what=name)


#: the authors' fusion options (df_channel_shrink, df_kernel_size, df_group)
#: other than the published ([2], [1, 1], [1, 1])
FUSION_CASES = {
    # two reasoning steps, a 3x3 first, the second grouped
    'deeper-3x3-grouped': ((2, 2), (3, 1, 1), (1, 4, 1)),
    # a wide 5x5 step, grouped, and a grouped projection
    'wide-5x5-grouped-gate': ((1, ), (5, 1), (8, 4)),
    # no reasoning step: the projection reads [u, b]
    'projection-only': ((), (1, ), (2, )),
}


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('pe_type,feat,size,stride', [
    ('detection_qr', 6, (5, 4), 1), ('classification', 4, (4, 4), 2)])
@pytest.mark.parametrize('options', FUSION_CASES.values(), ids=FUSION_CASES)
def test_configurable_fusion_matches_spec(options, pe_type, feat, size,
                                          stride, training):
    """A fusion of the authors' other options, built from the config that
    the converter reads off their weights, computes what they compute."""
    shrink, kernel, group = options
    torch.manual_seed(2)
    sd = reference_state_dict(16, 32, 4, pe_type, feat,
                              df_channel_shrink=shrink, df_kernel_size=kernel,
                              df_group=group)
    fusion = reference_fusion_cfg(sd)
    assert fusion == dict(type='DynamicGate', shrinks=shrink,
                          kernel_sizes=kernel[:-1], groups=group[:-1],
                          gate_groups=group[-1])
    layer = LESA(16, 32, feat, groups=4, stride=stride, pe_type=pe_type,
                 fusion=fusion)
    layer.load_state_dict(convert(sd), strict=True)
    check_against_spec(layer, sd, size, 4, pe_type, feat, stride, training)


@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('pe_type,feat,size,stride', [
    ('detection_qr', 6, (6, 4), 2), ('classification', 5, (5, 5), 1)])
def test_self_attention_baseline_is_the_binary_term(pe_type, feat, size,
                                                    stride, training,
                                                    attn_impl):
    """``with_unary=False`` is the spec's binary term alone (pooled)."""
    torch.manual_seed(3)
    sd = reference_state_dict(16, 32, 4, pe_type, feat, unary=False)
    layer = LESA(16, 32, feat, groups=4, stride=stride, pe_type=pe_type,
                 with_unary=False, fusion=None, attn_impl=attn_impl)
    assert {n for n, _ in layer.named_children()} == (
        {'binary', 'pool'} if stride > 1 else {'binary'})
    layer.load_state_dict(convert(sd), strict=True)
    check_against_spec(layer, sd, size, 4, pe_type, feat, stride, training)


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_sum_fusion_is_u_plus_b(training):
    torch.manual_seed(4)
    sd = reference_state_dict(16, 32, 4, 'detection_qr', 5)
    sd = {k: v for k, v in sd.items()
          if not k.startswith(('reasoning.', 'projection.'))}
    layer = LESA(16, 32, 5, groups=4, fusion=dict(type='Sum'))
    assert not list(layer.fusion.parameters())
    layer.load_state_dict(convert(sd), strict=True)
    check_against_spec(layer, sd, (5, 5), 4, 'detection_qr', 5, 1, training,
                       fusion='sum')


def test_default_fusion_keeps_the_published_keys():
    """The default fusion is the published one, key for key."""
    keys = [k for k in LESA(16, 32, 4, groups=4).state_dict()
            if k.startswith('fusion.')]
    assert keys == [f'fusion.{m}.{p}' for m in ('reason_conv', 'reason_norm',
                                                'gate_conv', 'gate_norm')
                    for p in (('weight', ) if 'conv' in m else (
                        'weight', 'bias', 'running_mean', 'running_var',
                        'num_batches_tracked'))]
    default = LESA(16, 32, 4, groups=4).fusion
    explicit = LESA(16, 32, 4, groups=4, fusion=dict(
        type='DynamicGate', shrinks=[2], kernel_sizes=[1], groups=[1],
        gate_kernel_size=1, gate_groups=1)).fusion
    assert str(default) == str(explicit)


@pytest.mark.parametrize('fusion,match', [
    (dict(type='DynamicGate', shrinks=(3, ), kernel_sizes=(1, ),
          groups=(1, )), r'divides 64 channels by 3'),
    (dict(type='DynamicGate', shrinks=(0, ), kernel_sizes=(1, ),
          groups=(1, )), r'positive number, got 0'),
    (dict(type='DynamicGate', kernel_sizes=(2, )), r'kernel_sizes\[0\] must '
     r'be odd.*got 2'),
    (dict(type='DynamicGate', groups=(3, )), r'groups\[0\]=3 must divide.*'
     r'64 and 32'),
    (dict(type='DynamicGate', gate_groups=3), r'gate_groups=3 must divide'),
    (dict(type='DynamicGate', gate_kernel_size=3), r'gate_kernel_size must '
     r'be 1.*unpadded'),
    (dict(type='DynamicGate', shrinks=(2, 2)), r'one shrinks, kernel_sizes '
     r'and groups entry per reasoning step'),
    (dict(type='DynamicGate', shrinks=2), r'shrinks must be a list or tuple'),
    (dict(type='Gate'), r"one of \('DynamicGate', 'Sum'\)"),
    (dict(type='Sum', shrinks=(2, )), r"'Sum' has no option\(s\) "
     r"\['shrinks'\]"),
    (None, r'with_unary=True needs a fusion config'),
])
def test_bad_fusions_are_named(fusion, match):
    with pytest.raises(ValueError, match=match):
        LESA(32, 32, 4, groups=4, fusion=fusion)


def test_self_attention_baseline_refuses_a_fusion():
    with pytest.raises(ValueError, match=r'with_unary=False needs '
                       r'fusion=None'):
        LESA(32, 32, 4, groups=4, with_unary=False)


def test_reference_projection_kernel_above_one_is_refused():
    sd = reference_state_dict(16, 32, 4, 'detection_qr', 4,
                              df_kernel_size=(1, 3))
    with pytest.raises(ValueError, match=r'3x3 kernel; only 1x1 runs'):
        reference_fusion_cfg(sd)


@pytest.mark.parametrize('pe_type,feat', [('detection_qr', 5),
                                          ('classification', 5)])
def test_deformable_unary_matches_spec(pe_type, feat):
    """The unary term as an mmcv DCN vs torchvision's deform_conv2d."""
    sd, layer = build_pair(16, 32, 4, pe_type, feat, 1, dcn=True)
    assert type(layer.unary.conv).__name__ == 'DeformConv2dPack'
    layer.train()
    x = torch.randn(2, 16, feat, feat)
    y_ref, _ = spec_lesa(x, sd, 4, pe_type, feat, training=True)
    assert_close(layer(x), y_ref, rtol=1e-4, atol=1e-4, what='dcn output')


def test_dilation_dilates_the_unary_convolution_only():
    """``dilation`` (a layer in a dilated ResNet stage) dilates the unary
    3x3, padded to keep the size; the binary term is unchanged."""
    torch.manual_seed(0)
    plain = LESA(16, 32, 7, groups=4).eval()
    dilated = LESA(16, 32, 7, groups=4, dilation=3).eval()
    dilated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 7, 7)
    unary = plain.unary
    with torch.no_grad():
        expected = unary.norm(unary.pointwise(torch.nn.functional.conv2d(
            x, unary.conv.weight, padding=3, dilation=3, groups=4)))
        torch.testing.assert_close(dilated.unary(x), expected, rtol=0,
                                   atol=1e-6)
        assert not torch.allclose(dilated.unary(x), unary(x))
        assert torch.equal(dilated.binary(x), plain.binary(x))
        assert dilated(x).shape == plain(x).shape == (2, 32, 7, 7)


def test_sizes_and_pooling_shapes():
    """A strided layer gives a strided convolution's size, ceil(H / s):
    odd sides keep their last row or column, whose windows average the
    positions they cover."""
    layer = LESA(64, 64, feat_size=8, stride=2).eval()
    assert layer(torch.randn(1, 64, 8, 8)).shape == (1, 64, 4, 4)
    x = torch.randn(1, 64, 3, 7)
    y = layer(x)
    conv = torch.nn.Conv2d(64, 64, 1, stride=2)
    assert y.shape == conv(x).shape == (1, 64, 2, 4)
    full = layer.fusion(layer.unary(x), layer.binary(x))
    torch.testing.assert_close(y[..., 0, 0], full[..., :2, :2].mean((-1, -2)))
    torch.testing.assert_close(y[..., 0, 3], full[..., :2, 6].mean(-1))
    torch.testing.assert_close(y[..., 1, 3], full[..., 2, 6])


def test_three_named_terms():
    layer = LESA(32, 32, feat_size=4)
    assert {n for n, _ in layer.named_children()} >= {'unary', 'binary',
                                                      'fusion'}
    x = torch.randn(2, 32, 4, 4)
    layer.eval()
    u, b = layer.unary(x), layer.binary(x)
    torch.testing.assert_close(layer(x), layer.fusion(u, b))


def test_gradient_checkpointing_is_exact():
    """with_cp gives the same outputs, gradients and running statistics
    (checkpoint recomputation must not update the BN statistics twice)."""
    torch.manual_seed(0)
    plain = LESA(32, 32, feat_size=6, groups=4, pe_type='detection_qr')
    ckpt = copy.deepcopy(plain)
    ckpt.with_cp = True
    x = torch.randn(2, 32, 6, 6)
    outs = []
    for layer in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, layer))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for (n, p), (_, q) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(p, q, msg=n)


def test_spec_initialisation():
    torch.manual_seed(0)
    layer = LESA(256, 256, feat_size=32, pe_type='detection_qr')
    w = layer.binary.qkv.weight
    assert w.std().item() == pytest.approx((1 / 256)**0.5, rel=0.05)
    assert layer.binary.position.rel_height.std().item() == pytest.approx(
        (256 / 16)**-0.5, rel=0.1)
    # Kaiming normal, fan_out, relu: std sqrt(2 / (C * 9))
    conv = layer.unary.conv.weight
    assert conv.std().item() == pytest.approx((2 / (256 * 9))**0.5, rel=0.05)
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    cls = LESA(256, 256, feat_size=14, pe_type='classification')
    assert cls.binary.position.relative.std().item() == pytest.approx(
        (1 / 32)**0.5, rel=0.05)


@pytest.mark.parametrize('kwargs,match', [
    (dict(in_channels=32, out_channels=24, feat_size=4), 'out_channels.*24'),
    (dict(in_channels=30, out_channels=32, feat_size=4), 'in_channels.*30'),
    (dict(in_channels=32, out_channels=32, feat_size=4, pe_type='axial'),
     "pe_type.*'axial'"),
    (dict(in_channels=32, out_channels=32, feat_size=0), 'feat_size.*0'),
    (dict(in_channels=32, out_channels=32, feat_size=4, groups=0), 'groups.*0'),
    (dict(in_channels=32, out_channels=32, feat_size=4, stride=0), 'stride.*0'),
    (dict(in_channels=32, out_channels=32, feat_size=4, attn_impl='flash'),
     "attn_impl.*'flash'"),
    (dict(in_channels=32, out_channels=32, feat_size=4,
          norm_cfg=dict(type='GN', num_groups=4)), "attn_impl='reference'"),
    (dict(in_channels=32, out_channels=32, feat_size=4,
          dcn=dict(type='DCNxx')), "dcn type 'DCNxx' is not a layer"),
    (dict(in_channels=32, out_channels=32, feat_size=4,
          norm_cfg=dict(type='BNN')), "norm_cfg type 'BNN' is not a layer"),
    (dict(in_channels=32, out_channels=32, feat_size=4,
          norm_cfg=dict(type='LN'), attn_impl='reference'),
     "norm_cfg must build a norm over the channels.*'LN'"),
    (dict(in_channels=32, out_channels=32.0, feat_size=4),
     r'out_channels must be an int >= 1, got 32.0 \(float\)'),
    (dict(in_channels=32, out_channels=32, feat_size=True),
     'feat_size must be a positive int .* got True'),
    (dict(in_channels=32, out_channels=32, feat_size=(4, 0)),
     r'feat_size .* got \(4, 0\)'),
    (dict(in_channels=32, out_channels=32, feat_size=4, with_cp='yes'),
     "with_cp must be True or False, got 'yes'"),
    (dict(in_channels=32, out_channels=32, feat_size=4, dilation=0),
     r'dilation must be an int >= 1, got 0'),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LESA(**kwargs)


@pytest.mark.parametrize('pe_type,size,match', [
    ('classification', (4, 4), 'trained feature size 5x5, got a 4x4'),
    ('classification', (6, 6), 'trained feature size 5x5, got a 6x6'),
])
def test_unservable_input_sizes_raise(pe_type, size, match):
    layer = LESA(16, 16, feat_size=5, groups=2, pe_type=pe_type)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(1, 16, *size))


def test_numpy_integers_are_accepted():
    import numpy as np
    layer = LESA(np.int64(16), np.int64(32), feat_size=np.int64(4),
                 groups=np.int64(2))
    assert layer.out_channels == 32 and type(layer.out_channels) is int
    assert layer(torch.randn(1, 16, 4, 4)).shape == (1, 32, 4, 4)


def test_empty_batch_raises():
    layer = LESA(16, 16, feat_size=4, groups=2).eval()
    with pytest.raises(ValueError, match=r'non-empty input .*\(0, 16, 4, 4\)'):
        layer(torch.randn(0, 16, 4, 4))


def test_wrong_channels_raise():
    layer = LESA(16, 16, feat_size=5, groups=2)
    with pytest.raises(ValueError, match=r'\(N, 16, H, W\), got \(1, 8, 5, 5\)'):
        layer(torch.randn(1, 8, 5, 5))


def test_registered_in_root_registry():
    from mmengine.registry import MODELS
    layer = MODELS.build(dict(type='LESA', in_channels=16, out_channels=16,
                              feat_size=4, groups=2))
    assert isinstance(layer, LESA)


def test_syncbn_norm_cfg_reaches_every_norm():
    layer = LESA(16, 16, feat_size=4, groups=2,
                 norm_cfg=dict(type='SyncBN'))
    norms = [m for m in layer.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # BN_qkv, BNsim, BN_out, BN_x, and the two of the fusion
    assert len(norms) == 6
    logit_norm = layer.binary.logit_norm
    assert isinstance(logit_norm, LogitBatchNorm) and logit_norm.sync
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms
               if m is not logit_norm)
    # outside a process group it is a BatchNorm2d
    plain = torch.nn.BatchNorm2d(logit_norm.num_features)
    x = torch.randn(2, logit_norm.num_features, 5, 5)
    assert torch.allclose(logit_norm(x), plain(x))
    assert torch.allclose(logit_norm.running_var, plain.running_var)


def test_runner_sync_bn_conversion_works():
    """MMEngine's runner converts a built model's norms for cfg.sync_bn,
    which turns the logit norm into a plain SyncBatchNorm; the layer takes
    it back, with the same parameter and buffer objects, when the runner
    first calls train() or eval(), and computes what it computed (eval
    mode: torch's SyncBatchNorm trains only on accelerators)."""
    from mmengine.model import convert_sync_batchnorm
    torch.manual_seed(0)
    layer = LESA(16, 16, feat_size=4, groups=2)
    calibrate = layer.train()(torch.randn(4, 16, 4, 4))  # non-trivial stats
    assert calibrate.shape == (4, 16, 4, 4)
    x = torch.randn(2, 16, 4, 4)
    expected = copy.deepcopy(layer).eval()(x)
    converted = convert_sync_batchnorm(layer, 'torch')
    synced = converted.binary.logit_norm
    assert type(synced) is torch.nn.SyncBatchNorm
    params = {id(p) for p in converted.parameters()}
    for mode in (True, False):  # the runner's train and test loops
        converted.train(mode)
        logit_norm = converted.binary.logit_norm
        assert isinstance(logit_norm, LogitBatchNorm) and logit_norm.sync
        assert logit_norm.training is mode
        assert logit_norm.weight is synced.weight
        assert logit_norm.running_var is synced.running_var
        assert {id(p) for p in converted.parameters()} == params
    torch.testing.assert_close(converted(x), expected)


def test_fused_refuses_a_logit_norm_it_cannot_adopt():
    """A logit norm replaced by something other than a SyncBatchNorm
    conversion cannot give the fused kernels their scales: the layer says
    so instead of computing something else."""
    layer = LESA(16, 16, feat_size=4, groups=2)
    layer.binary.logit_norm = torch.nn.GroupNorm(2, 4)
    layer.train()
    with pytest.raises(ValueError, match="dict.type='SyncBN'.*"
                       "attn_impl='reference'"):
        layer(torch.randn(1, 16, 4, 4))


def test_detection_tables_interpolate_for_larger_inputs():
    """A map larger than the tables reads them linearly interpolated to
    2 * size - 1 offsets (align_corners=False), checked with numpy."""
    import numpy as np
    layer = LESA(16, 16, feat_size=4, groups=2, attn_impl='reference').eval()
    position = layer.binary.position
    th, tw = position.tables(6, 3)
    table = position.rel_height.detach().numpy()  # (7, dq)
    out_len, in_len = 11, 7
    coords = np.clip((np.arange(out_len) + 0.5) * in_len / out_len - 0.5, 0,
                     in_len - 1)
    expected = np.stack([np.interp(coords, np.arange(in_len), table[:, c])
                         for c in range(table.shape[1])], axis=1)
    for r_i in range(6):
        for r_j in range(6):
            np.testing.assert_allclose(th[r_i, r_j].detach().numpy(),
                                       expected[r_j - r_i + 5], rtol=1e-6,
                                       atol=1e-6)
    # the width axis (3 <= 4) keeps reading the centre, exactly
    width_table = position.rel_width.detach()
    torch.testing.assert_close(tw[0, 2], width_table[2 - 0 + 3])
    assert layer(torch.randn(1, 16, 6, 3)).shape == (1, 16, 6, 3)


@pytest.mark.parametrize('pe_type,size', [('detection_qr', (5, 4)),
                                          ('classification', (5, 5))])
def test_attention_maps_are_rows_of_the_reference_attention(pe_type, size):
    """attention_maps() equals the rows of the spec's softmax(Z) in eval."""
    cin, c, groups, feat = 16, 32, 4, 5
    sd = reference_state_dict(cin, c, groups, pe_type, feat)
    layer = LESA(cin, c, feat, groups=groups, pe_type=pe_type).eval()
    layer.load_state_dict(convert(sd))
    x = torch.randn(2, cin, *size)
    captured = {}
    original = torch.softmax

    def spy(z, dim):
        captured['attn'] = original(z, dim=dim)
        return captured['attn']

    import spec_reference
    spec_reference.torch.softmax = spy
    try:
        spec_lesa(x, sd, groups, pe_type, feat)
    finally:
        spec_reference.torch.softmax = original
    queries = [0, 7, size[0] * size[1] - 1]
    maps = layer.binary.attention_maps(x, queries)
    assert maps.shape == (2, groups, 3, *size)
    expected = captured['attn'][:, :, queries].reshape(2, groups, 3, *size)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r'query indices must lie in \[0, '):
        layer.binary.attention_maps(x, [size[0] * size[1]])


def test_binary_key_parts_read_the_layer_layout():
    from lesa_mm.models.layers.binary import binary_key_parts
    layer = LESA(16, 16, feat_size=4, groups=2)
    parts = {k: binary_key_parts('layer3.1.conv2.' + k)
             for k in layer.state_dict()}
    binary = {k: v for k, v in parts.items() if k.startswith('binary.')}
    assert binary and all(v[0] == 'layer3.1.conv2' for v in binary.values())
    assert {v[1] for v in binary.values()} == {
        name for name, _ in layer.binary.named_children()}
    assert parts['binary.position.rel_height'] == ('layer3.1.conv2',
                                                   'position', 'rel_height')
    assert all(v is None for k, v in parts.items() if k not in binary)
