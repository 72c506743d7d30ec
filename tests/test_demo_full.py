"""The README's main-job commands, end to end (about 5 + 1 minutes on 2 CPU
cores). Marked slow: kept out of the default run, run them with

    .venv/bin/python -m pytest -m slow

Each run is deterministic for a given code version, thread count and
machine: under the README's conditions (its thread count) the result must
be the README's figure, so a change that moves it updates the README.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from lesa_mm.utils.curves import load_scalars


def readme_row(config):
    """The README's demo-table row of ``config``: its figures, in order,
    and the thread count the table states."""
    with open(os.path.join(REPO_ROOT, 'README.md')) as f:
        text = f.read()
    threads = int(re.search(r'demo figures: 2 CPU cores, (\d+) threads',
                            text).group(1))
    row = next(line for line in text.splitlines()
               if line.startswith(f'| `{config}`'))
    result = row.split('|')[2]
    return [float(v) for v in re.findall(r'\d+\.\d+', result)], threads


def matches_readme(config, measured):
    """Assert ``measured`` (rounded as the README prints them) are the
    README's figures when run with its thread count."""
    figures, threads = readme_row(config)
    if torch.get_num_threads() != threads:
        pytest.skip(f'the README\'s figures are for {threads} threads, this '
                    f'run has {torch.get_num_threads()}: learning checked, '
                    f'figures not compared')
    assert [round(m, len(str(f).split('.')[1])) for m, f in
            zip(measured, figures)] == figures[:len(measured)], \
        (measured, figures)


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
    matches_readme('mask-rcnn_lesa-r50-slim_shapes',
                   [bbox, segm, metrics['coco/bbox_mAP_50']])


@pytest.mark.slow
def test_classification_demo_learns(tmp_path):
    top1 = train('configs/demo/lesa-resnet50-slim_shapes.py',
                 str(tmp_path / 'cls'))['accuracy/top1']
    assert top1 >= 90, top1
    matches_readme('lesa-resnet50-slim_shapes', [top1])
