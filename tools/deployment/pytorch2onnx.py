"""Export a LESA config's model to ONNX and check it with ONNX Runtime.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] --shape H W
        [--check-shape H W ...] [--out FILE] [--tolerance 1e-4]
        [--cfg-options key=value ...]

Detection configs export their features (backbone and neck) with dynamic
height and width (any size from 2x2 on); ImageNet configs their logits at
the fixed trained size
(see ``lesa_mm/deployment.py``). The graph is then run in ONNX Runtime at the
export size and at ``--check-shape`` (default: the export size plus 64 rows
and minus 64 columns; not for fixed-size graphs) and compared with PyTorch;
the tool prints the relative error, PyTorch's own float32 error against a
float64 copy, and the times, and exits with status 1 if an error exceeds
``--tolerance``. Deformable convolutions (mmcv DCN) have no
ONNX Runtime kernel: export with
``--cfg-options model.backbone.dcn=None``.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.runner import load_checkpoint

from lesa_mm.deployment import check_onnx, export_onnx, serves_any_size
from lesa_mm.utils import build_model_from_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a LESA model to ONNX')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint file')
    parser.add_argument('--shape', type=int, nargs=2, required=True,
                        metavar=('H', 'W'), help='export input size')
    parser.add_argument('--check-shape', type=int, nargs=2, action='append',
                        metavar=('H', 'W'),
                        help='another size to check (repeatable)')
    parser.add_argument('--out', help='ONNX file (default: the config name)')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest relative error accepted')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.checkpoint:
        # the checkpoint replaces any pretrained initialisation
        cfg.model.get('backbone', {}).pop('init_cfg', None)
    model = build_model_from_config(cfg)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, map_location='cpu')
    else:
        model.init_weights()
    out = args.out or osp.splitext(osp.basename(args.config))[0] + '.onnx'
    module = export_onnx(model, out, tuple(args.shape))
    dynamic = serves_any_size(module)
    shapes = [tuple(args.shape)]
    if dynamic:
        h, w = args.shape
        shapes += [tuple(s) for s in args.check_shape or
                   [(h + 64, max(w - 64, 64))]]
    elif args.check_shape:
        print(f'{out} has a fixed input size {tuple(args.shape)}; '
              '--check-shape is ignored')
    print(f'exported {out} ({"dynamic" if dynamic else "fixed"} height and '
          'width)')
    worst = noise = 0.0
    for r in check_onnx(out, module, shapes, float64_reference=True):
        worst = max(worst, r['rel_error'])
        noise = max(noise, r['fp32_error'])
        print(f'{r["shape"][0]}x{r["shape"][1]}: relative error '
              f'{r["rel_error"]:.2e} (PyTorch float32 vs float64: '
              f'{r["fp32_error"]:.2e}), ONNX Runtime {r["onnx_s"] * 1e3:.1f} '
              f'ms, PyTorch {r["torch_s"] * 1e3:.1f} ms')
    if worst > args.tolerance:
        print(f'relative error {worst:.2e} exceeds {args.tolerance:.0e}')
        if noise > args.tolerance:
            print('PyTorch itself is that far from float64: this model '
                  'amplifies float32 round-off (untrained eval-mode '
                  'statistics do); check a trained checkpoint')
        return 1
    return 0

if __name__ == '__main__':
    sys.exit(main())
