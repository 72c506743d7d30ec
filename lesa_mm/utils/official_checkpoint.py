"""Conversion of the LESA authors' checkpoints (their layout:
``docs/lesa.md``, section 8) into lesa_mm's parameter names.

The reference models use torchvision ResNet names, which
:class:`~lesa_mm.models.LESAResNet` shares; only the LESA layers (each a
``conv2`` of a LESA block) and the classifier head are renamed. A lone
reference LESA layer (keys such as ``qkv_transform.weight``) converts to the
keys of :class:`~lesa_mm.models.LESA`.
"""
import re
from collections import OrderedDict

import torch

_BN = r'(weight|bias|running_mean|running_var|num_batches_tracked)'

#: reference LESA child -> lesa_mm LESA child (regex on the key under the
#: layer, replacement); the first match wins.
LESA_KEY_MAP = (
    (r'qkv_transform\.weight', 'binary.qkv.weight'),
    (rf'bn_qkv\.{_BN}', r'binary.qkv_norm.\1'),
    (rf'bn_similarity\.{_BN}', r'binary.logit_norm.\1'),
    (rf'bn_output\.{_BN}', r'binary.out_norm.\1'),
    (r'relative', 'binary.position.relative'),
    (r'rel_height', 'binary.position.rel_height'),
    (r'rel_width', 'binary.position.rel_width'),
    (r'x_transform\.0\.weight', 'unary.conv.weight'),
    (r'x_transform\.0\.conv_offset\.(weight|bias)', r'unary.conv.conv_offset.\1'),
    (r'x_transform\.1\.weight', 'unary.pointwise.weight'),
    (rf'bn_x\.{_BN}', r'unary.norm.\1'),
    (r'projection\.0\.weight', 'fusion.gate_conv.weight'),
    (rf'projection\.1\.{_BN}', r'fusion.gate_norm.\1'),
)
#: reference LESA buffers that lesa_mm derives instead of storing.
LESA_DERIVED_KEYS = ('flatten_index', )

_RESNET_KEY = re.compile(
    rf'(conv1\.weight|bn1\.{_BN}|layer\d+\.\d+\.(conv[123]\.weight|'
    rf'conv2\.conv_offset\.(weight|bias)|bn[123]\.{_BN}|'
    rf'downsample\.0\.weight|downsample\.1\.{_BN}))')
_HEAD_KEY = re.compile(r'fc\.(weight|bias)')
_LESA_PREFIX = re.compile(r'(layer\d+\.\d+\.conv2)\.(.+)')


def extract_state_dict(checkpoint):
    """The state dict of a reference checkpoint: top level or under
    ``'net'``, with any ``module.`` prefixes removed."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'a reference checkpoint is a dict, got '
                         f'{type(checkpoint).__name__}')
    state_dict = checkpoint.get('net', checkpoint)
    out = OrderedDict()
    for key, value in state_dict.items():
        while key.startswith('module.'):
            key = key[len('module.'):]
        out[key] = value
    return out


#: the reference fusion's ``reasoning`` sequence, ``[ReLU, (Conv, BN, ReLU)
#: x n]``: index ``1 + 3 i`` is step ``i``'s conv, ``2 + 3 i`` its BN.
_REASONING_KEY = re.compile(rf'reasoning\.(\d+)\.(weight|{_BN[1:-1]})')


def _reasoning_key(key):
    match = _REASONING_KEY.fullmatch(key)
    if match is None:
        return None
    step, part = divmod(int(match.group(1)) - 1, 3)
    suffix = '' if step == 0 else str(step + 1)  # DynamicGateFusion's names
    if step >= 0 and part == 0 and match.group(2) == 'weight':
        return f'fusion.reason_conv{suffix}.weight'
    if step >= 0 and part == 1:
        return f'fusion.reason_norm{suffix}.{match.group(2)}'
    return None


def convert_lesa_key(key):
    """lesa_mm name of a key under a reference LESA layer, '' for a derived
    buffer to drop, None if the key is not a LESA key. The fusion keys of any
    depth (the authors' ``df_channel_shrink``) map to
    :class:`~lesa_mm.models.layers.fusion.DynamicGateFusion`'s names."""
    if key in LESA_DERIVED_KEYS:
        return ''
    reasoning = _reasoning_key(key)
    if reasoning is not None:
        return reasoning
    for pattern, repl in LESA_KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def reference_fusion_cfg(layer_state_dict):
    """The ``fusion`` config of :class:`~lesa_mm.models.LESA` that holds the
    fusion of one reference LESA layer, read from its keys and shapes
    (without the layer's prefix): ``dict(type='DynamicGate', shrinks=...,
    kernel_sizes=..., groups=..., gate_groups=...)``, the authors'
    ``df_channel_shrink``, ``df_kernel_size`` and ``df_group``."""
    projection = layer_state_dict['projection.0.weight']
    if projection.shape[-1] != 1:
        raise ValueError(
            f'the reference projection conv has a {projection.shape[-1]}x'
            f'{projection.shape[-1]} kernel; only 1x1 runs (its conv is '
            f'unpadded), see docs/lesa.md section 3')
    channels = 2 * projection.shape[0]
    shrinks, kernel_sizes, groups = [], [], []
    index = 1
    while f'reasoning.{index}.weight' in layer_state_dict:
        weight = layer_state_dict[f'reasoning.{index}.weight']
        shrink = channels / weight.shape[0]
        shrinks.append(int(shrink) if shrink == int(shrink) else shrink)
        kernel_sizes.append(weight.shape[-1])
        groups.append(channels // weight.shape[1])
        channels = weight.shape[0]
        index += 3
    return dict(type='DynamicGate', shrinks=tuple(shrinks),
                kernel_sizes=tuple(kernel_sizes), groups=tuple(groups),
                gate_groups=channels // projection.shape[1])


def _convert_lesa_value(new_key, value):
    if new_key == 'binary.qkv.weight' and value.dim() == 3:
        return value.unsqueeze(-1)  # Conv1d (2C, Cin, 1) -> Conv2d 1x1
    return value


def convert(state_dict, model_prefix='backbone.', head_prefix='head.'):
    """Convert a reference state dict to lesa_mm names.

    Args:
        state_dict (dict): A reference state dict (or whole checkpoint): a
            LESA-ResNet classifier / backbone, or one lone LESA layer.
        model_prefix (str): Prefix of the backbone keys in the output.
        head_prefix (str): Prefix of the classifier ``fc`` in the output.

    Returns:
        OrderedDict: The converted state dict. A lone LESA layer gives the
        keys of :class:`lesa_mm.models.LESA` without prefix.

    Raises:
        ValueError: Naming every key that is neither a ResNet, classifier
            nor LESA key.
    """
    state_dict = extract_state_dict(state_dict)
    lone_layer = all(convert_lesa_key(k) is not None for k in state_dict)
    out, unknown = OrderedDict(), []
    for key, value in state_dict.items():
        if lone_layer:
            new_key = convert_lesa_key(key)
            if new_key:
                out[new_key] = _convert_lesa_value(new_key, value)
            continue
        lesa = _LESA_PREFIX.fullmatch(key)
        if lesa and convert_lesa_key(lesa.group(2)):
            new_key = convert_lesa_key(lesa.group(2))
            out[f'{model_prefix}{lesa.group(1)}.{new_key}'] = \
                _convert_lesa_value(new_key, value)
        elif lesa and convert_lesa_key(lesa.group(2)) == '':
            continue  # derived buffer
        elif _RESNET_KEY.fullmatch(key):
            out[model_prefix + key] = value
        elif _HEAD_KEY.fullmatch(key):
            out[head_prefix + key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f'{len(unknown)} key(s) of the reference checkpoint are neither '
            f'ResNet, classifier nor LESA keys: {unknown}')
    return out


def check_against_model(state_dict, model):
    """Raise a ValueError naming every missing, unexpected or mis-shaped key
    of ``state_dict`` with respect to ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model '
        f'{tuple(expected[k].shape)}' for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f'missing keys: {missing}')
    if unexpected:
        problems.append(f'unexpected keys: {unexpected}')
    if mismatched:
        problems.append(f'shape mismatches: {mismatched}')
    if problems:
        raise ValueError('the converted checkpoint does not fit the model; '
                         + '; '.join(problems))


def load_reference_checkpoint(path):
    """``torch.load`` a reference checkpoint (tensors and plain containers
    only)."""
    return torch.load(path, map_location='cpu', weights_only=True)
