"""tools/analysis_tools/get_flops.py: the added op handles and the tables.

The handle tests trace tiny modules and compare with counts worked out by
hand; the table tests run the tool on the demo configs at their (small)
native sizes.
"""
import io
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO_ROOT, load_tool

DET_DEMO = os.path.join(REPO_ROOT, 'configs', 'demo',
                        'mask-rcnn_lesa-r50-slim_shapes.py')
CLS_DEMO = os.path.join(REPO_ROOT, 'configs', 'demo',
                        'lesa-resnet50-slim_shapes.py')
STAGES = ['stem', 'layer1', 'layer2', 'layer3', 'layer4']


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/analysis_tools/get_flops.py')


class Fn(nn.Module):

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def count(tool, fn, *inputs, added=True):
    with torch.no_grad():
        analyzer = tool.flop_analyzer(Fn(fn), inputs, added_handles=added)
        return analyzer.by_operator(), analyzer.unsupported_ops()


def table(text):
    """``{part: (params, flops, added)}`` of the tool's markdown table, in
    the printed order."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if not line.startswith('|') or cells[0] == 'part' or \
                cells[0].startswith('---'):
            continue
        rows[cells[0].strip('*')] = tuple(float(c) for c in cells[1:])
    return rows


# ---------------------------------------------------------------- handles
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
def test_einsum_macs(tool, equation, shapes, expected):
    assert tool.einsum_macs(equation, shapes) == expected


def test_einsum_handle_is_exact(tool):
    """LESA's content logits ``q.k`` over 256 positions, 8 heads, 16
    channels: ``8 * 16 * 256 * 256`` MACs. MMEngine's own einsum handle
    parses numpy's rounded estimate; the added one is exact."""
    q, k = torch.randn(1, 8, 16, 256), torch.randn(1, 8, 16, 256)

    def content(q, k):
        return torch.einsum('ngci,ngcj->ngij', q, k)

    exact = 8 * 16 * 256 * 256
    ops, unsupported = count(tool, content, q, k)
    assert ops == {'einsum': exact} and not unsupported
    stock, _ = count(tool, content, q, k, added=False)
    assert stock['einsum'] != exact  # 8389000.0, 4 significant digits


def test_sdpa_handle(tool):
    """``q (2, 4, 10, 8)``, ``k (2, 4, 12, 8)``, ``v (2, 4, 12, 6)``: the
    products ``q k^T`` (2*4*10*12*8) and ``attn v`` (2*4*10*12*6)."""
    q = torch.randn(2, 4, 10, 8)
    k = torch.randn(2, 4, 12, 8)
    v = torch.randn(2, 4, 12, 6)
    ops, unsupported = count(tool, F.scaled_dot_product_attention, q, k, v)
    assert ops == {'sdpa': 2 * 4 * 10 * 12 * (8 + 6)}
    assert not unsupported
    stock, stock_unsupported = count(tool, F.scaled_dot_product_attention,
                                     q, k, v, added=False)
    assert sum(stock.values()) == 0
    assert 'aten::scaled_dot_product_attention' in stock_unsupported


@pytest.mark.parametrize('impl', ['fused', 'reference'])
def test_lesa_layer_matches_hand_count(tool, impl):
    """``LESA(256, 256, feat_size=16)`` on a 16x16 map (L = 256 positions,
    g = 8 heads, dq = 16 query/key and dv = 32 value channels per head),
    eval mode, counted as MMEngine counts (MACs; BatchNorm 2 per element):

    * convs: unary grouped 3x3 (``32 * 9 * 256 * L``) and 1x1
      (``256 * 256 * L``), qkv (``256 * 512 * L``), gate reasoning
      (``512 * 256 * L``) and projection (``256 * 256 * L``);
    * position logits (einsum, both kernels): rows and columns,
      ``g * L * (H + W) * dq``;
    * ``'reference'``: the einsums ``q.k`` (``g * L * L * dq``) and
      ``attn.v`` (``g * L * L * dv``), plus ``BNsim`` over the
      ``(1, 2g, L, L)`` logits;
    * ``'fused'``: a traced graph takes the one-call path (the CPU key
      blocks are a runtime optimisation): one SDPA call on the augmented
      queries/keys ``[a q, b R, b C]`` / ``[k, onehot(row), onehot(col)]``
      zero-padded to a multiple of 8, ``dq + H + W = 48`` channels, against
      values ``dv = 32`` wide: ``g * L * L * (48 + 32)``. It does more MACs
      than the reference products (the position term rides in the
      product), but forms no ``L x L`` tensor.
    """
    from lesa_mm.models.layers.lesa import LESA
    c, h, w, g = 256, 16, 16, 8
    length, dq, dv = h * w, c // 16, c // 8
    convs = ((c // g) * 9 * c + c * c + c * 2 * c + 2 * c * c + c * c) * \
        length
    norms = 2 * length * (c + 2 * c + c + c + c)  # unary qkv out reason gate
    position = g * length * (h + w) * dq
    if impl == 'reference':
        expected = dict(
            conv=convs, batch_norm=norms + 2 * (2 * g) * length * length,
            einsum=position + g * length * length * (dq + dv))
    else:
        width = dq + h + w
        expected = dict(conv=convs, batch_norm=norms, einsum=position,
                        sdpa=g * length * length * (width + dv))
    layer = LESA(c, c, feat_size=16, attn_impl=impl).eval()
    ops, _ = count(tool, layer, torch.randn(1, c, h, w))
    assert dict(ops) == expected


# ----------------------------------------------------------------- tables
def test_detection_demo_table(tool):
    out = io.StringIO()
    # few proposals keep the RoI heads (data-dependent work) cheap
    assert tool.main([DET_DEMO, '--cfg-options',
                      'model.test_cfg.rpn.max_per_img=8'], out=out) == 0
    text = out.getvalue()
    rows = table(text)
    assert list(rows)[:6] == STAGES + ['backbone']
    assert {'neck', 'rpn_head', 'roi_head'} <= set(rows)
    assert list(rows)[-1] == 'total'
    # the demo's fixed test size
    assert 'input: 1x3x128x128 (the test pipeline\'s Resize' in text
    # the LESA stages 3-4 use the fused kernel: SDPA counted there only
    assert rows['layer3'][2] > 0 and rows['layer4'][2] > 0
    assert rows['layer1'][2] == rows['layer2'][2] == 0
    stages = sum(rows[s][1] for s in STAGES)
    assert stages == pytest.approx(rows['backbone'][1], abs=2e-3)
    assert rows['total'][1] > rows['backbone'][1]
    assert 'RoI heads ran on 8 proposals' in text


def test_added_handles_raise_the_count(tool):
    """The detection demo's backbone (fused LESA attention) with and
    without the added handles: stock MMEngine misses the SDPA calls."""
    from lesa_mm.utils import build_model_from_config
    model = build_model_from_config(DET_DEMO)
    added = tool.analyze(model, (64, 64), backbone_only=True)
    stock = tool.analyze(model, (64, 64), backbone_only=True,
                         added_handles=False)
    assert [r[0] for r in added['rows']] == STAGES + ['backbone']
    total, stock_total = added['rows'][-1][2], stock['rows'][-1][2]
    sdpa = added['by_operator']['sdpa']
    assert sdpa > 0 and total > stock_total
    assert total - stock_total == pytest.approx(sdpa, rel=1e-3)
    assert 'aten::scaled_dot_product_attention' in stock['unsupported']
    assert not any('scaled_dot_product' in op or 'einsum' in op
                   for op in added['unsupported'])


def test_classification_demo_and_size_error(tool, capsys):
    out = io.StringIO()
    assert tool.main([CLS_DEMO, '--backbone-only', '--compare-stock'],
                     out=out) == 0
    text = out.getvalue()
    assert 'input: 1x3x64x64' in text  # the demo's native size
    rows = table(text)
    assert list(rows) == STAGES + ['backbone']
    assert 'stock MMEngine handles' in text
    # 'classification' positions serve only their trained size
    assert tool.main([CLS_DEMO, '--shape', '96'], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "'classification' position encodings serve only the trained " \
           'feature size 4x4, got a 6x6 input' in err


def test_default_shapes(tool):
    def shape(name):
        cfg = tool.load_config(os.path.join(REPO_ROOT, 'configs', name))
        kind = 'detector' if 'rcnn' in name or 'htc' in name else \
            'classifier'
        return tool.default_shape(cfg, kind)[0]

    # (the demos' sizes are checked by the table tests)
    assert shape('lesa/lesa-resnet50_4xb32_in1k.py') == (224, 224)
    assert shape('lesa/mask-rcnn_lesa-r50.py') == (1024, 1024)
    assert shape('lesa/mask-rcnn_lesa-r50_keep-ratio.py') == (800, 1344)
