"""Detection configs: builds, one training iteration and one inference pass
at a small input (feature sizes matched), ImageNet-to-COCO transfer."""
import glob
import os

import pytest
import torch
from mmengine.config import Config

from conftest import (REPO_ROOT, classification_checkpoint,
                      detection_backbone)
from lesa_mm.models import LESA, LESAResNet
from lesa_mm.utils import build_model_from_config
from lesa_mm.utils.launch import load_config
from lesa_mm.utils.transfer import transfer_state_dict

# every config a user runs (the _base_ files are fragments)
ALL_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(REPO_ROOT, 'configs', '**', '*.py'),
                         recursive=True)
    if '_base_' not in p.split(os.sep) and 'deploy' not in p.split(os.sep))
DET_CONFIGS = ['configs/lesa/mask-rcnn_lesa-r50.py',
               'configs/lesa/htc_lesa-wrn50.py',
               'configs/lesa/mask-rcnn_lesa-r50_keep-ratio.py']
# the detection_qr ImageNet config that pre-trains each detector's backbone,
# and the checkpoint path the detector expects it at
QR_PRETRAINING = {
    'configs/lesa/mask-rcnn_lesa-r50.py':
    ('configs/lesa/lesa-resnet50-qr_4xb32_in1k.py',
     'checkpoints/lesa-resnet50-qr_in1k.pth'),
    'configs/lesa/htc_lesa-wrn50.py':
    ('configs/lesa/lesa-wrn50-qr_4xb32_in1k.py',
     'checkpoints/lesa-wrn50-qr_in1k.pth'),
    'configs/lesa/mask-rcnn_lesa-r50_keep-ratio.py':
    ('configs/lesa/lesa-resnet50-qr_4xb32_in1k.py',
     'checkpoints/lesa-resnet50-qr_in1k.pth'),
}


@pytest.mark.parametrize('path', ALL_CONFIGS,
                         ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_every_shipped_config_builds(path):
    model = build_model_from_config(path)
    # LESAResNet, or the stock ResNet of a convolution baseline
    assert type(model.backbone).__name__ == \
        Config.fromfile(path).model.backbone.type
    assert isinstance(model.backbone, LESAResNet) or 'baselines' in path \
        or 'slim_shapes' in path


def test_mask_rcnn_reference_recipe():
    cfg = Config.fromfile(os.path.join(REPO_ROOT, DET_CONFIGS[0]))
    bb = cfg.model.backbone
    assert bb.strides == (1, 2, 2, 2) and bb.pe_type == 'detection_qr'
    assert bb.feat_sizes == (256, 128, 64, 32) and bb.with_cp
    assert bb.stage_with_dcn == (False, True, True, True)
    assert bb.dcn.deform_groups == 1
    assert bb.init_cfg.type == 'LESATransfer'  # fresh tables, as the authors
    resize = cfg.train_dataloader.dataset.pipeline[2]
    assert resize.scale == (1024, 1024) and resize.keep_ratio is False
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    opt = cfg.optim_wrapper.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.01, 0.9, 1e-4)
    assert cfg.train_dataloader.batch_size == 1
    warmup, steps = cfg.param_scheduler
    assert (warmup.end, warmup.start_factor) == (500, 0.001)
    assert steps.milestones == [16, 19] and cfg.train_cfg.max_epochs == 20
    assert cfg.auto_scale_lr.base_batch_size == 8
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    model = build_model_from_config(cfg)
    lesa = model.backbone.layer4[0].conv2
    assert isinstance(lesa, LESA) and lesa.feat_size == (64, 64)
    assert type(lesa.unary.conv).__name__ == 'DeformConv2dPack'


def test_keep_ratio_recipe():
    cfg = Config.fromfile(os.path.join(REPO_ROOT, DET_CONFIGS[2]))
    resize = cfg.train_dataloader.dataset.pipeline[2]
    assert resize.scale == (1333, 800) and resize.keep_ratio is True
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.optim_wrapper.optimizer.lr == 0.02


def small_detector(path, size=128):
    cfg = Config.fromfile(os.path.join(REPO_ROOT, path))
    cfg.model.backbone.feat_sizes = tuple(size // s for s in (4, 8, 16, 32))
    cfg.model.backbone.init_cfg = None
    return build_model_from_config(cfg)


@pytest.mark.parametrize('path', DET_CONFIGS)
def test_detector_train_iteration_and_inference(path):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = small_detector(path)
    htc = 'htc' in path
    # keep-ratio inputs are not square
    shape = (3, 96, 128) if 'keep-ratio' in path else (3, 128, 128)
    data = demo_mm_inputs(2, image_shapes=shape, num_items=[2, 3],
                          num_classes=80, with_mask=True, with_semantic=htc)
    model.train()
    batch = model.data_preprocessor(data, True)
    losses = model(**batch, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    lesa_grad = model.backbone.layer3[1].conv2.binary.qkv.weight.grad
    assert lesa_grad is not None and lesa_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(data, False),
                        mode='predict')
    assert len(results) == 2
    assert results[0].pred_instances.bboxes.shape[-1] == 4


def test_imagenet_to_coco_transfer(tmp_path):
    source, path = classification_checkpoint(tmp_path)
    det = detection_backbone(
        init_cfg=dict(type='Pretrained', checkpoint=path))
    torch.manual_seed(5)
    det.init_weights()
    src = source.state_dict()
    dst = det.state_dict()
    # ordinary weights are carried over
    torch.testing.assert_close(dst['layer1.0.conv2.weight'],
                               src['layer1.0.conv2.weight'])
    torch.testing.assert_close(dst['layer3.1.conv2.unary.conv.weight'],
                               src['layer3.1.conv2.unary.conv.weight'])
    key = 'layer4.1.conv2.binary'
    groups = 8
    # content-logit norm kept, position-logit norm re-initialised
    torch.testing.assert_close(dst[f'{key}.logit_norm.running_mean'][:groups],
                               src[f'{key}.logit_norm.running_mean'][:groups])
    assert torch.all(dst[f'{key}.logit_norm.running_mean'][groups:] == 0)
    assert torch.all(dst[f'{key}.logit_norm.weight'][groups:] == 1)
    # value channels of the interleaved output norm
    torch.testing.assert_close(dst[f'{key}.out_norm.weight'],
                               src[f'{key}.out_norm.weight'][0::2])
    # 2-D tables freshly initialised, offsets zero
    assert dst[f'{key}.position.rel_height'].std() > 0
    assert torch.all(dst['layer2.0.conv2.conv_offset.weight'] == 0)


def test_transfer_report_and_errors(tmp_path):
    source, path = classification_checkpoint(tmp_path)
    target = detection_backbone()
    _, report = transfer_state_dict(torch.load(path), target)
    text = '\n'.join(report)
    assert 'dropped 2 keys outside the backbone' in text
    assert 're-initialised the position tables of 8 LESA layers' in text
    assert 'position-logit norm of 8 LESA layers' in text
    assert 'even channels' in text
    assert 'zero-initialised' in text
    # anything else that does not fit is an error naming the key
    bad = torch.load(path)
    bad['state_dict']['backbone.layer2.0.conv1.weight'] = torch.zeros(3, 3)
    del bad['state_dict']['backbone.layer1.1.bn2.bias']
    with pytest.raises(ValueError, match=r'layer1\.1\.bn2\.bias: missing.*'
                       r'layer2\.0\.conv1\.weight: checkpoint \(3, 3\)'):
        transfer_state_dict(bad, target)


@pytest.mark.parametrize('det_path', DET_CONFIGS)
def test_detectors_start_from_detection_qr_imagenet_models(det_path):
    imagenet_path, checkpoint = QR_PRETRAINING[det_path]
    det = Config.fromfile(os.path.join(REPO_ROOT, det_path)).model.backbone
    assert det.init_cfg == dict(type='LESATransfer',
                                checkpoint=checkpoint)
    # the checkpoint is named after the config that trains it
    assert os.path.basename(imagenet_path).replace('_4xb32', '') == \
        os.path.basename(checkpoint).replace('.pth', '.py')
    cls = Config.fromfile(os.path.join(REPO_ROOT, imagenet_path)).model
    assert cls.backbone.pe_type == det.pe_type == 'detection_qr'
    # same network apart from what detection changes
    for key in ('depth', 'width_per_group', 'stage_with_lesa',
                'stage_with_first_conv', 'lesa_groups'):
        assert cls.backbone.get(key, LESA_RESNET_DEFAULTS[key]) == \
            det.get(key, LESA_RESNET_DEFAULTS[key]), key


LESA_RESNET_DEFAULTS = dict(depth=50, width_per_group=64,
                            stage_with_lesa=(False, False, True, True),
                            stage_with_first_conv=(True, True, True, False),
                            lesa_groups=8)


def small_qr_imagenet_checkpoint(tmp_path, imagenet_path, width=16):
    """A slim classifier built from a detection_qr ImageNet config (64x64
    inputs: LESA maps 4x4), every tensor random, saved as MMPretrain does."""
    cfg = Config.fromfile(os.path.join(REPO_ROOT, imagenet_path))
    cfg.model.backbone.update(stem_channels=width, base_channels=width,
                              feat_sizes=(16, 8, 4, 4))
    cfg.model.head.update(num_classes=3, in_channels=width * 32)
    model = build_model_from_config(cfg)
    torch.manual_seed(2)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.uniform_(0.5, 1.5)
    path = tmp_path / 'qr_in1k.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return model.backbone.state_dict(), str(path)


@pytest.mark.parametrize('det_path', DET_CONFIGS[:2])
def test_detector_from_detection_qr_imagenet_checkpoint(tmp_path, det_path):
    """The detector's backbone, initialised through its config's init path
    from a detection_qr ImageNet checkpoint, equals the checkpoint in every
    tensor except the position tables (trained for 4x4 maps, here 16x16 and
    8x8) and the deformable offsets an ImageNet model lacks; the log says
    so."""
    from mmengine.logging import MMLogger
    imagenet_path, _ = QR_PRETRAINING[det_path]
    src, path = small_qr_imagenet_checkpoint(tmp_path, imagenet_path)
    cfg = Config.fromfile(os.path.join(REPO_ROOT, det_path))
    backbone_cfg = cfg.model.backbone.to_dict()
    assert backbone_cfg.pop('type') == 'LESAResNet'
    backbone_cfg.update(stem_channels=16, base_channels=16,
                        feat_sizes=(64, 32, 16, 8))  # 256x256 inputs
    backbone_cfg['init_cfg']['checkpoint'] = path
    det = LESAResNet(**backbone_cfg)
    log_file = tmp_path / 'transfer.log'
    # the current logger, which the transfer logs to
    MMLogger.get_instance(str(log_file), log_file=str(log_file))
    det.init_weights()

    dst = det.state_dict()
    tables = [k for k in dst if '.binary.position.' in k]
    offsets = [k for k in dst if '.conv_offset.' in k]
    assert len(tables) == 16 and len(offsets) == 2 * (4 + 6 + 3)
    assert sorted(src) == sorted(set(dst) - set(offsets))
    unchanged = 0
    for key, value in dst.items():
        if key in tables:  # fresh tables of the detector's sizes
            assert value.shape[0] in (2 * 16 - 1, 2 * 8 - 1), key
            assert src[key].shape[0] == 2 * 4 - 1, key
            assert 0.1 < value.std() / value.shape[1]**-0.5 < 10, key
        elif key in offsets:
            assert torch.all(value == 0), key
        else:
            assert torch.equal(value, src[key]), key
            unchanged += 1
    # the loaded backbone runs (positions re-read at the detector's size)
    det.eval()
    with torch.no_grad():
        outs = det(torch.randn(1, 3, 256, 256))
    assert [o.shape[-1] for o in outs] == [64, 32, 16, 8]

    log = log_file.read_text()
    assert ('WARNING -   - re-initialised 16 trained position tables of 8 '
            'LESA layers at the model\'s feature sizes, as the LESA '
            'transfer recipe does (LESATransfer): '
            'layer3.1.conv2.binary.position.rel_height, ') in log
    assert 'zero-initialised 26 deformable-conv offset tensors' in log
    assert 'dropped 2 keys outside the backbone' in log
    assert (f'loaded {unchanged} of {len(dst)} tensors unchanged from the '
            f'checkpoint: every tensor of the model except its position '
            f'tables and deformable-conv offsets') in log
    # nothing of the classification-checkpoint adaptation
    assert 'logit norm' not in log and 'even channels' not in log


def test_full_size_qr_transfer_reinitialises_only_the_tables():
    """At the real sizes (ImageNet 14x14 LESA maps, Mask R-CNN 64x64 and
    32x32), the ImageNet qr backbone fits the detector's in every tensor but
    the position tables and the deformable offsets."""
    imagenet_path, _ = QR_PRETRAINING[DET_CONFIGS[0]]
    src = build_model_from_config(
        os.path.join(REPO_ROOT, imagenet_path)).backbone
    cfg = Config.fromfile(os.path.join(REPO_ROOT, DET_CONFIGS[0]))
    cfg.model.backbone.init_cfg = None
    det = build_model_from_config(cfg).backbone
    src = src.state_dict()
    state, report = transfer_state_dict(src, det, position_tables='reinit')
    tables = [k for k in state if '.binary.position.' in k]
    assert len(tables) == 16
    for key, value in state.items():
        if key in tables:
            assert src[key].shape[0] == 2 * 14 - 1
            assert value.shape[0] in (2 * 64 - 1, 2 * 32 - 1)
        elif '.conv_offset.' not in key:
            assert value.data_ptr() == src[key].data_ptr(), key
    assert report[-1].endswith('every tensor of the model except its '
                               'position tables and deformable-conv offsets')


def test_missing_pretrained_checkpoint_is_named():
    det = detection_backbone(
        init_cfg=dict(type='Pretrained', checkpoint='nowhere/lesa.pth'))
    with pytest.raises(FileNotFoundError, match='nowhere/lesa.pth'):
        det.init_weights()


def test_missing_coco_names_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r'(?s)instances_train2017\.json.*train2017/'):
        load_config(os.path.join(REPO_ROOT, DET_CONFIGS[0]),
                    {'train_dataloader.dataset.data_root': str(tmp_path)})


def test_missing_imagenet_names_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'(?s)imagenet.*train/n0'):
        load_config(
            os.path.join(REPO_ROOT, 'configs/lesa/lesa-resnet50_4xb32_in1k.py'),
            {'train_dataloader.dataset.data_root': str(tmp_path)})
