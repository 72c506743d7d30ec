"""Time and peak memory of LESA against its counterpart, one fresh process
per measured model.

* ``--subject layer``: one LESA layer (``detection_qr``) on a ``--size H
  [W]`` map, the ``fused`` kernel against the ``reference`` one;
* ``--subject model CONFIG``: the config's backbone against ``--baseline``:
  ``stock``, the stock backbone of its family (MMPretrain's ``ResNet``,
  depth 50, or for MMDetection configs MMDetection's R50-DCN, DCN in
  stages 2-4, with the config backbone's widths, outputs, frozen stages and
  norms), or ``reference``, the same backbone with
  ``attn_impl='reference'`` (the attention computed directly, as the
  authors compute it).

A step is a forward in eval mode under ``no_grad`` (``--mode eval``) or, in
train mode, a forward, the backward of the sum of the outputs and zeroed
gradients (``--mode train``). ``--mode compile`` instead captures and
compiles the eval forward: graphs, graph breaks and operators of
``torch._dynamo.explain``, the seconds of the first call of the
``torch.compile``\ d model (compilation included) and the median compiled
step. Time: the median of single steps repeated for ``--min-run-time``
seconds (``lesa_mm.benchmark``). Threads: the environment's
(``OMP_NUM_THREADS``), as MMEngine's runners leave them; ``--threads`` sets
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of each measuring process. The
measuring processes never call ``torch.set_num_threads`` (nor
``torch.utils.benchmark.Timer``, which does): after that call, even with the
count unchanged, PyTorch's CPU flash-attention kernel ran about 25 % slower
on a 2-core machine. Only ``--profile``, which runs in the tool's own
process (its torch already loaded), sets ``--threads`` with it. Peak
memory: the peak resident set of the process (``ru_maxrss``: interpreter,
weights and steps) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA;
the same before the steps is printed beside it. FLOPs: of one image,
:func:`lesa_mm.analysis.complexity_info` (the attention counted as the
method's MACs, whichever kernel).

``--repeat N`` measures the subjects in ``N`` alternating rounds and
reports medians: on a machine whose speed drifts between runs, each round's
ratio compares processes run one after the other.

``--profile N`` instead prints the ``N`` most expensive operators of one
step of ours (``torch.profiler``, by self time), in this process.

Examples::

    python tools/analysis_tools/benchmark_lesa.py --subject layer --size 50
    python tools/analysis_tools/benchmark_lesa.py --subject model \\
        configs/lesa/lesa-resnet50_4xb32_in1k.py --batch 8 --shape 224
    python tools/analysis_tools/benchmark_lesa.py --subject model \\
        configs/lesa/lesa-resnet50_4xb32_in1k.py --batch 8 --mode train \\
        --baseline reference --repeat 5
    python tools/analysis_tools/benchmark_lesa.py --subject model \\
        configs/lesa/lesa-resnet50_4xb32_in1k.py --mode compile
    python tools/analysis_tools/benchmark_lesa.py --subject model \\
        configs/lesa/lesa-resnet50_4xb32_in1k.py --batch 8 --profile 20
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from mmengine.config import DictAction
from mmengine.utils import to_2tuple

from lesa_mm.benchmark import BASELINES, measure, profile


#: Per table (``--mode compile``, or a timed mode): each ratio to the last
#: subject and the field it divides.
RATIOS = dict(
    compile=dict(compile_ratio='compile_s', time_ratio='time'),
    timed=dict(time_ratio='time', mem_ratio='peak_mib',
               flops_ratio='flops'))
#: Per table: its columns after the subject, as (header, cell of a row).
COLUMNS = dict(
    compile=[('graphs', lambda r: f'{r["graphs"]}'),
             ('graph breaks', lambda r: f'{r["graph_breaks"]}'),
             ('operators', lambda r: f'{r["ops"]}'),
             ('compile + first call (s)', lambda r: f'{r["compile_s"]:.1f}'),
             ('compile ratio', lambda r: f'{r["compile_ratio"]:.2f}'),
             ('compiled step (ms)', lambda r: f'{r["time"] * 1e3:.1f}'),
             ('time ratio', lambda r: f'{r["time_ratio"]:.2f}')],
    timed=[('time/step (ms)', lambda r: f'{r["time"] * 1e3:.1f}'),
           ('runs', lambda r: f'{r["runs"]}'),
           ('peak mem (MiB)', lambda r: f'{r["peak_mib"]:.0f}'),
           ('before steps (MiB)', lambda r: f'{r["base_mib"]:.0f}'),
           ('time ratio', lambda r: f'{r["time_ratio"]:.2f}'),
           ('mem ratio', lambda r: f'{r["mem_ratio"]:.2f}'),
           ('GFLOPs (1 image)', lambda r: f'{r["flops"] / 1e9:.3g}'),
           ('FLOPs ratio', lambda r: f'{r["flops_ratio"]:.2f}')])


def run_in_subprocess(spec):
    """:func:`measure` in a fresh Python process (its own peak RSS), with
    ``spec['threads']`` (if set) in its environment."""
    env = dict(os.environ)
    if spec['threads']:
        env.update(OMP_NUM_THREADS=str(spec['threads']),
                   MKL_NUM_THREADS=str(spec['threads']))
    proc = subprocess.run([sys.executable, __file__, '--worker',
                           json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'{spec["name"]} failed (exit status '
                           f'{proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def specs(args):
    """The measured subjects: dicts of the parsed arguments and a ``name``,
    ours first, the one compared with (reference kernel, baseline) last."""
    common = dict(vars(args), shape=list(args.shape))
    common.pop('worker')
    names = (['fused', 'reference'] if args.subject == 'layer' else
             ['ours', args.baseline])
    return [dict(common, name=name) for name in names]


def run(args, out=None):
    """Measure every subject in its own process and print a markdown table.

    With ``--repeat N`` the subjects are measured in ``N`` alternating
    rounds (ours, the other, ours, ...), each process fresh: a row gives the
    median of its rounds' times and the largest peak, a ratio the median of
    the rounds' ratios, and a line under the table their range (on a
    machine whose speed drifts, rounds of one pair compare like with like).

    Returns:
        list[dict]: Per subject ``name``, ``time`` (s per step, median),
        ``runs``, ``peak_mib``, ``flops`` and the ratios to the last
        subject (the reference kernel, or the baseline): ``time_ratio``,
        ``mem_ratio``, ``flops_ratio``, and ``time_ratios`` (per round);
        with ``--mode compile`` the fields of
        :func:`lesa_mm.benchmark.measure_compile`, ``compile_ratio`` and
        ``time_ratio``.
    """
    table = 'compile' if args.mode == 'compile' else 'timed'
    rounds = []
    for _ in range(args.repeat):
        measured = [dict(name=s['name'], **run_in_subprocess(s))
                    for s in specs(args)]
        for row in measured:
            row.update({ratio: row[field] / measured[-1][field]
                        for ratio, field in RATIOS[table].items()})
        rounds.append(measured)
    # per subject: the median of its times and ratios, its largest peak
    medians = ['time', *(['compile_s'] if table == 'compile' else []),
               *RATIOS[table]]
    rows = [dict(runs[0], time_ratios=[r['time_ratio'] for r in runs],
                 **{key: statistics.median(r[key] for r in runs)
                    for key in medians},
                 **({'peak_mib': max(r['peak_mib'] for r in runs)}
                    if table == 'timed' else {}))
            for runs in zip(*rounds)]
    what, channels = ((args.config, 3) if args.config else
                      (f'LESA layer, {args.groups} heads', args.channels))
    print(f'{what}, {args.mode}, input {args.batch}x{channels}x'
          f'{args.shape[0]}x{args.shape[1]}, {args.device}, '
          f'{rows[0]["threads"]} threads\n', file=out)
    columns = COLUMNS[table]
    print('| subject | ' + ' | '.join(h for h, _ in columns) + ' |\n|---|' +
          '---:|' * len(columns), file=out)
    for r in rows:
        print(f'| {r["name"]} | ' + ' | '.join(cell(r) for _, cell in columns)
              + ' |', file=out)
    if args.repeat > 1:
        ratios = rows[0]['time_ratios']
        print(f'\n{args.repeat} alternating rounds; time ratio per round '
              f'{min(ratios):.2f} to {max(ratios):.2f}: ' +
              ', '.join(f'{r:.2f}' for r in ratios), file=out)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog=__doc__[__doc__.index('Examples'):].replace('::', ':'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--subject', choices=['layer', 'model'],
                        default='layer')
    parser.add_argument('config', nargs='?',
                        help='--subject model: the config of the backbone')
    parser.add_argument('--mode', choices=['eval', 'train', 'compile'],
                        default='eval')
    parser.add_argument('--baseline', choices=BASELINES, default='stock',
                        help='model: what ours is compared with')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='model: input H [W] (default 224); layer: '
                        'feature map H [W] (default 50)')
    parser.add_argument('--size', type=int, nargs='+', dest='shape',
                        help='alias of --shape')
    parser.add_argument('--channels', type=int, default=256,
                        help='layer: input = output channels')
    parser.add_argument('--groups', type=int, default=8, help='layer: heads')
    parser.add_argument('--with-cp', choices=['off', 'on'], default='off',
                        help='model: gradient checkpointing of both '
                        'backbones')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int,
                        help="intra-op threads (OMP_NUM_THREADS of the "
                        "measuring processes); default: the environment's")
    parser.add_argument('--repeat', type=int, default=1,
                        help='alternating rounds of fresh processes (median '
                        'time and ratio)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--min-run-time', type=float, default=10.0,
                        help='seconds of timed steps (at least one step)')
    parser.add_argument('--profile', type=int, metavar='N',
                        help="print the N costliest operators of a step of "
                        "ours instead of timing")
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.subject == 'model') != (args.config is not None):
        parser.error(f'a CONFIG goes with --subject model and only with it, '
                     f'got --subject {args.subject} and {args.config!r}')
    if args.baseline != 'stock' and args.subject != 'model':
        parser.error(f'--baseline goes with --subject model, got '
                     f'--subject {args.subject}')
    if args.mode == 'compile' and args.profile:
        parser.error('--profile profiles an eval or train step, not '
                     '--mode compile')
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error(f'--shape/--size takes H or H W, got {args.shape}')
    for name in ('batch', 'channels', 'groups', 'threads', 'profile',
                 'repeat'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be positive, got '
                         f'{getattr(args, name)}')
    shape = args.shape or [224 if args.config else 50]
    args.shape = to_2tuple(shape[0] if len(shape) == 1 else tuple(shape))
    args.with_cp = args.with_cp == 'on'
    return args


def main(argv=None, out=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return None
    if args.profile:
        if args.threads:  # this process: its torch is already loaded
            torch.set_num_threads(args.threads)
        events, key = profile(specs(args)[0])
        print(events.table(sort_by=key, row_limit=args.profile), file=out)
        return events
    return run(args, out)


if __name__ == '__main__':
    main()
