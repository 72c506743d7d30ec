"""LESA across the ResNet family: LESAResNet (depths 50/101/152, ResNet-D)
and LESAResNeXt equal MMDetection's stock backbones with LESA in no stage,
and take LESA in any stage."""
import importlib

import pytest
import torch
from mmcv.ops import DeformConv2dPack
from mmdet.models.backbones import ResNet, ResNetV1d, ResNeXt
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import randomize_norms
from lesa_mm.models import LESA, LESAResNet, LESAResNeXt

NO_LESA = dict(stage_with_lesa=(False, ) * 4, strides=(1, 2, 2, 2),
               out_indices=(0, 1, 2, 3))

PLUGINS = [dict(cfg=dict(type='ContextBlock', ratio=1. / 4, postfix=1),
                stages=(False, True, True, True), position='after_conv2'),
           dict(cfg=dict(type='ContextBlock', ratio=1. / 16, postfix=2),
                stages=(False, False, True, True), position='after_conv3')]

# (stock class, stock arguments, LESA class, its extra arguments)
STOCK = {
    'resnet50': (ResNet, dict(depth=50), LESAResNet, {}),
    'resnet101': (ResNet, dict(depth=101), LESAResNet, {}),
    'resnet152': (ResNet, dict(depth=152), LESAResNet, {}),
    'resnet50-v1d': (ResNetV1d, dict(depth=50), LESAResNet,
                     dict(deep_stem=True, avg_down=True)),
    'resnext50-32x4d': (ResNeXt, dict(depth=50, groups=32, base_width=4),
                        LESAResNeXt, {}),
    'resnext101-32x4d': (ResNeXt, dict(depth=101, groups=32, base_width=4),
                         LESAResNeXt, {}),
    # what the stock ResNet offers beyond those: dilation, the caffe
    # style, plugins (a ResNeXt rebuilds its plugins at the block width)
    'resnet50-dilated': (ResNet, dict(depth=50, strides=(1, 2, 1, 1),
                                      dilations=(1, 1, 2, 4)),
                         LESAResNet, {}),
    'resnet50-caffe': (ResNet, dict(depth=50, style='caffe'), LESAResNet,
                       {}),
    'resnet50-plugins': (ResNet, dict(depth=50, plugins=PLUGINS),
                         LESAResNet, {}),
    'resnext50-32x4d-plugins': (ResNeXt, dict(depth=50, groups=32,
                                              base_width=4, plugins=PLUGINS),
                                LESAResNeXt, {}),
}


@pytest.mark.parametrize('name', list(STOCK))
def test_without_lesa_equals_the_stock_backbone(name):
    stock_cls, args, lesa_cls, extra = STOCK[name]
    stock = randomize_norms(stock_cls(norm_eval=False, **args))
    ours = lesa_cls(**{**NO_LESA, **args, **extra})
    # a subclass of MMDetection's ResNet (ResNeXt)
    assert isinstance(ours, ResNeXt if stock_cls is ResNeXt else ResNet)
    assert not any(isinstance(m, LESA) for m in ours.modules())
    expected = stock.state_dict()
    state = ours.state_dict()
    assert list(state) == list(expected)
    assert [v.shape for v in state.values()] == \
        [v.shape for v in expected.values()]
    ours.load_state_dict(expected, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for mode in (False, True):  # eval, then train (batch statistics)
            ours.train(mode)
            stock.train(mode)  # mmdet's train() returns None
            outs, stock_outs = ours(x), stock(x)
            assert len(outs) == len(stock_outs) == 4
            for out, stock_out in zip(outs, stock_outs):
                assert torch.equal(out, stock_out), (name, mode)
    # the running statistics moved the same way
    for (key, value), stock_value in zip(ours.state_dict().items(),
                                         stock.state_dict().values()):
        assert torch.equal(value, stock_value), key


def slim(cls, **kwargs):
    """A slim backbone (16 base channels) with LESA in every stage, every
    block a LESA block, DCN everywhere, for 96x96 inputs (stage outputs
    24, 12, 6, 3: mmcv's deformable conv needs maps of at least 3x3)."""
    args = dict(depth=50, stem_channels=16, base_channels=16, lesa_groups=4,
                strides=(1, 2, 2, 2), feat_sizes=(24, 12, 6, 3),
                stage_with_lesa=(True, ) * 4,
                stage_with_first_conv=(False, ) * 4,
                out_indices=(0, 1, 2, 3),
                dcn=dict(type='DCN', deform_groups=1,
                         fallback_on_stride=False),
                stage_with_dcn=(True, ) * 4)
    if cls is LESAResNeXt:
        args.update(groups=8, base_width=4)
    args.update(kwargs)
    return cls(**args)


@pytest.mark.parametrize('cls', [LESAResNet, LESAResNeXt])
@pytest.mark.parametrize('pe_type', ['classification', 'detection_qr'])
def test_lesa_in_every_stage(cls, pe_type):
    model = slim(cls, pe_type=pe_type, with_cp=True, deep_stem=True,
                 avg_down=True)
    model.init_weights()
    layers = [m for m in model.modules() if isinstance(m, LESA)]
    assert len(layers) == 3 + 4 + 6 + 3  # every block of every stage
    assert all(m.pe_type == pe_type and m.with_cp for m in layers)
    assert isinstance(model.layer1[0].conv2.unary.conv, DeformConv2dPack)
    assert model.layer2[0].conv2.stride == 2
    assert model.layer2[0].conv2.feat_size == (24, 24)  # attends, pools
    x = torch.randn(1, 3, 96, 96)
    outs = model.train()(x)
    assert [o.shape[1:] for o in outs] == [(64, 24, 24), (128, 12, 12),
                                           (256, 6, 6), (512, 3, 3)]
    sum(o.mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize('cls', [LESAResNet, LESAResNeXt])
def test_frozen_stages_and_norm_eval_with_lesa_everywhere(cls):
    model = slim(cls, frozen_stages=2, norm_eval=True, deep_stem=True)
    model.train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.layer2.parameters())
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert all(not m.training for m in model.modules()
               if isinstance(m, _BatchNorm))
    # frozen LESA layers keep their statistics through a training step
    before = model.layer1[1].conv2.binary.qkv_norm.running_mean.clone()
    model(torch.randn(1, 3, 96, 96))
    assert torch.equal(model.layer1[1].conv2.binary.qkv_norm.running_mean,
                       before)


def test_resnext_lesa_keeps_the_block_width_and_its_own_heads():
    model = LESAResNeXt(depth=50, groups=32, base_width=4)
    plain, lesa = model.layer3[0], model.layer3[1]
    assert plain.conv2.groups == 32 and plain.conv2.in_channels == 512
    assert isinstance(lesa.conv2, LESA)
    assert lesa.conv2.in_channels == lesa.conv2.out_channels == 512
    assert lesa.conv1.out_channels == 512 and lesa.conv3.in_channels == 512
    # heads and unary groups are lesa_groups, not the cardinality
    assert lesa.conv2.groups == 8
    assert lesa.conv2.unary.conv.groups == 8
    assert model.layer4[0].conv2.in_channels == 1024
    with pytest.raises(ValueError, match='width_per_group'):
        LESAResNeXt(width_per_group=128)
    with pytest.raises(ValueError, match='groups must be an int >= 1'):
        LESAResNeXt(groups=0)


def test_resnext_loads_a_stock_checkpoint_into_its_non_lesa_parts():
    stock = ResNeXt(depth=50, groups=32, base_width=4).state_dict()
    model = LESAResNeXt(depth=50, strides=(1, 2, 2, 2),
                        feat_sizes=(16, 8, 4, 2), pe_type='detection_qr')
    result = model.load_state_dict(stock, strict=False)
    lesa = {n for n, m in model.named_modules() if isinstance(m, LESA)}
    assert all(any(k.startswith(n + '.') for n in lesa)
               for k in result.missing_keys)
    # the ordinary 3x3 convs of the LESA blocks have no place in the model
    assert all(k.startswith(tuple(n[:-len('conv2')] for n in lesa))
               for k in result.unexpected_keys)
    torch.testing.assert_close(model.layer3[0].conv2.weight,
                               stock['layer3.0.conv2.weight'])


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_resnext_in_both_registries(scope):
    registry = importlib.import_module(f'{scope}.registry').MODELS
    assert registry.get('LESAResNeXt') is LESAResNeXt
    model = registry.build(dict(type='LESAResNeXt', depth=50,
                                stage_with_lesa=(False, ) * 4))
    assert isinstance(model, LESAResNeXt)


def test_depth_152():
    model = LESAResNet(depth=152)
    assert [len(getattr(model, f'layer{i}')) for i in (1, 2, 3, 4)] == \
        [3, 8, 36, 3]
    assert sum(isinstance(m, LESA) for m in model.modules()) == 35 + 3


def test_layer_depth_for_layer_wise_lr_decay():
    """``get_layer_depth`` gives every parameter the layer id MMPretrain's
    ResNet gives the same name (LESA parameters take their block's), and
    MMPretrain's ``LearningRateDecayOptimWrapperConstructor`` builds an
    ImageClassifier with a LESA backbone: deeper parameters get larger
    learning rates."""
    from mmengine.registry import init_default_scope
    from mmpretrain.models.backbones import ResNet as PretrainResNet
    from mmpretrain.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
    stock = PretrainResNet(depth=50, base_channels=16, stem_channels=16)
    ours = LESAResNet(depth=50, base_channels=16, stem_channels=16,
                      feat_sizes=(16, 8, 4, 4))
    for name, _ in ours.named_parameters():
        stock_name = name if '.conv2.' not in name else \
            name.split('.conv2.')[0] + '.conv2.weight'
        assert ours.get_layer_depth('backbone.' + name, 'backbone.') == \
            stock.get_layer_depth('backbone.' + stock_name, 'backbone.'), name
    assert ours.get_layer_depth('head.fc.weight', 'backbone.') == (7, 8)
    init_default_scope('mmpretrain')
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='LESAResNet', depth=50, base_channels=16,
                      stem_channels=16, feat_sizes=(16, 8, 4, 4)),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=512)))
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='LearningRateDecayOptimWrapperConstructor',
        optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=dict(
            type='SGD', lr=0.1, weight_decay=1e-4)),
        paramwise_cfg=dict(layer_decay_rate=0.5)))
    groups = constructor(model).optimizer.param_groups
    lr = {id(p): group['lr'] for group in groups for p in group['params']}
    stem = lr[id(model.backbone.conv1.weight)]
    attention = lr[id(model.backbone.layer3[1].conv2.binary.qkv.weight)]
    head = lr[id(model.head.fc.weight)]
    assert stem < attention < head == 0.1
    assert attention == lr[id(model.backbone.layer3[1].conv1.weight)]


def test_lesa_in_dilated_stages_dilates_its_unary_conv():
    """A dilated stage (stride 1, dilation d) keeps its resolution; its LESA
    layers are built for that size and dilate their unary 3x3 by d, as the
    ordinary 3x3s are."""
    model = slim(LESAResNet, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                 feat_sizes=None, input_size=64,
                 dcn=None, stage_with_dcn=(False, ) * 4)
    for stage, dilation in zip((1, 2, 3, 4), (1, 1, 2, 4)):
        for b, block in enumerate(getattr(model, f'layer{stage}')):
            # stage outputs 16, 8, 8, 8; the strided block attends at 16
            side = 16 if stage == 1 or (stage, b) == (2, 0) else 8
            assert block.conv2.feat_size == (side, side)
            assert block.conv2.unary.conv.dilation == (dilation, dilation)
            assert block.conv2.unary.conv.padding == (dilation, dilation)
    outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16), (8, 8), (8, 8),
                                                   (8, 8)]


def test_caffe_style_strides_the_first_conv_and_lesa_attends_after_it():
    model = slim(LESAResNet, style='caffe', dcn=None,
                 stage_with_dcn=(False, ) * 4)
    block = model.layer3[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == 1
    assert block.conv2.pool is None
    assert block.conv2.feat_size == (6, 6)  # the stage's output size
    outs = model.eval()(torch.randn(1, 3, 96, 96))
    assert [tuple(o.shape[2:]) for o in outs] == [(24, 24), (12, 12), (6, 6),
                                                   (3, 3)]


@pytest.mark.parametrize('cls', [LESAResNet, LESAResNeXt])
def test_plugins_around_lesa_layers(cls):
    """Plugins sit after conv1, after the LESA layer and after conv3, at the
    bottleneck width, and run in the forward pass."""
    extra = dict(width_per_group=128) if cls is LESAResNet else {}
    model = slim(cls, plugins=PLUGINS, dcn=None,
                 stage_with_dcn=(False, ) * 4, **extra)
    block = model.layer3[1]
    assert isinstance(block.conv2, LESA)
    after_lesa = getattr(block, block.after_conv2_plugin_names[0])
    # stage 3: planes 64, width 128 (WRN-50-2; ResNeXt 8x4d at base 16)
    assert after_lesa.in_channels == block.conv2.out_channels == \
        block.conv1.out_channels == 128
    calls = []
    after_lesa.register_forward_hook(lambda *args: calls.append(1))
    model.eval()(torch.randn(1, 3, 96, 96))
    assert calls == [1]
