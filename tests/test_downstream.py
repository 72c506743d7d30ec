"""A downstream project, outside this repository, builds on LESA configs."""
import os
import textwrap

import pytest

from conftest import REPO_ROOT
from lesa_mm.models import LESAResNet
from lesa_mm.utils import build_model_from_config


def test_inherit_classic_config_by_path(tmp_path):
    base = os.path.join(REPO_ROOT, 'configs/lesa/mask-rcnn_lesa-r50.py')
    cfg = tmp_path / 'my_mask_rcnn.py'
    cfg.write_text(textwrap.dedent(f"""
        _base_ = [{base!r}]
        model = dict(
            backbone=dict(frozen_stages=2, feat_sizes=(200, 100, 50, 25)),
            roi_head=dict(bbox_head=dict(num_classes=5),
                          mask_head=dict(num_classes=5)))
        train_cfg = dict(max_epochs=12)
    """))
    model = build_model_from_config(str(cfg))
    assert isinstance(model.backbone, LESAResNet)
    assert model.backbone.frozen_stages == 2
    assert model.backbone.layer3[1].conv2.feat_size == (50, 50)
    assert model.roi_head.bbox_head.num_classes == 5


def test_pure_python_config_reads_base_from_the_package(tmp_path):
    cfg = tmp_path / 'my_classifier.py'
    cfg.write_text(textwrap.dedent("""
        from mmengine.config import read_base

        with read_base():
            from lesa_mm.configs.lesa.lesa_resnet50_4xb32_in1k import *

        model.head.num_classes = 10
        model.backbone.frozen_stages = 1
        train_cfg.max_epochs = 30
    """))
    model = build_model_from_config(str(cfg))
    assert isinstance(model.backbone, LESAResNet)
    assert model.head.fc.out_features == 10
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())


@pytest.mark.parametrize('folder', ['lesa', 'baselines'])
def test_every_pure_python_entry_matches_its_classic_config(folder):
    import glob

    from mmengine.config import Config
    entries = glob.glob(os.path.join(REPO_ROOT, 'lesa_mm/configs', folder,
                                     '*.py'))
    classic = glob.glob(os.path.join(REPO_ROOT, 'configs', folder, '*.py'))
    assert classic
    assert len([e for e in entries if not e.endswith('__init__.py')]) == \
        len(classic)
    for path in classic:
        module = os.path.basename(path)[:-3].replace('-', '_')
        entry = os.path.join(REPO_ROOT, 'lesa_mm/configs', folder,
                             module + '.py')
        assert os.path.isfile(entry), entry
        lazy = Config.fromfile(entry)
        assert lazy.model.to_dict() == Config.fromfile(path).model.to_dict()


def test_inherit_with_the_package_scope(tmp_path):
    """``_base_ = 'lesa_mm::...'`` after ``import lesa_mm`` (MMEngine reads
    the package's .mim/configs), as this repository's tools load configs."""
    import lesa_mm  # noqa: F401  (adds lesa_mm to MMEngine's package table)
    from mmengine.config import Config
    cfg_file = tmp_path / 'scoped.py'
    cfg_file.write_text(textwrap.dedent("""
        _base_ = 'lesa_mm::baselines/mask-rcnn_sa-r50.py'
        model = dict(backbone=dict(frozen_stages=2))
    """))
    cfg = Config.fromfile(str(cfg_file))
    assert cfg.model.backbone.frozen_stages == 2
    assert cfg.model.backbone.lesa == dict(type='LESA', with_unary=False,
                                           fusion=None)
    from mmengine.hub import get_config
    assert get_config('lesa_mm::lesa/mask-rcnn_lesa-r50.py').model.backbone \
        .type == 'LESAResNet'
