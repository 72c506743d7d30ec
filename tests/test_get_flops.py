"""lesa_mm.analysis and tools/analysis_tools/get_flops.py.

The counts of tiny modules are compared with counts worked out by hand;
the tool runs on the demo configs at small sizes.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO_ROOT, load_tool
from lesa_mm.analysis import complexity_info, einsum_macs

DET_DEMO = os.path.join(REPO_ROOT, 'configs', 'demo',
                        'mask-rcnn_lesa-r50-slim_shapes.py')
CLS_DEMO = os.path.join(REPO_ROOT, 'configs', 'demo',
                        'lesa-resnet50-slim_shapes.py')
REFERENCE = ['--cfg-options', 'model.backbone.attn_impl=reference']


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/analysis_tools/get_flops.py')


class Fn(nn.Module):

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def ops(model, *inputs):
    """``(by_operator, unsupported_ops)`` of ``model(*inputs)``."""
    info = complexity_info(model, inputs, show_table=False)
    assert info['flops'] == sum(info['by_operator'].values())
    return dict(info['by_operator']), dict(info['unsupported_ops'])


@pytest.mark.parametrize('equation, shapes, expected', [
    ('bij,bjk->bik', [(2, 3, 4), (2, 4, 5)], 2 * 3 * 4 * 5),
    ('ngci,ngcj->ngij', [(1, 2, 3, 7), (1, 2, 3, 7)], 2 * 3 * 7 * 7),
    # broadcast operand (no batch/head index) and ellipsis
    ('ngci,cij->ngij', [(2, 4, 3, 5), (3, 5, 6)], 2 * 4 * 3 * 5 * 6),
    ('...ij,jk->...ik', [(2, 3, 4, 5), (5, 6)], 2 * 3 * 4 * 5 * 6),
    ('...ij,...jk', [(1, 3, 4, 5), (2, 1, 5, 6)], 2 * 3 * 4 * 5 * 6),
    # three operands: naive single-loop count
    ('ab,bc,cd->ad', [(2, 3), (3, 4), (4, 5)], 2 * 3 * 4 * 5),
    # one operand: a reduction counts, a permutation does not
    ('ij->i', [(3, 4)], 12),
    ('ij->ji', [(3, 4)], 0),
])
def test_einsum_macs(equation, shapes, expected):
    assert einsum_macs(equation, shapes) == expected


def test_einsum_is_exact():
    """8 heads, 16 channels, 256 positions: ``8 * 16 * 256 * 256``, where
    MMEngine's own handle gives numpy's 4-digit estimate (8389000)."""
    q, k = torch.randn(1, 8, 16, 256), torch.randn(1, 8, 16, 256)
    content = Fn(lambda q, k: torch.einsum('ngci,ngcj->ngij', q, k))
    assert ops(content, q, k) == ({'einsum': 8 * 16 * 256 * 256}, {})


def test_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert ops(conv, torch.randn(2, 3, 10, 10)) == (
        {'conv': 2 * 8 * 3 * 9 * 10 * 10}, {})


def test_sdpa():
    """``q (2, 4, 10, 8)``, ``k (2, 4, 12, 8)``, ``v (2, 4, 12, 6)``: the
    products ``q k^T`` and ``attn v``."""
    q, k, v = (torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8),
               torch.randn(2, 4, 12, 6))
    assert ops(Fn(F.scaled_dot_product_attention), q, k, v) == (
        {'sdpa': 2 * 4 * 10 * 12 * (8 + 6)}, {})


@pytest.mark.parametrize('modulated', [False, True])
def test_deformable_conv(modulated):
    """A 3x3 deformable conv 4 -> 8 on a 6x6 map: the conv's MACs; its
    offset (and mask) predictor is an ordinary 3x3 conv with 2 * 9 (3 * 9)
    outputs."""
    from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
    cls = ModulatedDeformConv2dPack if modulated else DeformConv2dPack
    conv = cls(4, 8, 3, padding=1, bias=False).eval()
    counted, _ = ops(conv, torch.randn(1, 4, 6, 6))
    offsets = (3 if modulated else 2) * 9
    assert counted == {'deform_conv': 8 * 4 * 9 * 36,
                       'conv': offsets * 4 * 9 * 36}


@pytest.mark.parametrize('pe_type, size', [('detection_qr', 16),
                                           ('classification', 8)])
def test_lesa_layer_whatever_the_kernel(pe_type, size):
    """``LESA(256, 256)``, 8 heads (``dq = 16``, ``dv = 32``) on two
    ``size x size`` maps in eval mode: the convs (unary grouped 3x3 and 1x1,
    qkv, gate reasoning and projection) and norms as MMEngine counts them
    (BatchNorm: 2 per element) plus the method's attention MACs, the same
    for both kernels."""
    from lesa_mm.models.layers.lesa import LESA
    n, c, g = 2, 256, 8
    length, dq, dv = size * size, c // 16, c // 8
    convs = ((c // g) * 9 * c + c * c + c * 2 * c + 2 * c * c + c * c)
    # norms of unary, qkv, out (o_v and o_e: 2C for 'classification'),
    # gate reasoning and projection
    norms = 2 * (c + 2 * c + c + c + c)
    if pe_type == 'detection_qr':  # q.k, rows and columns, attn.v
        attention = g * length * (length * dq + 2 * size * dq + length * dv)
    else:  # q.k, q.Eq, k.Ek, attn.v, attn.Ev
        attention = g * length * length * (3 * dq + 2 * dv)
        norms += 2 * c
    expected = {'conv': n * length * convs, 'batch_norm': n * length * norms,
                'lesa_attention': n * attention}
    x = torch.randn(n, c, size, size)
    for impl in ('fused', 'reference'):
        layer = LESA(c, c, feat_size=size, pe_type=pe_type, attn_impl=impl)
        counted, uncounted = ops(layer.eval(), x)
        assert counted == expected, impl
        assert uncounted == {'aten::add': 1, 'aten::mul': 1,
                             'aten::sigmoid': 1}, impl


def test_classification_demo(tool):
    fused = tool.main([CLS_DEMO, '--shape', '64'])
    reference = tool.main([CLS_DEMO, '--shape', '64'] + REFERENCE)
    assert fused['flops'] == reference['flops'] > 0
    assert fused['params'] == reference['params']
    assert fused['by_operator']['lesa_attention'] > 0
    assert {'backbone', 'neck', 'head'} <= set(fused['by_module'])
    backbone = tool.main([CLS_DEMO, '--shape', '64', '--backbone-only'])
    assert backbone['flops'] == fused['by_module']['backbone']
    # 'classification' positions serve only their trained size
    with pytest.raises(ValueError, match='4x4'):
        tool.main([CLS_DEMO, '--shape', '96'])
    # the model index carries the tool's figures
    meta = metafile_entry('lesa-resnet50-slim_shapes')['Metadata']
    assert (meta['Parameters'], meta['FLOPs']) == (fused['params'],
                                                   fused['flops'])


def metafile_entry(name):
    import yaml
    with open(os.path.join(REPO_ROOT, 'configs', 'lesa', 'metafile.yml')) as f:
        models = yaml.safe_load(f)['Models']
    return next(m for m in models if m['Name'] == name)


def test_detection_demo(tool):
    # few proposals keep the RoI heads (data-dependent work) cheap
    few = 'model.test_cfg.rpn.max_per_img=8'
    whole = tool.main([DET_DEMO, '--shape', '96', '--cfg-options', few])
    assert {'backbone', 'neck', 'rpn_head', 'roi_head'} <= set(
        whole['by_module'])
    backbone = tool.main([DET_DEMO, '--shape', '96', '--backbone-only'])
    assert backbone['flops'] == whole['by_module']['backbone']
    reference = tool.main([DET_DEMO, '--shape', '96', '--backbone-only'] +
                          REFERENCE)
    assert reference['flops'] == backbone['flops']
    assert backbone['by_operator']['lesa_attention'] > 0
    # nothing the attention kernels run is left uncounted
    assert not any('scaled_dot_product' in op or 'einsum' in op
                   for op in backbone['unsupported_ops'])
