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


def comparison_rows(task):
    """The README's demo-comparison rows of ``task``: config -> figures."""
    from conftest import load_tool
    tool = load_tool('tools/analysis_tools/compare_demo.py')
    with open(os.path.join(REPO_ROOT, 'README.md')) as f:
        lines = f.read().splitlines()
    rows = {}
    for _, config in tool.DEMOS[task]['variants']:
        name = os.path.basename(config)[:-3]
        row = next(line for line in lines
                   if line.split('|')[2:3] == [f' `{name}` '])
        rows[name] = [float(v) for v in row.split('|')[3:3 + len(
            tool.DEMOS[task]['metrics'])]]
    return tool, rows


@pytest.mark.slow
@pytest.mark.parametrize('task', ['classification', 'detection'])
def test_demo_comparison_matches_readme(tmp_path, task):
    """tools/analysis_tools/compare_demo.py: the three variants train, and
    their results are the README's comparison table (at its thread
    count)."""
    tool, readme = comparison_rows(task)
    rows, terms = tool.main([task, '--work-dir', str(tmp_path),
                             '--num-images', '4'])
    assert [r['variant'] for r in rows] == ['convolution', 'self-attention',
                                           'LESA']
    assert set(terms) == {'self-attention', 'LESA'}
    for row in rows:
        name = os.path.basename(row['config'])[:-3]
        measured = [row['metrics'][key]
                    for _, key, _ in tool.DEMOS[task]['metrics']]
        matches_readme_figures(readme[name], measured)


def matches_readme_figures(figures, measured):
    _, threads = readme_row('lesa-resnet50-slim_shapes')
    if torch.get_num_threads() != threads:
        pytest.skip(f'the README\'s figures are for {threads} threads')
    assert [round(m, len(str(f).split('.')[1])) for m, f in
            zip(measured, figures)] == figures, (measured, figures)
