"""The paper's comparison: the self-attention and convolution baselines,
their configs and demo variants, and the term measurements."""
import os

import pytest
import torch
from mmengine.config import Config

from conftest import REPO_ROOT, calibrate_norms, load_tool
from lesa_mm.models import LESA, LESAResNet
from lesa_mm.terms import format_table, layer_terms, measure_terms
from lesa_mm.utils import build_model_from_config

compare_demo = load_tool('tools/analysis_tools/compare_demo.py')

#: baseline config -> the LESA config whose recipe it shares
BASELINES = {
    'configs/baselines/resnet50_lesa-recipe_in1k.py':
    'configs/lesa/lesa-resnet50_4xb32_in1k.py',
    'configs/baselines/sa-resnet50_4xb32_in1k.py':
    'configs/lesa/lesa-resnet50_4xb32_in1k.py',
    'configs/baselines/mask-rcnn_r50-dcn_lesa-recipe.py':
    'configs/lesa/mask-rcnn_lesa-r50.py',
    'configs/baselines/mask-rcnn_sa-r50.py':
    'configs/lesa/mask-rcnn_lesa-r50.py',
}


def settings(path):
    return Config.fromfile(os.path.join(REPO_ROOT, path)).to_dict()


def without_backbone(cfg):
    cfg = dict(cfg, model=dict(cfg['model']))
    cfg['model'].pop('backbone')
    cfg.pop('imagenet_checkpoint', None)
    return cfg


@pytest.mark.parametrize('baseline', BASELINES)
def test_baselines_share_the_lesa_recipe(baseline):
    """Every setting but the backbone (data, schedule, optimiser, hooks,
    neck and heads) is the LESA config's, by inheritance."""
    lesa = settings(BASELINES[baseline])
    base = settings(baseline)
    assert without_backbone(base) == without_backbone(lesa)
    with open(os.path.join(REPO_ROOT, baseline)) as f:
        assert f"_base_ = '../lesa/{os.path.basename(BASELINES[baseline])}'"\
            in f.read()
    backbone, lesa_backbone = base['model']['backbone'], lesa['model'][
        'backbone']
    if backbone['type'] == 'LESAResNet':  # self-attention: only the layer
        assert backbone.pop('lesa') == dict(type='LESA', with_unary=False,
                                            fusion=None)
        if 'init_cfg' in backbone and backbone['init_cfg']:
            assert backbone['init_cfg']['type'] == \
                lesa_backbone['init_cfg']['type']
            backbone.pop('init_cfg'), lesa_backbone.pop('init_cfg')
        assert backbone == lesa_backbone
    else:  # the stock ResNet-50, with the LESA backbone's shared settings
        assert backbone['depth'] == 50
        for key in ('frozen_stages', 'norm_eval', 'dcn', 'stage_with_dcn',
                    'out_indices', 'norm_cfg', 'zero_init_residual'):
            if key in lesa_backbone:
                assert backbone[key] == lesa_backbone[key], key


@pytest.mark.parametrize('task', sorted(compare_demo.DEMOS))
def test_demo_variants_differ_only_in_the_backbone(task):
    """Same data, schedule, width and seed: the convolution and
    self-attention demos are the LESA demo with another backbone."""
    variants = dict(compare_demo.DEMOS[task]['variants'])
    lesa = settings(variants['LESA'])
    for variant in ('convolution', 'self-attention'):
        other = settings(variants[variant])
        assert without_backbone(other) == without_backbone(lesa), variant
        backbone = other['model']['backbone']
        assert backbone['base_channels'] == lesa['model']['backbone'][
            'base_channels'] == lesa['width']
        assert backbone['strides'] == lesa['model']['backbone']['strides']
    assert settings(variants['self-attention'])['model']['backbone'][
        'lesa'] == dict(type='LESA', with_unary=False, fusion=None)
    assert settings(variants['convolution'])['model']['backbone'][
        'type'] == 'ResNet'


def test_self_attention_backbone_keeps_everything_but_the_unary_term():
    sa = build_model_from_config(os.path.join(
        REPO_ROOT, 'configs/baselines/sa-resnet50_4xb32_in1k.py')).backbone
    lesa = build_model_from_config(os.path.join(
        REPO_ROOT, 'configs/lesa/lesa-resnet50_4xb32_in1k.py')).backbone
    layers = [m for m in sa.modules() if isinstance(m, LESA)]
    assert len(layers) == 8
    assert all(m.unary is None and m.fusion is None for m in layers)
    lesa_keys = set(lesa.state_dict())
    dropped = {k for k in lesa_keys if '.unary.' in k or '.fusion.' in k}
    assert set(sa.state_dict()) == lesa_keys - dropped
    sa.eval()
    with torch.no_grad():
        assert sa(torch.randn(1, 3, 224, 224))[0].shape == (1, 2048, 14, 14)


def test_self_attention_detector_starts_from_its_imagenet_model(tmp_path):
    """The self-attention detector's recipe: LESATransfer of a
    'classification' self-attention ImageNet checkpoint keeps its attention
    weights and starts the 'detection_qr' tables afresh."""
    width = 16
    torch.manual_seed(1)
    cls = build_model_from_config(os.path.join(
        REPO_ROOT, 'configs/baselines/sa-resnet50_4xb32_in1k.py'))
    cls.backbone = LESAResNet(
        depth=50, stem_channels=width, base_channels=width,
        feat_sizes=(16, 8, 4, 4),
        lesa=dict(type='LESA', with_unary=False, fusion=None))
    calibrate_norms(cls.backbone, torch.randn(2, 3, 64, 64))
    path = str(tmp_path / 'sa_in1k.pth')
    torch.save({'state_dict': cls.state_dict(), 'meta': {}}, path)

    cfg = Config.fromfile(os.path.join(
        REPO_ROOT, 'configs/baselines/mask-rcnn_sa-r50.py'))
    backbone_cfg = cfg.model.backbone.to_dict()
    assert backbone_cfg.pop('type') == 'LESAResNet'
    assert backbone_cfg['init_cfg']['type'] == 'LESATransfer'
    backbone_cfg['init_cfg']['checkpoint'] = path
    backbone_cfg.update(stem_channels=width, base_channels=width,
                        feat_sizes=(32, 16, 8, 4))
    det = LESAResNet(**backbone_cfg)
    det.init_weights()
    src, dst = cls.backbone.state_dict(), det.state_dict()
    key = 'layer4.1.conv2.binary'
    torch.testing.assert_close(dst[f'{key}.qkv.weight'],
                               src[f'{key}.qkv.weight'])
    assert dst[f'{key}.position.rel_height'].shape[0] == 2 * 4 - 1
    assert not any('.unary.' in k or '.fusion.' in k for k in dst)
    det.eval()
    with torch.no_grad():
        outs = det(torch.randn(1, 3, 100, 140))
    assert [tuple(o.shape[-2:]) for o in outs] == [(25, 35), (13, 18),
                                                  (7, 9), (4, 5)]


def direct_terms(layer, x):
    """The measurements written out position by position."""
    binary = layer.binary
    n, _, h, w = x.shape
    length = h * w
    q, k, v = binary.split_heads(x)
    maps = binary.attention_maps(x, list(range(length)))
    shares, weights = [], []
    for img in range(n):
        for head in range(binary.groups):
            a = maps[img, head].reshape(length, length)
            for i in range(length):
                own = a[i, i] * v[img, head, :, i]
                rest = sum(a[i, j] * v[img, head, :, j]
                           for j in range(length) if j != i)
                shares.append(own.norm() / (own.norm() + rest.norm()))
                weights.append(a[i, i])
    out = dict(self_share=torch.stack(shares).mean(),
               self_weight=torch.stack(weights).mean())
    if layer.unary is not None:
        u, b = layer.unary(x), binary(x)
        gated = layer(x) - u  # y = u + gate * b (stride 1)
        out.update(unary_norm=u.norm(dim=1).mean(),
                   binary_norm=gated.norm(dim=1).mean(),
                   gate=(gated / b).mean())
    return out


@pytest.mark.parametrize('with_unary', [True, False],
                         ids=['lesa', 'self-attention'])
@pytest.mark.parametrize('pe_type,size', [('detection_qr', (3, 5)),
                                          ('classification', (4, 4))])
def test_layer_terms_are_the_documented_measurements(with_unary, pe_type,
                                                     size):
    torch.manual_seed(0)
    layer = LESA(16, 16, 4, groups=2, pe_type=pe_type, with_unary=with_unary,
                 fusion=dict(type='DynamicGate') if with_unary else None)
    calibrate_norms(layer, torch.randn(4, 16, *size))
    layer.eval().double()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        measured = layer_terms(layer, x)
        expected = direct_terms(layer, x)
    assert set(measured) == set(expected) | {'uniform'}
    assert measured['uniform'] == 1 / (size[0] * size[1])
    for key, value in expected.items():
        torch.testing.assert_close(measured[key].mean(), value, msg=key)
    assert 0 < measured['self_share'].min() < 1


def test_measure_terms_averages_every_layer_over_the_images():
    torch.manual_seed(0)
    model = LESAResNet(depth=50, stem_channels=16, base_channels=16,
                       feat_sizes=(16, 8, 4, 4)).eval()
    images = torch.randn(5, 3, 64, 64)
    stats = measure_terms(model, [images[:2], images[2:]])
    assert len(stats) == 8 and all(s['images'] == 5 for s in stats.values())
    name = 'layer3.1.conv2'
    one = {}

    def capture(module, args):
        one['x'] = args[0]
    handle = model.layer3[1].conv2.register_forward_pre_hook(capture)
    with torch.no_grad():
        model(images)
    handle.remove()
    direct = layer_terms(model.layer3[1].conv2, one['x'])
    for key in ('unary_norm', 'binary_norm', 'gate', 'self_share'):
        assert stats[name][key] == pytest.approx(direct[key].mean().item(),
                                                 rel=1e-5), key
    table = format_table(stats)
    assert table.count('\n') == 2 + 8 - 1 and '| layer3.1.conv2 | LESA |' \
        in table
    with pytest.raises(ValueError, match='has no attention'):
        measure_terms(torch.nn.Conv2d(3, 3, 1), [images])


def test_analyze_terms_tool_on_a_checkpoint(tmp_path):
    """tools/analysis_tools/analyze_terms.py on the classification demo's
    self-attention variant (a checkpoint of the freshly built model)."""
    config = os.path.join(REPO_ROOT,
                          'configs/demo/sa-resnet50-slim_shapes.py')
    cfg = Config.fromfile(config)
    data = tmp_path / 'shapes'
    cfg.merge_from_dict({f'{loader}.dataset.data_root': str(data) for loader
                         in ('train_dataloader', 'val_dataloader',
                             'test_dataloader')})
    cfg.merge_from_dict({f'{loader}.dataset.synthetic': dict(
        num_train_per_class=2, num_val_per_class=2, image_size=64, seed=0)
        for loader in ('train_dataloader', 'val_dataloader',
                       'test_dataloader')})
    cfg_path = tmp_path / 'sa.py'
    cfg.dump(str(cfg_path))
    model = build_model_from_config(cfg)
    checkpoint = tmp_path / 'sa.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    tool = load_tool('tools/analysis_tools/analyze_terms.py')
    stats = tool.main([str(cfg_path), str(checkpoint), '--num-images', '3',
                       '--out', str(tmp_path / 'terms.json')])
    assert len(stats) == 8
    assert all(s['kind'] == 'self-attention' and s['images'] == 3
               and 'gate' not in s for s in stats.values())
    assert (tmp_path / 'terms.json').is_file()
    with pytest.raises(ValueError, match=r'num_images must be in \[1, 6\]'):
        tool.main([str(cfg_path), str(checkpoint), '--num-images', '7'])


def test_comparison_table():
    rows = [dict(variant='LESA', config='configs/demo/x.py',
                 metrics={'accuracy/top1': 99.0}, params=1.5e6, flops=2e8,
                 wall_s=64.4)]
    assert compare_demo.comparison_table('classification', rows).split(
        '\n')[2] == '| LESA | `x` | 99.00 | 1.50 M | 0.200 G | 1 min 4 s |'
