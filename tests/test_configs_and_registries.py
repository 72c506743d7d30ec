import os
import textwrap

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

from conftest import REPO_ROOT
from lesa_mm.models import LESAResNet, LESAResNeXt
from lesa_mm.utils import build_model_from_config

IN1K_CONFIGS = {
    'configs/lesa/lesa-resnet50_4xb32_in1k.py': 23_777_512,
    'configs/lesa/lesa-wrn50_4xb32_in1k.py': 61_145_896,
    # 'detection_qr' pre-training of the detection backbones: 2-D tables
    # for 14x14 maps, 2g logit-norm and C output-norm channels
    'configs/lesa/lesa-resnet50-qr_4xb32_in1k.py': 23_505_992,
    'configs/lesa/lesa-wrn50-qr_4xb32_in1k.py': 60_602_984,
    # LESAResNeXt: LESA layers 512 and 1024 wide, as in WRN-50-2, in place
    # of grouped 3x3s (stock ResNeXt-50 32x4d: 25,028,904)
    'configs/lesa/lesa-resnext50-32x4d_4xb32_in1k.py': 56_146_216,
}
# each detection_qr ImageNet config and the classification config it copies
QR_CONFIGS = {
    'configs/lesa/lesa-resnet50-qr_4xb32_in1k.py':
    'configs/lesa/lesa-resnet50_4xb32_in1k.py',
    'configs/lesa/lesa-wrn50-qr_4xb32_in1k.py':
    'configs/lesa/lesa-wrn50_4xb32_in1k.py',
}


@pytest.mark.parametrize('path,expected', IN1K_CONFIGS.items())
def test_imagenet_configs_build_reference_models(path, expected):
    model = build_model_from_config(os.path.join(REPO_ROOT, path))
    assert type(model).__name__ == 'ImageClassifier'
    assert isinstance(model.backbone, LESAResNet)
    assert model.head.fc.out_features == 1000
    assert sum(p.numel() for p in model.parameters()) == expected


def test_imagenet_recipe():
    cfg = Config.fromfile(
        os.path.join(REPO_ROOT, 'configs/lesa/lesa-resnet50_4xb32_in1k.py'))
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.momentum, opt.nesterov,
            opt.weight_decay) == ('SGD', 0.05, 0.9, True, 8e-5)
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.convert_to_iter_based) == (
        'LinearLR', 5, True)
    assert warmup.start_factor <= 1e-6
    assert (cosine.type, cosine.begin, cosine.end,
            cosine.convert_to_iter_based) == ('CosineAnnealingLR', 5, 95, True)
    assert cfg.train_cfg.max_epochs == 95
    assert cfg.train_dataloader.batch_size == 32
    assert cfg.auto_scale_lr.base_batch_size == 128
    train = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert train == ['LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip',
                     'PackInputs']
    test = cfg.test_dataloader.dataset.pipeline
    assert test[1].type == 'ResizeEdge' and test[1].scale == 256
    assert test[2].type == 'CenterCrop' and test[2].crop_size == 224
    assert cfg.val_evaluator.topk == (1, 5)
    assert cfg.default_scope == 'mmpretrain'
    assert 'lesa_mm' in cfg.custom_imports.imports
    # the last epoch (to resume) and the best validation top-1 are kept
    ckpt = cfg.default_hooks.checkpoint
    assert (ckpt.type, ckpt.interval, ckpt.max_keep_ckpts, ckpt.save_last,
            ckpt.save_best, ckpt.rule) == ('CheckpointHook', 1, 1, True,
                                           'accuracy/top1', 'greater')


@pytest.mark.parametrize('path,base', QR_CONFIGS.items())
def test_detection_qr_imagenet_configs_change_only_the_positions(path, base):
    qr = Config.fromfile(os.path.join(REPO_ROOT, path)).to_dict()
    cls = Config.fromfile(os.path.join(REPO_ROOT, base)).to_dict()
    assert qr['model']['backbone'].pop('pe_type') == 'detection_qr'
    assert cls['model']['backbone'].pop('pe_type') == 'classification'
    assert qr == cls


def _pil_resize(img, size):
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


@pytest.mark.parametrize('path', list(IN1K_CONFIGS))
def test_imagenet_configs_resize_with_pillow(path):
    """Every resize of the ImageNet pipelines (train, val and test) gives
    exactly Pillow's bilinear resize, as the authors' torchvision transforms
    on PIL images do, and not cv2's."""
    import cv2
    from mmpretrain.registry import TRANSFORMS
    cfg = Config.fromfile(os.path.join(REPO_ROOT, path))
    img = np.random.RandomState(0).randint(0, 256, (320, 480, 3), np.uint8)

    crop = TRANSFORMS.build(cfg.train_dataloader.dataset.pipeline[1])
    assert type(crop).__name__ == 'RandomResizedCrop'
    crop.rand_crop_params = lambda _: (10, 20, 200, 300)  # a fixed box
    out = crop.transform(dict(img=img.copy()))['img']
    box = np.ascontiguousarray(img[10:210, 20:320])
    np.testing.assert_array_equal(out, _pil_resize(box, (224, 224)))
    assert not np.array_equal(
        out, cv2.resize(box, (224, 224), interpolation=cv2.INTER_LINEAR))

    for loader in ('val_dataloader', 'test_dataloader'):
        resize_cfg = cfg[loader].dataset.pipeline[1]
        assert resize_cfg.type == 'ResizeEdge', loader
        out = TRANSFORMS.build(resize_cfg).transform(dict(img=img.copy()))
        np.testing.assert_array_equal(out['img'],
                                      _pil_resize(img, (384, 256)))
        assert not np.array_equal(
            out['img'],
            cv2.resize(img, (384, 256), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_backbone_in_both_registries(scope):
    import importlib
    registry = importlib.import_module(f'{scope}.registry').MODELS
    assert registry.get('LESAResNet') is LESAResNet
    assert registry.get('LESAResNeXt') is LESAResNeXt
    # the layer lives in MMEngine's root registry, reachable from both
    assert registry.get('LESA').__name__ == 'LESA'


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_build_through_custom_imports_in_either_scope(tmp_path, scope):
    cfg_file = tmp_path / f'{scope}_cfg.py'
    cfg_file.write_text(textwrap.dedent(f"""
        default_scope = '{scope}'
        custom_imports = dict(imports=['lesa_mm'], allow_failed_imports=False)
        model = dict(type='LESAResNet', depth=50, strides=(1, 2, 2, 2),
                     feat_sizes=(16, 8, 4, 2), pe_type='detection_qr',
                     out_indices=(0, 1, 2, 3))
    """))
    model = build_model_from_config(str(cfg_file))
    assert isinstance(model, LESAResNet)
    # the build went through the config's scope
    assert DefaultScope.get_current_instance().scope_name == scope


def test_import_is_light():
    """``import lesa_mm`` registers everything without importing plotting,
    either library's dataset or model packages, or MMPretrain at all (a
    fresh interpreter)."""
    import subprocess
    import sys
    heavy = ['matplotlib', 'mmdet.datasets', 'mmdet.models', 'mmpretrain',
             'torchvision', 'pycocotools']
    code = ('import sys, lesa_mm\n'
            f'print([m for m in {heavy!r} if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == '[]'


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_every_module_is_found_from_either_scope(scope, tmp_path):
    """Registered once, in MMEngine's root registries: each library's
    registries find every lesa_mm module by its plain name (a scoped name
    searches only that library's own registry)."""
    import importlib

    from lesa_mm.datasets import demo
    from lesa_mm.utils.curves import PlotCurvesHook
    from lesa_mm.utils.transfer import LESATransferInit
    registry = importlib.import_module(f'{scope}.registry')
    assert registry.MODELS.get('LESAResNet') is LESAResNet
    assert registry.MODELS.get('LESAResNeXt') is LESAResNeXt
    assert registry.MODELS.get(f'{scope}.LESAResNet') is None
    assert registry.HOOKS.get('PlotCurvesHook') is PlotCurvesHook
    assert registry.WEIGHT_INITIALIZERS.get('LESATransfer') is \
        LESATransferInit
    # the demo datasets: the classes are defined on first use
    kind = dict(mmdet='SyntheticShapesCoco',
                mmpretrain='SyntheticShapeFolders')[scope]
    dataset = registry.DATASETS.build(dict(
        type=kind, synthetic=dict(), data_root=str(tmp_path / 'none'),
        lazy_init=True))
    cls = getattr(demo, kind)
    assert type(dataset) is cls and cls.__name__ == kind
    base = dict(mmdet='CocoDataset', mmpretrain='CustomDataset')[scope]
    assert cls.__bases__[0].__name__ == base
    assert not (tmp_path / 'none').exists()  # nothing generated yet
    with pytest.raises(AttributeError, match='no attribute'):
        demo.SyntheticOther
