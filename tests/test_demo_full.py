"""The README's main-job commands, end to end (about 8 + 2 minutes on 2 CPU
cores). Marked slow: kept out of the default run, run them with

    .venv/bin/python -m pytest -m slow
"""
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from lesa_mm.utils.curves import load_scalars


def train(config, work_dir):
    """Run the README's training command; the last validation metrics it
    logged (scalars.json)."""
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', config, '--work-dir', work_dir],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert os.path.isfile(os.path.join(work_dir, 'curves.png'))
    _, val = load_scalars(work_dir)
    return val[-1]


@pytest.mark.slow
def test_detection_demo_learns(tmp_path):
    metrics = train('configs/demo/mask-rcnn_lesa-r50-slim_shapes.py',
                    str(tmp_path / 'det'))
    bbox, segm = metrics['coco/bbox_mAP'], metrics['coco/segm_mAP']
    assert bbox >= 0.3 and segm > 0.2, (bbox, segm)


@pytest.mark.slow
def test_classification_demo_learns(tmp_path):
    top1 = train('configs/demo/lesa-resnet50-slim_shapes.py',
                 str(tmp_path / 'cls'))['accuracy/top1']
    assert top1 >= 90, top1
