"""The paper's comparison on the embedded demo: train its convolution,
self-attention and LESA variants (same data, schedule, width and seed) and
print one table.

    python tools/analysis_tools/compare_demo.py {detection,classification} \
        [--work-dir work_dirs/comparison] [--num-images 16]

Each variant is trained by ``tools/train.py`` in its own process (the wall
time is that process's); the table gives the held-out result of its final
evaluation, the parameters and FLOPs of the whole model at the demo's input
size (:func:`lesa_mm.analysis.complexity_info`), and the wall time. Then,
for the attention variants, the term measurements of ``docs/lesa.md``
section 10 (:mod:`lesa_mm.terms`) on the first test images. Everything is
also written to ``WORK_DIR/TASK/summary.json``.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

from mmengine.runner import find_latest_checkpoint  # noqa: E402

from lesa_mm.analysis import (build_eval_model,  # noqa: E402
                              complexity_info, traced_inputs)
from lesa_mm.terms import format_table, measure_checkpoint  # noqa: E402
from lesa_mm.utils.curves import load_scalars  # noqa: E402

#: task -> the variants' configs, the metrics reported (label, key,
#: format) and the input size
DEMOS = {
    'detection': dict(
        variants=(('convolution', 'configs/demo/mask-rcnn_r50-slim_shapes.py'),
                  ('self-attention',
                   'configs/demo/mask-rcnn_sa-r50-slim_shapes.py'),
                  ('LESA', 'configs/demo/mask-rcnn_lesa-r50-slim_shapes.py')),
        metrics=(('bbox mAP', 'coco/bbox_mAP', '.3f'),
                 ('segm mAP', 'coco/segm_mAP', '.3f'),
                 ('bbox mAP@.5', 'coco/bbox_mAP_50', '.3f')),
        size=128),
    'classification': dict(
        variants=(('convolution', 'configs/demo/resnet50-slim_shapes.py'),
                  ('self-attention',
                   'configs/demo/sa-resnet50-slim_shapes.py'),
                  ('LESA', 'configs/demo/lesa-resnet50-slim_shapes.py')),
        metrics=(('top-1 (%)', 'accuracy/top1', '.2f'), ),
        size=64),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('task', choices=sorted(DEMOS))
    parser.add_argument('--work-dir', default='work_dirs/comparison',
                        help='root of the variants\' work dirs')
    parser.add_argument('--num-images', type=int, default=16,
                        help='test images for the term measurements')
    return parser.parse_args(argv)


def train(config, work_dir):
    """``tools/train.py CONFIG`` in a new process; its wall time (s)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, osp.join(REPO_ROOT, 'tools', 'train.py'), config,
         '--work-dir', work_dir], cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f'training {config} failed (exit code '
                           f'{proc.returncode}); its log is in {work_dir}')
    return time.perf_counter() - start


def comparison_table(task, rows):
    """Markdown table of the variants' results."""
    metrics = DEMOS[task]['metrics']
    header = ['variant', 'config'] + [m[0] for m in metrics] + [
        'params', 'FLOPs', 'wall time']
    lines = ['| ' + ' | '.join(header) + ' |',
             '|---|---|' + '---:|' * (len(header) - 2)]
    for row in rows:
        minutes, seconds = divmod(round(row['wall_s']), 60)
        cells = [row['variant'], f'`{osp.basename(row["config"])[:-3]}`']
        cells += [format(row['metrics'][key], spec)
                  for _, key, spec in metrics]
        cells += [f'{row["params"] / 1e6:.2f} M',
                  f'{row["flops"] / 1e9:.3f} G', f'{minutes} min {seconds} s']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    demo = DEMOS[args.task]
    root = osp.join(args.work_dir, args.task)
    os.makedirs(root, exist_ok=True)
    rows, terms = [], {}
    for variant, config in demo['variants']:
        work_dir = osp.join(root, osp.basename(config)[:-3])
        wall = train(config, work_dir)
        _, val = load_scalars(work_dir)
        model, inputs = traced_inputs(build_eval_model(config),
                                      (demo['size'], demo['size']))
        info = complexity_info(model, inputs, show_table=False)
        rows.append(dict(variant=variant, config=config, metrics=val[-1],
                         params=info['params'], flops=info['flops'],
                         wall_s=wall))
        if variant != 'convolution':
            terms[variant] = measure_checkpoint(
                config, find_latest_checkpoint(work_dir), args.num_images)
    print(comparison_table(args.task, rows))
    for variant, stats in terms.items():
        print(f'\n{variant}: terms of each attention layer, mean over '
              f'{args.num_images} test images\n{format_table(stats)}')
    with open(osp.join(root, 'summary.json'), 'w') as f:
        json.dump(dict(rows=rows, terms=terms), f, indent=1)
    return rows, terms


if __name__ == '__main__':
    main()
