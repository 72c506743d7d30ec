"""The demo detector through MMDeploy (its torch2onnx with the torch >= 2.9
fixes of lesa_mm.mmdeploy_compat, configs/deploy/) and ONNX Runtime, against
the PyTorch run of the same deploy graph. Skipped where MMDeploy is not
installed (tools/setup_env.sh installs it)."""
import os

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

from conftest import REPO_ROOT, calibrate_norms, load_tool
from lesa_mm.utils import build_model_from_config

pytest.importorskip(
    'mmdeploy', reason='MMDeploy is not installed (tools/setup_env.sh '
    'installs mmdeploy 1.3.1 without its pinned dependencies)')

from lesa_mm import mmdeploy_compat  # noqa: E402

DEMO = os.path.join(REPO_ROOT,
                    'configs/demo/mask-rcnn_lesa-r50-slim_shapes.py')
DYNAMIC = os.path.join(
    REPO_ROOT, 'configs/deploy/instance-seg_lesa_onnxruntime_dynamic.py')
STATIC = os.path.join(
    REPO_ROOT, 'configs/deploy/instance-seg_lesa_onnxruntime_static.py')
TOL = 1e-4


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    """The demo Mask R-CNN with calibrated norms (so that its eval-mode
    activations are those of a trained model), a checkpoint and an image."""
    root = tmp_path_factory.mktemp('mmdeploy')
    torch.manual_seed(0)
    model = build_model_from_config(DEMO)
    model.init_weights()
    calibrate_norms(model.backbone, torch.randn(2, 3, 128, 128))
    checkpoint = str(root / 'det.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (128, 128, 3), dtype=np.uint8)
    cv2.circle(image, (40, 50), 20, (30, 200, 240), -1)
    cv2.rectangle(image, (70, 60), (110, 110), (200, 60, 40), -1)
    path = str(root / 'image.png')
    cv2.imwrite(path, image)
    return checkpoint, path, root


def test_dynamic_export_runs_at_every_size(detector):
    """One dynamic export of the demo detector (random weights, calibrated
    norms) runs in ONNX Runtime at another size, with the deploy graph's
    outputs. (Its near-tied random scores make detections swap places
    under round-off; equality is checked on a trained detector below.)"""
    checkpoint, image, root = detector
    onnx_file = mmdeploy_compat.export(DYNAMIC, DEMO, checkpoint, image,
                                       str(root / 'dynamic'))
    assert os.path.isfile(onnx_file)
    for size in [(96, 160)]:  # (height, width), exported at 128x128
        (row, ) = mmdeploy_compat.compare_with_onnxruntime(
            DYNAMIC, DEMO, checkpoint, onnx_file, image, [size[::-1]])
        assert row['size'] == size
        assert row['detections'] > 0, row
        assert row['masks'] <= 1 and row['scores'] <= 1, row
    # the fix is scoped: torch's own default exporter is back
    assert torch.onnx.export.__name__ == 'export'
    assert torch.onnx.export.__module__ == 'torch.onnx'


@pytest.mark.slow
def test_trained_detector_equals_the_deploy_graph(tmp_path):
    """The README's demo detector (its training command), exported once with
    the dynamic config: ONNX Runtime equals the PyTorch run of the same
    deploy graph within 1e-4 (boxes in pixels, scores, mask probabilities)
    at four sizes, through tools/deployment/mmdeploy_export.py."""
    import subprocess
    import sys
    work = tmp_path / 'demo'
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', DEMO, '--work-dir', str(work)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    image = os.path.join(REPO_ROOT,
                         'data/lesa_demo/shapes_coco/val/val_00000.png')
    tool = load_tool('tools/deployment/mmdeploy_export.py')
    _, rows = tool.main([DYNAMIC, DEMO, str(work / 'iter_800.pth'), image,
                         '--work-dir', str(tmp_path / 'onnx'), '--sizes',
                         '128x128', '96x160', '192x192', '256x128'])
    for row in rows:
        assert row['detections'] > 0 and row['labels_equal'], row
        assert max(row['boxes'], row['scores'], row['masks']) < TOL, row


@pytest.mark.slow
def test_static_export_and_the_tool(detector, capsys):
    checkpoint, image, root = detector
    tool = load_tool('tools/deployment/mmdeploy_export.py')
    onnx_file, rows = tool.main([STATIC, DEMO, checkpoint, image,
                                 '--work-dir', str(root / 'static')])
    assert os.path.isfile(onnx_file)
    (row, ) = rows
    assert row['size'] == (128, 128) and row['detections'] > 0
    assert '| 128x128 |' in capsys.readouterr().out


def test_opsets_below_16_are_refused(detector):
    checkpoint, image, root = detector
    cfg = Config.fromfile(DYNAMIC)
    cfg.onnx_config.opset_version = 11
    with pytest.raises(ValueError, match=r'from ONNX opset 16.*'
                       r'opset_version=11'):
        mmdeploy_compat.export(cfg, DEMO, checkpoint, image,
                               str(root / 'opset11'))
    assert not (root / 'opset11').exists()


def test_deploy_configs_differ_from_mmdeploys_only_in_the_opset():
    """configs/deploy/ restate MMDeploy 1.3.1's instance-seg ONNX Runtime
    configs (its pip package ships none) with opset 17."""
    static, dynamic = Config.fromfile(STATIC), Config.fromfile(DYNAMIC)
    assert static.onnx_config.opset_version == 17
    assert static.backend_config == dict(type='onnxruntime')
    assert static.codebase_config.post_processing.export_postprocess_mask \
        is False
    assert static.onnx_config.output_names == ['dets', 'labels', 'masks']
    assert dynamic.onnx_config.dynamic_axes['input'] == {
        0: 'batch', 2: 'height', 3: 'width'}
    assert dynamic.codebase_config == static.codebase_config


def test_compat_runs_an_mmdeploy_script_with_the_fixes(tmp_path):
    """tools/deployment/mmdeploy_compat.py runs a script (as MMDeploy's
    tools/deploy.py would be run) with the fixes applied in its process."""
    import subprocess
    import sys
    script = tmp_path / 'deploy.py'
    script.write_text(
        'import sys, json\n'
        'from torch.onnx import symbolic_opset9\n'
        'import mmdeploy.apis.onnx as onnx_apis\n'
        'print(json.dumps(dict(argv=sys.argv, name=__name__,\n'
        "    cast=hasattr(symbolic_opset9, '_cast_Long'),\n"
        "    wrapped=hasattr(onnx_apis.export, '__wrapped__'))))\n")
    proc = subprocess.run(
        [sys.executable, 'tools/deployment/mmdeploy_compat.py', str(script),
         'a', '--b'], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == dict(argv=[str(script), 'a', '--b'], name='__main__',
                       cast=True, wrapped=True)
    bad = subprocess.run(
        [sys.executable, 'tools/deployment/mmdeploy_compat.py', 'missing.py'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and 'SCRIPT' in bad.stderr


@pytest.mark.slow
def test_stock_detector_exports_at_mmdeploys_default_opset(tmp_path):
    """The control: a stock MMDetection Mask R-CNN (the demo's convolution
    variant) at MMDeploy's default opset 11, whose RoiAlign needs the
    restored ``_cast_Long``, exports and runs in ONNX Runtime."""
    config = os.path.join(REPO_ROOT, 'configs/demo/mask-rcnn_r50-slim_shapes.py')
    torch.manual_seed(0)
    model = build_model_from_config(config)
    checkpoint = str(tmp_path / 'conv.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    image = str(tmp_path / 'image.png')
    cv2.imwrite(image, np.full((128, 128, 3), 90, np.uint8))
    cfg = Config.fromfile(DYNAMIC)
    cfg.onnx_config.opset_version = 11
    onnx_file = mmdeploy_compat.export(cfg, config, checkpoint, image,
                                       str(tmp_path / 'onnx'))
    import onnx
    assert onnx.load(onnx_file).opset_import[0].version == 11
    (row, ) = mmdeploy_compat.compare_with_onnxruntime(
        cfg, config, checkpoint, onnx_file, image)
    assert row['size'] == (128, 128)
