"""FLOPs and parameters of a model, with :func:`lesa_mm.analysis.
complexity_info` (MMEngine's analysis; LESA's attention counted as the
method's multiply-accumulates, whichever kernel runs).

Classifiers are traced as ``model(x, mode='tensor')``, detectors as
MMDetection's ``get_flops`` does, ``model._forward(x, data_samples)`` on a
random image through the model's data preprocessor (padding included).
"""
import argparse
from functools import partial

import torch
from mmdet.models.detectors import BaseDetector
from mmdet.structures import DetDataSample
from mmengine.config import Config, DictAction
from mmengine.hub import get_config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, init_default_scope

from lesa_mm.analysis import complexity_info


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


def build_model(config, cfg_options=None):
    """Build ``config``'s model (eval mode) as the OpenMMLab tools do;
    ``scope::path`` names a config an installed package ships."""
    cfg = get_config(config) if '::' in config else Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return revert_sync_batchnorm(MODELS.build(cfg.model)).eval()


def model_inputs(model, shape):
    """Make ``model(inputs)`` the traced forward of a ``shape`` image:
    returns ``(model, inputs)``."""
    h, w = shape
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    data = dict(inputs=[image])
    if isinstance(model, BaseDetector):
        data['data_samples'] = [DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))]
    data = model.data_preprocessor(data)
    model.forward = partial(model.forward, data_samples=data['data_samples'],
                            mode='tensor')
    return model, data['inputs']


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args.config, args.cfg_options)
    shape = args.shape or [1024 if isinstance(model, BaseDetector) else 224]
    model, inputs = model_inputs(model, (shape[0], shape[-1]))
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
