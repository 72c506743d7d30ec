import os
import textwrap

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

from conftest import REPO_ROOT
from lesa_mm.models import LESAResNet
from lesa_mm.utils import build_model_from_config

IN1K_CONFIGS = {
    'configs/lesa/lesa-resnet50_4xb32_in1k.py': 23_777_512,
    'configs/lesa/lesa-wrn50_4xb32_in1k.py': 61_145_896,
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


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_backbone_in_both_registries(scope):
    import importlib
    registry = importlib.import_module(f'{scope}.registry').MODELS
    assert registry.get('LESAResNet') is LESAResNet
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
