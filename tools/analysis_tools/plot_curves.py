"""Redraw the training curves of a work dir (``lesa_mm.utils.curves``).

    python tools/analysis_tools/plot_curves.py WORK_DIR [--out FILE.png]
        [--keys loss lr coco/bbox_mAP ...] [--runs all|latest] [--dpi 100]
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from lesa_mm.utils.curves import plot_curves  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Plot the losses and validation metrics of MMEngine's "
        'WORK_DIR/<timestamp>/vis_data/scalars.json')
    parser.add_argument('work_dir')
    parser.add_argument('--out', help='default: WORK_DIR/curves.png')
    parser.add_argument('--keys', nargs='+', help='entries to plot (default: '
                        'the losses and the main validation metrics)')
    parser.add_argument('--runs', choices=['all', 'latest'], default='all',
                        help='join the runs in time order (resumed runs) or '
                        'plot the newest only')
    parser.add_argument('--dpi', type=int, default=100)
    args = parser.parse_args(argv)
    try:
        out, series = plot_curves(args.work_dir, args.out, args.keys,
                                  args.runs, args.dpi)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    print(f'{", ".join(series)} plotted in {out}')
    return out, series


if __name__ == '__main__':
    main()
