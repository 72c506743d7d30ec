"""Argument checks and initialisation shared by the LESA layers and the LESA
backbones.

Each check raises a ``ValueError`` that names the argument, the value it got and
what is allowed, at build time, where the value is first known.
"""
import numbers

from mmengine.model.weight_init import constant_init, kaiming_init
from mmengine.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


def positive_int(owner, name, value, minimum=1):
    """``value`` as an ``int`` if it is an integer (numpy integers
    included, ``bool`` excluded) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise ValueError(f'{owner} {name} must be an int >= {minimum}, got '
                         f'{value!r} ({type(value).__name__})')
    return int(value)


def boolean(owner, name, value):
    """``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f'{owner} {name} must be True or False, got '
                         f'{value!r} ({type(value).__name__})')
    return value


def registered_layer_cfg(owner, name, cfg, example, optional=False):
    """``cfg`` if it is a config dict whose ``type`` names a layer class in
    MMEngine's root ``MODELS`` registry (where mmcv registers its
    convolutions and norms), as ``build_conv_layer`` / ``build_norm_layer``
    look it up."""
    if cfg is None and optional:
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'{owner} {name} must be a config dict with a '
                         f"'type', e.g. {example!r}, got {cfg!r}")
    layer = cfg['type']
    if not isinstance(layer, str):
        return cfg  # a class, as mmcv accepts
    with MODELS.switch_scope_and_registry(None) as registry:
        found = registry.get(layer)
    if found is None:
        raise ValueError(f'{owner} {name} type {layer!r} is not a layer '
                         f'registered with mmcv/MMEngine (e.g. {example!r})')
    return cfg


#: Norms that normalise the channels of ``(N, C, H, W)`` maps.
CHANNEL_NORMS = (_BatchNorm, nn.GroupNorm, _InstanceNorm)


def channel_norm(owner, norm_cfg, norm):
    """``norm`` (built from ``norm_cfg``) if it normalises channels of
    ``(N, C, H, W)`` maps: BatchNorm, SyncBatchNorm, GroupNorm or
    InstanceNorm (LayerNorm normalises the last dimension)."""
    if not isinstance(norm, CHANNEL_NORMS):
        raise ValueError(
            f'{owner} norm_cfg must build a norm over the channels of '
            f"(N, C, H, W) maps ('BN', 'SyncBN', 'GN', 'IN'), got "
            f'{norm_cfg!r} ({type(norm).__name__})')
    return norm


def init_convs_and_norms(module, skip=()):
    """Kaiming-normal (fan_out, relu) convolutions and unit/zero norms in
    ``module``, as a ResNet initialises them (``docs/lesa.md`` section 5),
    leaving the submodules in ``skip`` (and theirs) as they are."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in module.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, nn.Conv2d):
            kaiming_init(m, mode='fan_out', nonlinearity='relu',
                         distribution='normal')
        elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
            constant_init(m, 1, bias=0)


def split_dcn_cfg(dcn):
    """``(conv_cfg, fallback_on_stride)`` of an MMDetection-style DCN config:
    the mmcv conv config without MMDetection's ``fallback_on_stride`` key
    (which keeps strided 3x3 convolutions ordinary), and that key's value.
    ``(None, False)`` for no DCN."""
    if dcn is None:
        return None, False
    conv_cfg = dict(dcn)
    return conv_cfg, bool(conv_cfg.pop('fallback_on_stride', False))
