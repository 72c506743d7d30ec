"""Convert a LESA authors' checkpoint into an MMEngine checkpoint.

    python tools/model_converters/lesa_official_to_mm.py SRC DST \
        [--config configs/lesa/lesa-resnet50_4xb32_in1k.py]

SRC holds the state dict at the top level or under ``'net'`` (``module.``
prefixes allowed), with torchvision ResNet names. DST loads with
``strict=True`` into the model of the matching config (classifier: backbone
and head). With ``--config`` the converted keys and shapes are checked
against that model before saving. ``convert(state_dict)`` is importable and
also maps a lone reference LESA layer to :class:`lesa_mm.models.LESA` keys.
"""
import argparse
import os.path as osp
import sys

import torch

from lesa_mm.utils.official_checkpoint import (check_against_model, convert,
                                               load_reference_checkpoint)

__all__ = ['convert', 'main']


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='reference checkpoint')
    parser.add_argument('dst', help='output MMEngine checkpoint')
    parser.add_argument(
        '--config', help='check the result against the model of this config')
    parser.add_argument(
        '--unsafe-load', action='store_true',
        help='load SRC with weights_only=False (only for trusted files that '
        'pickle more than tensors and containers)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.unsafe_load:
        checkpoint = torch.load(args.src, map_location='cpu',
                                weights_only=False)
    else:
        checkpoint = load_reference_checkpoint(args.src)
    state_dict = convert(checkpoint)
    if args.config:
        from lesa_mm.utils import build_model_from_config
        check_against_model(state_dict, build_model_from_config(args.config))
    meta = dict(source=osp.abspath(args.src), converter=osp.basename(__file__))
    torch.save(dict(state_dict=state_dict, meta=meta), args.dst)
    print(f'saved {len(state_dict)} tensors to {args.dst}')


if __name__ == '__main__':
    sys.exit(main())
