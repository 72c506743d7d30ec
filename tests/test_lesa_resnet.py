import pytest
import torch
import torchvision
from mmcv.ops import DeformConv2dPack
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import classification_checkpoint, detection_backbone
from lesa_mm.models import LESA, LESAResNet

DET_SMALL = dict(strides=(1, 2, 2, 2), feat_sizes=(16, 8, 4, 2),
                 pe_type='detection_qr', out_indices=(0, 1, 2, 3))


def lesa_blocks(model):
    return {name[:-len('.conv2')] for name, m in model.named_modules()
            if isinstance(m, LESA)}


def test_reference_lesa_placement():
    model = LESAResNet(depth=50)
    # stages 3-4 use LESA; the first block of stage 3 keeps its 3x3 conv
    expected = {f'layer3.{i}' for i in range(1, 6)} | {
        f'layer4.{i}' for i in range(3)}
    assert lesa_blocks(model) == expected
    sizes = {name: model.get_submodule(name + '.conv2').feat_size
             for name in expected}
    assert set(sizes.values()) == {(14, 14)}
    # LESA normalises its output: a LESA block's bn2 is a stateless identity
    state = model.state_dict()
    assert not any(k.startswith('layer3.1.bn2.') for k in state)
    assert isinstance(model.layer3[1].bn2, torch.nn.Identity)
    assert 'layer3.0.bn2.weight' in state


def test_classification_output_shape_and_stride():
    model = LESAResNet(depth=50).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert len(out) == 1 and out[0].shape == (1, 2048, 14, 14)


def test_detection_output_shapes_and_strided_lesa():
    model = LESAResNet(depth=50, **DET_SMALL).eval()
    # first block of stage 4 is a strided LESA attending at 2 * 2 = 4
    first = model.layer4[0].conv2
    assert isinstance(first, LESA) and first.stride == 2
    assert first.feat_size == (4, 4)
    assert model.layer4[1].conv2.feat_size == (2, 2)
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 256, 16, 16),
                                              (2, 512, 8, 8),
                                              (2, 1024, 4, 4),
                                              (2, 2048, 2, 2)]


def test_landscape_feat_sizes():
    """Height-and-width feature sizes (a landscape detection input): the
    strided first LESA block of stage 4 attends at twice its output size."""
    model = LESAResNet(depth=50, strides=(1, 2, 2, 2),
                       feat_sizes=((16, 24), (8, 12), (4, 6), (2, 3)),
                       pe_type='detection_qr', out_indices=(3, )).eval()
    assert model.layer4[0].conv2.feat_size == (4, 6)
    assert model.layer4[1].conv2.feat_size == (2, 3)
    assert model.layer3[1].conv2.binary.position.rel_width.shape[0] == 11
    with torch.no_grad():
        out, = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 2048, 2, 3)


def test_detection_train_step_has_gradients_everywhere():
    model = LESAResNet(depth=50, with_cp=True, **DET_SMALL).train()
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(m.with_cp for m in model.modules() if isinstance(m, LESA))


@pytest.mark.parametrize('depth,factory,width', [
    (50, torchvision.models.resnet50, 64),
    (50, torchvision.models.wide_resnet50_2, 128),
    (101, torchvision.models.resnet101, 64),
])
def test_resnet_checkpoint_loads_into_non_lesa_parts(depth, factory, width):
    model = LESAResNet(depth=depth, width_per_group=width)
    tv = factory(weights=None).state_dict()
    tv = {k: v for k, v in tv.items() if not k.startswith('fc.')}
    ours = model.state_dict()
    lesa = lesa_blocks(model)
    in_lesa = lambda k: any(k.startswith(b + '.conv2.') or  # noqa: E731
                            k.startswith(b + '.bn2.') or k == b + '.conv2.weight'
                            for b in lesa)
    shared = [k for k in tv if k in ours]
    assert sorted(k for k in tv if k not in ours and not in_lesa(k)) == []
    assert sorted(k for k in ours if k not in tv and not in_lesa(k)) == []
    for k in shared:
        assert ours[k].shape == tv[k].shape, k
    result = model.load_state_dict({k: tv[k] for k in shared}, strict=False)
    assert all(in_lesa(k) for k in result.missing_keys)
    torch.testing.assert_close(model.layer2[0].conv2.weight,
                               tv['layer2.0.conv2.weight'])


def test_wrn_widths():
    model = LESAResNet(depth=50, width_per_group=128)
    assert model.layer3[1].conv2.out_channels == 512
    assert model.layer3[1].conv3.out_channels == 1024
    assert model.layer1[0].conv1.out_channels == 128


def test_dcn_in_plain_convs_and_lesa_unary():
    model = LESAResNet(
        depth=50, dcn=dict(type='DCN', deform_groups=1,
                           fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True), strides=(1, 2, 2, 2),
        feat_sizes=(32, 16, 8, 4), pe_type='detection_qr',
        out_indices=(0, 1, 2, 3))
    assert not isinstance(model.layer1[0].conv2, DeformConv2dPack)
    assert isinstance(model.layer2[0].conv2, DeformConv2dPack)
    assert isinstance(model.layer3[0].conv2, DeformConv2dPack)
    assert isinstance(model.layer3[1].conv2.unary.conv, DeformConv2dPack)
    assert model.layer3[1].conv2.unary.conv.groups == 8
    assert isinstance(model.layer4[0].conv2.unary.conv, DeformConv2dPack)
    model.init_weights()
    assert torch.all(model.layer3[1].conv2.unary.conv.conv_offset.weight == 0)
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 128, 128))
    assert outs[3].shape == (1, 2048, 4, 4)


def test_frozen_stages_and_norm_eval():
    model = LESAResNet(depth=50, frozen_stages=1, norm_eval=True)
    model.train()
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert all(not m.training for m in model.modules()
               if isinstance(m, _BatchNorm))
    assert model.layer2.training


def test_init_weights_follows_spec():
    model = LESAResNet(depth=50, zero_init_residual=False)
    model.init_weights()
    lesa = model.layer3[1].conv2
    assert lesa.binary.qkv.weight.std().item() == pytest.approx(
        (1 / 256)**0.5, rel=0.05)
    assert torch.all(model.layer1[0].bn3.weight == 1)
    model = LESAResNet(depth=50, zero_init_residual=True)
    model.init_weights()
    assert torch.all(model.layer1[0].bn3.weight == 0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=34), 'depth.*34'),
    (dict(strides=(1, 2, 2)), r'strides.*\(1, 2, 2\)'),
    (dict(feat_sizes=(56, 28)), 'feat_sizes'),
    (dict(stage_with_lesa=(True, )), 'stage_with_lesa'),
    (dict(out_indices=(4, )), r'out_indices.*\(4,\)'),
    (dict(frozen_stages=7), 'frozen_stages.*7'),
    (dict(pe_type='sinusoidal'), "pe_type.*'sinusoidal'"),
    (dict(lesa_groups=7), 'divisible'),
    (dict(strides=(1, 0, 2, 1)), r'strides entry must be an int >= 1, got 0'),
    (dict(strides=(1, 2, -2, 1)), r'strides entry .* got -2'),
    (dict(stem_channels=0), r'stem_channels must be an int >= 1, got 0'),
    (dict(in_channels=0), r'in_channels must be an int >= 1, got 0'),
    (dict(with_cp='yes'), r"with_cp must be True or False, got 'yes'"),
    (dict(norm_eval=1), r'norm_eval must be True or False, got 1'),
    (dict(norm_cfg=dict(type='BNN')), r"norm_cfg type 'BNN' is not a layer"),
    (dict(dcn=dict(type='DCNxx'), stage_with_dcn=(False, True, True, True)),
     r"dcn type 'DCNxx' is not a layer"),
    (dict(dcn='DCN'), r"dcn must be a config dict .* got 'DCN'"),
    (dict(norm_cfg=dict(type='LN')), r"norm_cfg must build a norm over the "
     r"channels.*'LN'"),
])
def test_bad_backbone_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LESAResNet(**kwargs)


def test_attention_layer_is_built_from_the_registry():
    """A downstream project swaps in its own layer by config: the blocks of
    the LESA stages build ``lesa=dict(type=...)`` from MODELS with the
    block's arguments added."""
    from mmengine.registry import MODELS

    calls = []

    class PlainAttention(torch.nn.Module):

        def __init__(self, in_channels, out_channels, feat_size, groups,
                     stride, pe_type, dcn, with_cp, norm_cfg, attn_impl,
                     scale=1.0):
            super().__init__()
            calls.append(dict(in_channels=in_channels, stride=stride,
                              feat_size=feat_size, groups=groups,
                              scale=scale))
            self.conv = torch.nn.Conv2d(in_channels, out_channels, 3,
                                        stride=stride, padding=1)

        def forward(self, x):
            return self.conv(x)

    MODELS.register_module('PlainAttentionForTest', module=PlainAttention,
                           force=True)
    model = LESAResNet(lesa=dict(type='PlainAttentionForTest', scale=2.0),
                       base_channels=16, stem_channels=16, lesa_groups=2)
    convs = [m for m in model.modules() if isinstance(m, PlainAttention)]
    # stage 3: blocks 2-6 (the first keeps its conv); stage 4: all 3
    assert len(convs) == 5 + 3
    assert calls[0] == dict(in_channels=64, stride=1, feat_size=(14, 14),
                            groups=2, scale=2.0)
    assert calls[5] == dict(in_channels=128, stride=1, feat_size=(14, 14),
                            groups=2, scale=2.0)
    assert model.eval()(torch.randn(1, 3, 224, 224))[0].shape == \
        (1, 512, 14, 14)
    with pytest.raises(ValueError, match="lesa type 'NoSuchAttention'"):
        LESAResNet(lesa=dict(type='NoSuchAttention'))


def test_int_out_indices_and_numpy_ints_are_accepted():
    import numpy as np
    model = LESAResNet(depth=50, out_indices=np.int64(2),
                       base_channels=np.int64(16), stem_channels=16,
                       stage_with_lesa=(False, False, False, False)).eval()
    assert model.out_indices == (2, )
    with torch.no_grad():
        (out, ) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 256, 4, 4)


def test_classification_backbone_rejects_other_sizes():
    model = LESAResNet(depth=50).eval()
    with pytest.raises(ValueError, match='trained feature size 14x14'):
        with torch.no_grad():
            model(torch.randn(1, 3, 192, 192))


def test_init_weights_initialises_ordinary_layers_once_and_not_lesa():
    """The backbone initialises its own convolutions and norms; the LESA
    layers keep the initialisation they gave themselves when built (their
    ``init_weights`` is not called without their own ``init_cfg``)."""
    from unittest import mock
    model = LESAResNet(depth=50, base_channels=16, stem_channels=16,
                       lesa_groups=2)
    lesa_state = {k: v.clone() for k, v in model.state_dict().items()
                  if '.conv2.' in k and lesa_blocks(model) & {
                      k.split('.conv2.')[0]}}
    assert lesa_state
    with torch.no_grad():
        model.layer1[0].conv1.weight.zero_()
        model.layer1[0].bn1.weight.zero_()
    with mock.patch.object(LESA, 'init_weights') as lesa_init, \
            mock.patch('lesa_mm.models.utils.kaiming_init',
                       wraps=__import__(
                           'mmengine.model.weight_init',
                           fromlist=['kaiming_init']).kaiming_init) as kaiming:
        model.init_weights()
    assert lesa_init.call_count == 0
    state = model.state_dict()
    for key, value in lesa_state.items():
        assert torch.equal(state[key], value), key
    # every ordinary Conv2d exactly once, none inside a LESA layer
    inited = [call.args[0] for call in kaiming.call_args_list]
    ordinary = [m for name, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d)
                and not any(name.startswith(b + '.conv2.')
                            for b in lesa_blocks(model))]
    assert len(inited) == len(ordinary) == len({id(m) for m in inited})
    assert {id(m) for m in inited} == {id(m) for m in ordinary}
    assert model.layer1[0].conv1.weight.std() > 0
    assert torch.all(model.layer1[0].bn1.weight == 1)


def test_plain_load_state_dict_adapts_as_pretrained_and_load_from(tmp_path):
    """A classification ImageNet checkpoint reaches a detection_qr backbone
    identically by init_cfg=Pretrained, by model.load_state_dict (strict)
    and by MMEngine's load_checkpoint into a detector (a runner's
    load_from): the load_state_dict pre-hook adapts it each time."""
    from mmengine.logging import MMLogger
    from mmengine.runner import load_checkpoint
    source, path = classification_checkpoint(tmp_path)
    log_file = tmp_path / 'load.log'
    MMLogger.get_instance('test_adapt_on_load', log_file=str(log_file))

    pretrained = detection_backbone(
        seed=7, init_cfg=dict(type='Pretrained', checkpoint=path))
    pretrained.init_weights()

    plain = detection_backbone(seed=7)
    plain.load_state_dict(torch.load(path)['state_dict'], strict=True)

    detector = torch.nn.Module()
    detector.backbone = detection_backbone(seed=7)
    load_checkpoint(detector, path, strict=False)  # keys under backbone.

    expected = pretrained.state_dict()
    for model in (plain, detector.backbone):
        state = model.state_dict()
        assert list(state) == list(expected)
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
    # adapted: position-logit norm fresh, value channels of the out norm
    key = 'layer4.1.conv2.binary'
    torch.testing.assert_close(
        expected[f'{key}.out_norm.weight'],
        source.state_dict()[f'{key}.out_norm.weight'][0::2])
    assert torch.all(expected['layer2.0.conv2.conv_offset.weight'] == 0)
    log = log_file.read_text()
    # a WARNING (MMEngine's logger shows a repeated one once)
    assert log.count('WARNING -   - kept the content-logit norm and '
                     're-initialised the position-logit norm of 8 LESA '
                     'layers') == 1
    assert log.count('adapted the checkpoint on load') == 3
    assert log.count('dropped 2 keys outside the backbone') == 2
    # the caller's state dict is not modified
    assert 'head.fc.weight' in torch.load(path)['state_dict']


def test_load_state_dict_of_a_fitting_state_is_untouched(tmp_path):
    """A state dict that fits is loaded as it is, without a report; one
    that does not fit for a reason the transfer does not cover is left to
    load_state_dict, which names the key."""
    from mmengine.logging import MMLogger
    log_file = tmp_path / 'load.log'
    MMLogger.get_instance('test_fitting_state', log_file=str(log_file))
    model = detection_backbone(seed=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        state['layer3.1.conv2.binary.position.rel_height'].add_(1)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer3[1].conv2.binary.position.rel_height,
                       state['layer3.1.conv2.binary.position.rel_height'])
    assert 'adapted the checkpoint' not in log_file.read_text()
    bad = dict(state)
    bad['layer2.0.conv1.weight'] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r'layer2\.0\.conv1\.weight'):
        model.load_state_dict(bad, strict=True)
    del bad['layer2.0.conv1.weight']
    result = model.load_state_dict(bad, strict=False)
    assert result.missing_keys == ['layer2.0.conv1.weight']


@pytest.mark.parametrize('strides', [(1, 2, 2, 1), (1, 2, 2, 2)])
def test_input_size_gives_each_stage_its_size(strides):
    """``input_size`` derives each stage's feature size; the derived sizes
    are the stages' real output sizes (odd sides included), and the LESA
    layers' tables are built for them."""
    from lesa_mm.models.backbones.arguments import stage_sizes
    for size in [(97, 161), (33, 47), (224, 224), (7, 1), (257, 255)]:
        model = LESAResNet(depth=50, stem_channels=8, base_channels=8,
                           strides=strides, input_size=size,
                           pe_type='detection_qr', out_indices=(0, 1, 2, 3))
        model.eval()
        with torch.no_grad():
            outs = model(torch.randn(1, 3, *size))
        assert [tuple(o.shape[-2:]) for o in outs] == list(
            stage_sizes(size, strides))
        last = model.layer4[-1].conv2
        assert last.feat_size == stage_sizes(size, strides)[3]
    assert LESAResNet(depth=50, base_channels=8, stem_channels=8).layer4[
        1].conv2.feat_size == (14, 14)  # the default: 224
    with pytest.raises(ValueError, match='feat_sizes or input_size, not both'):
        LESAResNet(depth=50, input_size=224, feat_sizes=(56, 28, 14, 14))
    with pytest.raises(ValueError, match=r'input_size must be an int or '
                       r'\(height, width\).*got 0'):
        LESAResNet(depth=50, input_size=0)
