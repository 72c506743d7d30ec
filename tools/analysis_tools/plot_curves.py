"""Plot the training loss and validation metrics of an MMEngine work dir.

    python tools/analysis_tools/plot_curves.py WORK_DIR [--out FILE.png]
        [--keys loss coco/bbox_mAP ...] [--runs all|latest] [--dpi 100]

Reads ``WORK_DIR/<timestamp>/vis_data/scalars.json`` (written by
MMEngine's ``LocalVisBackend``). ``--runs all`` (default) joins the runs in
time order, a later run replacing the earlier records from its first
training step on (a resumed run continues the curve, a restarted one
replaces it); ``--runs latest`` plots the newest run only. Default keys: the
loss and its terms, and the main validation metrics (``coco/bbox_mAP``,
``coco/segm_mAP``, ``accuracy/top1``, ... whichever were logged). The PNG
defaults to ``WORK_DIR/curves.png``.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from lesa_mm.utils.curves import plot_curves  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Plot loss curves and validation metrics from '
        "MMEngine's scalars.json logs")
    parser.add_argument('work_dir', help='training work dir (or one run '
                        'directory, or a scalars.json)')
    parser.add_argument('--out', help='PNG to write (default: '
                        'WORK_DIR/curves.png)')
    parser.add_argument('--keys', nargs='+', metavar='KEY',
                        help='entries to plot, e.g. loss lr coco/bbox_mAP')
    parser.add_argument('--runs', choices=['all', 'latest'], default='all',
                        help='join all runs in time order (resumed runs) or '
                        'plot only the newest one')
    parser.add_argument('--dpi', type=int, default=100)
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    if not osp.exists(args.work_dir):
        parser.error(f'{args.work_dir!r} does not exist')
    try:
        out = plot_curves(args.work_dir, args.out, keys=args.keys,
                          runs=args.runs, dpi=args.dpi)
    except (FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        parser.error(message)
    print(f'curves written to {out}')
    return out


if __name__ == '__main__':
    main()
