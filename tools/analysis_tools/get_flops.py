"""FLOPs and parameters of a model, with :func:`lesa_mm.analysis.
complexity_info` (MMEngine's analysis; LESA's attention counted as the
method's multiply-accumulates, whichever kernel runs).

Classifiers are traced as ``model(x, mode='tensor')``, detectors as
MMDetection's ``get_flops`` does, ``model._forward(x, data_samples)`` on a
random image through the model's data preprocessor (padding included).
"""
import argparse

from mmengine.config import DictAction

from lesa_mm.analysis import build_eval_model, complexity_info, traced_inputs
from lesa_mm.utils.config import model_task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Get model flops and params')
    parser.add_argument('config', help='config file path (or scope::path)')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=None,
        help='input image size, H [W] (default: 1024 for detectors, else '
        '224)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='count model.backbone alone')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error(f'--shape takes H or H W, got {args.shape}')
    return args


def main(argv=None):
    args = parse_args(argv)
    model = build_eval_model(args.config, args.cfg_options)
    shape = args.shape or [1024 if model_task(model) == 'detection' else 224]
    model, inputs = traced_inputs(model, (shape[0], shape[-1]))
    if args.backbone_only:
        model = model.backbone
    info = complexity_info(model, inputs)
    print(info['out_table'])
    split_line = '=' * 30
    uncounted = ', '.join(f'{op} x{n}'
                          for op, n in info['unsupported_ops'].items())
    print(f'{split_line}\nInput shape: {tuple(inputs.shape)}\n'
          f'Flops: {info["flops_str"]} ({info["flops"]:,})\n'
          f'Params: {info["params_str"]} ({info["params"]:,})\n'
          f'Ops not counted: {uncounted or "none"}\n{split_line}')
    return info


if __name__ == '__main__':
    main()
