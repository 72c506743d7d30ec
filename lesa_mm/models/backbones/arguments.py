"""The argument checks of the LESA backbones, and the stage sizes they
derive from one input size.

Each check raises a ``ValueError`` that names the argument, the value it got
and what is allowed, when the backbone is built (MMDetection's ``ResNet``
asserts some of them without a message, later).
"""
import math
import numbers
from collections.abc import Sequence

from mmengine.utils import to_2tuple

from ..utils import boolean, positive_int, registered_layer_cfg

#: The arguments given one entry per stage.
PER_STAGE = ('strides', 'dilations', 'feat_sizes', 'stage_with_lesa',
             'stage_with_first_conv', 'stage_with_dcn')


def stage_sizes(input_size, strides, owner='LESAResNet'):
    """Each stage's output size ``(h, w)`` for images of ``input_size``
    (side, or height and width) and the stages' ``strides`` (ints): the
    stem (a stride-2 convolution, then a stride-2 max pool) gives
    ``ceil(side / 4)``, each stage of stride ``s`` divides by ``s`` rounding
    up, as the padded strided convolutions and LESA's ``ceil_mode`` pooling
    do."""
    size = to_2tuple(input_size)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(
            v, numbers.Integral) or v < 1 for v in size):
        raise ValueError(f'{owner} input_size must be an int or (height, '
                         f'width) of ints >= 1, got {input_size!r}')
    size = tuple(math.ceil(v / 4) for v in size)
    sizes = []
    for stride in strides:
        size = tuple(math.ceil(v / stride) for v in size)
        sizes.append(size)
    return tuple(sizes)


def checked_arguments(owner, depths, args):
    """``args``, every argument of a LESA backbone by name (MMDetection
    ``ResNet``'s included, given or its default), checked, with ``strides``,
    ``feat_sizes`` (derived from ``input_size`` when not given) and
    ``out_indices`` as tuples of ints."""
    if args['depth'] not in depths:
        raise ValueError(f'{owner} depth must be one of {depths}, got '
                         f"{args['depth']!r}")
    num_stages = positive_int(owner, 'num_stages', args['num_stages'])
    if num_stages > 4:
        raise ValueError(f'{owner} num_stages must be 1 to 4, got '
                         f'{num_stages}')
    for name in ('in_channels', 'base_channels', 'width_per_group',
                 'lesa_groups'):
        positive_int(owner, name, args[name])
    positive_int(owner, 'stem_channels', args['stem_channels'],
                 minimum=2 if args['deep_stem'] else 1)
    for name in ('norm_eval', 'with_cp', 'zero_init_residual', 'deep_stem',
                 'avg_down'):
        boolean(owner, name, args[name])
    if args['style'] not in ('pytorch', 'caffe'):
        raise ValueError(f"{owner} style must be 'pytorch' or 'caffe', got "
                         f"{args['style']!r}")
    registered_layer_cfg(owner, 'norm_cfg', args['norm_cfg'],
                         dict(type='BN'))
    registered_layer_cfg(owner, 'conv_cfg', args['conv_cfg'],
                         dict(type='Conv2d'), optional=True)
    registered_layer_cfg(owner, 'dcn', args['dcn'],
                         dict(type='DCN', deform_groups=1), optional=True)
    registered_layer_cfg(owner, 'lesa', args['lesa'], dict(type='LESA'))
    out_indices = args['out_indices']
    if isinstance(out_indices, numbers.Integral):
        out_indices = (out_indices, )
    feat_sizes, input_size = args['feat_sizes'], args['input_size']
    if feat_sizes is not None and input_size is not None:
        raise ValueError(
            f'{owner} takes feat_sizes or input_size, not both (a config '
            f'that inherits one sets it to None to give the other); got '
            f'feat_sizes={feat_sizes!r} and input_size={input_size!r}')
    for name in PER_STAGE + ('out_indices', ):
        value = out_indices if name == 'out_indices' else args[name]
        if name == 'feat_sizes' and value is None:
            continue
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ValueError(f'{owner} {name} must be a sequence, got '
                             f'{value!r}')
        if name != 'out_indices' and len(value) != num_stages:
            raise ValueError(f'{owner} {name} needs one entry per stage '
                             f'({num_stages}), got {value!r}')
    strides = tuple(positive_int(owner, 'strides entry', s)
                    for s in args['strides'])
    for d in args['dilations']:
        positive_int(owner, 'dilations entry', d)
    if feat_sizes is None:
        feat_sizes = stage_sizes(224 if input_size is None else input_size,
                                 strides, owner)
    if not out_indices or any(i not in range(num_stages)
                              for i in out_indices):
        raise ValueError(f'{owner} out_indices must be a non-empty subset '
                         f'of {tuple(range(num_stages))}, got '
                         f'{tuple(out_indices)!r}')
    if args['frozen_stages'] not in range(-1, num_stages + 1):
        raise ValueError(f'{owner} frozen_stages must be in [-1, '
                         f"{num_stages}], got {args['frozen_stages']!r}")
    return dict(args, strides=strides, feat_sizes=tuple(feat_sizes),
                out_indices=tuple(int(i) for i in out_indices))
