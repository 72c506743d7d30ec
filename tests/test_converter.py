"""The converter on synthetic checkpoints in the reference layout."""
import os

import pytest
import torch
import torchvision
from mmengine.runner import load_checkpoint

from conftest import REPO_ROOT, load_tool
from lesa_mm.utils import build_model_from_config, check_against_model
from spec_reference import reference_state_dict

CFG_R50 = os.path.join(REPO_ROOT, 'configs/lesa/lesa-resnet50_4xb32_in1k.py')
CFG_WRN = os.path.join(REPO_ROOT, 'configs/lesa/lesa-wrn50_4xb32_in1k.py')


tool = load_tool('tools/model_converters/lesa_official_to_mm.py')


def reference_classifier_checkpoint(wide=False, wrap='net', prefix='module.'):
    """A LESA-ResNet-50 classifier in the authors' layout: torchvision names,
    LESA layers in blocks layer3.1-5 and layer4.0-2, feature size 14."""
    factory = (torchvision.models.wide_resnet50_2
               if wide else torchvision.models.resnet50)
    sd = factory(weights=None).state_dict()
    lesa_blocks = [f'layer3.{i}' for i in range(1, 6)] + [
        f'layer4.{i}' for i in range(3)]
    for seed, block in enumerate(lesa_blocks):
        width = sd[f'{block}.conv2.weight'].shape[0]
        cin = sd[f'{block}.conv2.weight'].shape[1]
        for key in [k for k in sd if k.startswith((f'{block}.conv2.',
                                                   f'{block}.bn2.'))]:
            del sd[key]
        for key, value in reference_state_dict(
                cin, width, 8, 'classification', 14, seed=seed).items():
            sd[f'{block}.conv2.{key}'] = value
    sd = {prefix + k: v for k, v in sd.items()}
    return {wrap: sd, 'epoch': 94} if wrap else sd


@pytest.mark.parametrize('wrap,prefix', [('net', 'module.'), (None, '')])
def test_classifier_round_trip_loads_strictly(tmp_path, wrap, prefix):
    src = tmp_path / 'ref.pth'
    ref = reference_classifier_checkpoint(wrap=wrap, prefix=prefix)
    torch.save(ref, src)
    dst = tmp_path / 'mm.pth'
    tool.main([str(src), str(dst), '--config', CFG_R50])
    model = build_model_from_config(CFG_R50)
    load_checkpoint(model, str(dst), strict=True, map_location='cpu')
    ref_sd = ref['net'] if wrap else ref
    torch.testing.assert_close(
        model.backbone.layer3[2].conv2.binary.qkv.weight,
        ref_sd[prefix + 'layer3.2.conv2.qkv_transform.weight'].unsqueeze(-1))
    torch.testing.assert_close(
        model.backbone.layer4[0].conv2.binary.position.relative,
        ref_sd[prefix + 'layer4.0.conv2.relative'])
    torch.testing.assert_close(model.head.fc.weight, ref_sd[prefix + 'fc.weight'])
    torch.testing.assert_close(model.backbone.layer1[0].conv2.weight,
                               ref_sd[prefix + 'layer1.0.conv2.weight'])


def test_wrn_round_trip_fits_model():
    converted = tool.convert(reference_classifier_checkpoint(wide=True))
    check_against_model(converted, build_model_from_config(CFG_WRN))


def test_lone_layer_keys():
    sd = reference_state_dict(16, 32, 4, 'detection_qr', 6, dcn=True)
    converted = tool.convert(sd)
    assert converted['binary.qkv.weight'].shape == (64, 16, 1, 1)
    assert set(converted) == {
        'binary.qkv.weight', 'binary.position.rel_height',
        'binary.position.rel_width', 'unary.conv.weight',
        'unary.conv.conv_offset.weight', 'unary.conv.conv_offset.bias',
        'unary.pointwise.weight', 'fusion.reason_conv.weight',
        'fusion.gate_conv.weight'
    } | {
        f'{m}.{s}' for m in ('binary.qkv_norm', 'binary.logit_norm',
                             'binary.out_norm', 'unary.norm',
                             'fusion.reason_norm', 'fusion.gate_norm')
        for s in ('weight', 'bias', 'running_mean', 'running_var',
                  'num_batches_tracked')
    }
    # module. prefixes and a 'net' wrapper are accepted for a lone layer too
    wrapped = {'net': {'module.' + k: v for k, v in sd.items()}}
    assert list(tool.convert(wrapped)) == list(converted)


def test_unknown_keys_are_reported_by_name():
    ref = reference_classifier_checkpoint()
    ref['net']['module.layer3.1.conv2.mystery'] = torch.zeros(1)
    ref['net']['module.aux_head.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"layer3\.1\.conv2\.mystery.*"
                       r"aux_head\.weight"):
        tool.convert(ref)


def test_shape_mismatch_is_reported_by_name(tmp_path):
    ref = reference_classifier_checkpoint()
    ref['net']['module.layer4.1.conv2.relative'] = torch.zeros(128, 100)
    src, dst = tmp_path / 'ref.pth', tmp_path / 'mm.pth'
    torch.save(ref, src)
    with pytest.raises(ValueError, match=r'layer4\.1\.conv2\.binary\.position'
                       r'\.relative: checkpoint \(128, 100\)'):
        tool.main([str(src), str(dst), '--config', CFG_R50])
    assert not dst.exists()


def test_missing_keys_are_reported_by_name():
    ref = reference_classifier_checkpoint()
    del ref['net']['module.layer3.4.conv2.bn_x.weight']
    converted = tool.convert(ref)
    with pytest.raises(ValueError, match=r'missing keys.*layer3\.4\.conv2\.'
                       r'unary\.norm\.weight'):
        check_against_model(converted, build_model_from_config(CFG_R50))
