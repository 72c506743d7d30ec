"""tools/analysis_tools/benchmark_lesa.py on a tiny configuration.

Checks the tables' structure and the fused-vs-reference agreement; never
the timings.
"""
import io
import math
import re

import pytest

from conftest import load_tool

TINY = ['--subject', 'layer', '--size', '8', '--channels', '32', '--groups',
        '4', '--repeats', '1', '--warmup', '0', '--device', 'cpu']


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/analysis_tools/benchmark_lesa.py')


def table_rows(text):
    """The data rows of the markdown tables as lists of cells."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and cells[0] in ('eval', 'train'):
            rows.append(cells)
    return rows


def test_tiny_layer_table(tool):
    out = io.StringIO()
    # --in-process: one process for every cell keeps the test fast
    assert tool.main(TINY + ['--in-process'], out=out) == 0
    text = out.getvalue()
    assert 'peak RSS above the pre-run resident set' in text
    rows = table_rows(text)
    assert sorted((r[0], r[2]) for r in rows) == [
        ('eval', 'fused'), ('eval', 'reference'), ('train', 'fused'),
        ('train', 'reference')]
    peaks = {(r[0], r[2]): float(r[5]) for r in rows}
    for mode, _, impl, time_ms, min_ms, peak, speedup, ratio, out_err, \
            grad_err, fp64_out, fp64_grad in rows:
        for figure in (time_ms, min_ms, peak):
            assert math.isfinite(float(figure))
        errors = [fp64_out] + ([fp64_grad] if mode == 'train' else [])
        if impl == 'fused':
            assert speedup.startswith(tuple('0123456789'))
            # in one process the RSS high-water mark may already cover a
            # tiny reference run: then there is no ratio to print
            if peaks[(mode, 'reference')] > 0:
                assert math.isfinite(float(ratio))
            else:
                assert ratio == '-'
            errors += [out_err] + ([grad_err] if mode == 'train' else [])
        for err in errors:
            assert 0 <= float(err) < 1e-4, (mode, impl, err)
    # both kernels in float64 agree to round-off
    notes = [line for line in text.splitlines()
             if 'both kernels in float64' in line]
    assert len(notes) == 2
    for note in notes:
        figures = re.findall(r'(?:out|grad) (\S+?)(?:,|$)', note)
        assert len(figures) == (2 if note.startswith('- train') else 1)
        assert all(0 <= float(f) < 1e-10 for f in figures), note


def test_worker_in_fresh_process(tool):
    """The CPU path: one cell in a fresh process reports finite figures."""
    args = tool.build_parser().parse_args(TINY)
    spec = dict(tool.cell_specs(args, 'layer', 'eval', 'cpu'), impl='fused')
    result = tool.run_in_subprocess('measure', spec, timeout=300)
    assert 'error' not in result, result
    assert len(result['times_ms']) == 1
    assert math.isfinite(result['times_ms'][0]) and result['times_ms'][0] > 0
    assert math.isfinite(result['peak_mib']) and result['peak_mib'] >= 0


def test_failed_cell_is_reported(tool):
    spec = dict(subject='layer', mode='eval', device='cpu', size=8, batch=1,
                channels=30, groups=4, warmup=0, repeats=1, threads=1,
                seed=0, impl='fused')  # 30 channels: LESA rejects them
    result = tool.run_task('measure', spec)
    assert result['error'].startswith('failed: ValueError')
    rows = tool.table_rows(spec, dict(fused=result), None)
    assert 'failed: ValueError' in rows[0]


def test_height_and_width(tool):
    """``--size H W``: a 40x24 map (the CPU's fused kernel runs it in key
    blocks) in both modes, agreeing with the reference."""
    out = io.StringIO()
    argv = TINY[:2] + ['--size', '40', '24'] + TINY[4:] + ['--in-process']
    assert tool.main(argv, out=out) == 0
    rows = table_rows(out.getvalue())
    assert sorted((r[0], r[1]) for r in rows) == [
        ('eval', '1x32x40x24'), ('eval', '1x32x40x24'),
        ('train', '2x32x40x24'), ('train', '2x32x40x24')]
    for row in rows:
        if row[2] == 'fused':
            errors = [row[8]] + ([row[9]] if row[0] == 'train' else [])
            assert all(0 <= float(e) < 1e-4 for e in errors), row


@pytest.mark.parametrize('argv', [
    ['--channels', '36', '--groups', '4'],  # not a multiple of 2 * groups
    ['--subject', 'backbone', '--image-size', '100'],
    ['--subject', 'backbone', '--image-size', '256', '100'],
    ['--size', '8', '8', '8'],
    ['--impl', 'fused,fast'],
    ['--repeats', '0'],
    ['--mode', 'predict'],
])
def test_bad_arguments(tool, argv):
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert exc.value.code == 2
