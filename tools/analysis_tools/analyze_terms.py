"""Measure what the terms of each attention layer contribute, on a trained
model and the first images of its config's test set (``docs/lesa.md``,
section 10; :mod:`lesa_mm.terms`).

    python tools/analysis_tools/analyze_terms.py CONFIG CHECKPOINT \
        [--num-images 16] [--out stats.json]

Prints one row per layer: for LESA layers the norms of the unary term and
of the gated binary term and the mean gate; for every layer the share of
the attention output that comes from the query's own position.
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from lesa_mm.terms import format_table, measure_checkpoint  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='model config')
    parser.add_argument('checkpoint', help='trained checkpoint')
    parser.add_argument('--num-images', type=int, default=16,
                        help='test images to average over (default: 16)')
    parser.add_argument('--out', help='also write the figures as JSON')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    stats = measure_checkpoint(args.config, args.checkpoint, args.num_images)
    print(format_table(stats))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(stats, f, indent=1)
    return stats


if __name__ == '__main__':
    main()
