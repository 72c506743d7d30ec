"""The README's main-job commands, end to end (about 8 + 2 minutes on 2 CPU
cores). Marked slow: kept out of the default run, run them with

    .venv/bin/python -m pytest -m slow
"""
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def train(config, work_dir):
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', config, '--work-dir', work_dir],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_detection_demo_learns(tmp_path):
    out = train('configs/demo/mask-rcnn_lesa-r50-slim_shapes.py',
                str(tmp_path / 'det'))
    bbox = float(re.findall(r'coco/bbox_mAP: ([0-9.]+)', out)[-1])
    segm = float(re.findall(r'coco/segm_mAP: ([0-9.]+)', out)[-1])
    assert bbox >= 0.3 and segm > 0.2, (bbox, segm)


@pytest.mark.slow
def test_classification_demo_learns(tmp_path):
    out = train('configs/demo/lesa-resnet50-slim_shapes.py',
                str(tmp_path / 'cls'))
    top1 = float(re.findall(r'accuracy/top1: ([0-9.]+)', out)[-1])
    assert top1 >= 90, top1
