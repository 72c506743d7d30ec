"""Export a LESA detector with MMDeploy to ONNX Runtime and check the
export against the PyTorch run of the same deploy graph (MMDeploy's
rewrites applied), on one image at several sizes.

    python tools/deployment/mmdeploy_export.py \
        configs/deploy/instance-seg_lesa_onnxruntime_dynamic.py \
        MODEL_CONFIG CHECKPOINT IMAGE [--work-dir work_dirs/mmdeploy] \
        [--sizes 128x128 96x160 ...]

A thin wrapper over :mod:`lesa_mm.mmdeploy_compat` (MMDeploy's
``torch2onnx`` with the torch >= 2.9 fixes and LESA's opset check). Prints
one row per size: detections, the largest differences of boxes, scores
and masks, whether the labels agree, and the time of one run of
the deploy graph in PyTorch and in ONNX Runtime.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from lesa_mm import mmdeploy_compat  # noqa: E402


def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a size is HxW, got {text!r}')
    return height, width


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('deploy_cfg', help='MMDeploy deploy config')
    parser.add_argument('model_cfg', help='model config')
    parser.add_argument('checkpoint', help='model checkpoint')
    parser.add_argument('image', help='image to export and check with')
    parser.add_argument('--work-dir', default='work_dirs/mmdeploy')
    parser.add_argument('--sizes', type=parse_size, nargs='+',
                        help='HxW sizes to check (dynamic configs); default: '
                        "the model's test pipeline size")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    onnx_file = mmdeploy_compat.export(args.deploy_cfg, args.model_cfg,
                                       args.checkpoint, args.image,
                                       args.work_dir)
    print(f'exported {onnx_file}')
    rows = mmdeploy_compat.compare_with_onnxruntime(
        args.deploy_cfg, args.model_cfg, args.checkpoint, onnx_file,
        args.image, [None] if args.sizes is None else
        [size[::-1] for size in args.sizes])
    print('| input (HxW) | detections | max box diff (px) | max score diff '
          '| max mask diff | labels equal | PyTorch | ONNX Runtime |\n'
          '|---|---:|---:|---:|---:|---|---:|---:|')
    for row in rows:
        print(f'| {row["size"][0]}x{row["size"][1]} | {row["detections"]} | '
              f'{row["boxes"]:.1e} | {row["scores"]:.1e} | '
              f'{row["masks"]:.1e} | {row["labels_equal"]} | '
              f'{row["torch_s"] * 1000:.0f} ms | {row["ort_s"] * 1000:.0f} '
              f'ms |')
    return onnx_file, rows


if __name__ == '__main__':
    main()
