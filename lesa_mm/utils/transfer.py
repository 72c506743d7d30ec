"""ImageNet-to-COCO transfer of LESA-ResNet weights.

A LESA ImageNet checkpoint uses ``'classification'`` position encodings
(one flattened 1-D table per layer, a 3-term logit norm and an interleaved
2C-channel output norm); the detection backbone uses ``'detection_qr'``
(2-D row/column tables, a 2-term logit norm, a C-channel output norm).
Following ``LESA_SPEC.md`` section 6, moving the weights:

* re-initialises the position tables (the flattened table has no 2-D form);
* carries over the logit norm of the content logits (the first ``g``
  channels) and re-initialises the one of the position logits;
* carries over the output norm of the values (the even channels of the
  interleaved norm) and drops the one of the value embeddings;
* drops the classifier head, zero-initialises deformable-conv offsets that
  the checkpoint lacks, and loads everything else unchanged.

Anything else that does not fit is an error naming the key.
"""
import re
from collections import OrderedDict

import torch

from .official_checkpoint import convert

_LESA_MODULE = re.compile(r'(.*\.conv2)\.binary\.(position|logit_norm|out_norm)'
                          r'\.(.+)')
_NORM_STATS = ('weight', 'bias', 'running_mean', 'running_var')


def backbone_state_dict(state_dict, prefix='backbone.'):
    """The backbone part of a checkpoint's state dict.

    Accepts an MMEngine/MMPretrain checkpoint (``state_dict`` key, backbone
    keys under ``prefix``), a bare backbone state dict, or an authors'
    reference checkpoint (converted first).

    Returns:
        tuple[OrderedDict, list[str]]: The backbone state dict and the keys
        dropped because they lie outside the backbone.
    """
    if 'state_dict' in state_dict:
        state_dict = state_dict['state_dict']
    keys = list(state_dict)
    if 'net' in state_dict or any('qkv_transform' in k for k in keys):
        state_dict = convert(state_dict, model_prefix=prefix)
        keys = list(state_dict)
    if prefix and any(k.startswith(prefix) for k in keys):
        inside = OrderedDict((k[len(prefix):], v)
                             for k, v in state_dict.items()
                             if k.startswith(prefix))
        dropped = [k for k in keys if not k.startswith(prefix)]
        return inside, dropped
    return OrderedDict(state_dict), []


def transfer_state_dict(source, model, prefix='backbone.'):
    """Adapt a checkpoint's backbone weights to ``model``.

    Args:
        source (dict): Checkpoint or state dict (see
            :func:`backbone_state_dict`).
        model (nn.Module): The target backbone, already initialised: its
            current values are kept wherever the source has nothing to give.
        prefix (str): Prefix of the backbone keys in ``source``.

    Returns:
        tuple[OrderedDict, list[str]]: A state dict that loads into ``model``
        with ``strict=True``, and a short report of what was dropped or
        re-initialised, and why.

    Raises:
        ValueError: Naming every key that is missing, unexpected or
            mis-shaped for a reason the transfer does not cover.
    """
    src, dropped_outside = backbone_state_dict(source, prefix)
    target = model.state_dict()
    out = OrderedDict()
    used = set()
    reinit_tables, reinit_pos_norms, split_out_norms = [], [], []
    zero_offsets, problems = [], []

    for key, value in target.items():
        lesa = _LESA_MODULE.fullmatch(key)
        if key in src and src[key].shape == value.shape:
            out[key] = src[key]
            used.add(key)
            continue
        if lesa and lesa.group(2) == 'position':
            # classification 'relative' or differently sized tables
            out[key] = value
            reinit_tables.append(key)
            continue
        if lesa and lesa.group(2) == 'logit_norm' and key in src and \
                lesa.group(3) in _NORM_STATS:
            # source [S_qk, S_qr, S_kr] (3g), target [S_qk, S_r] (2g)
            groups = value.shape[0] // 2
            if src[key].shape[0] != 3 * groups:
                problems.append(f'{key}: checkpoint {tuple(src[key].shape)} '
                                f'vs model {tuple(value.shape)}')
                continue
            merged = value.clone()
            merged[:groups] = src[key][:groups]
            out[key] = merged
            used.add(key)
            reinit_pos_norms.append(key)
            continue
        if lesa and lesa.group(2) == 'out_norm' and key in src and \
                lesa.group(3) in _NORM_STATS:
            # interleaved [o_v[0], o_e[0], o_v[1], ...] (2C) -> o_v (C)
            if src[key].shape[0] != 2 * value.shape[0]:
                problems.append(f'{key}: checkpoint {tuple(src[key].shape)} '
                                f'vs model {tuple(value.shape)}')
                continue
            out[key] = src[key][0::2].clone()
            used.add(key)
            split_out_norms.append(key)
            continue
        if key not in src and 'conv_offset' in key:
            out[key] = torch.zeros_like(value)
            zero_offsets.append(key)
            continue
        if key in src:
            problems.append(f'{key}: checkpoint {tuple(src[key].shape)} vs '
                            f'model {tuple(value.shape)}')
        else:
            problems.append(f'{key}: missing from the checkpoint')

    dropped_tables = [
        k for k in src if k not in used and k not in target
        and re.fullmatch(r'.*\.binary\.position\.\w+', k)
    ]
    unexpected = [k for k in src
                  if k not in used and k not in target
                  and k not in dropped_tables]
    problems += [f'{k}: not a parameter of the model' for k in unexpected]
    if problems:
        raise ValueError(
            'the checkpoint does not fit the LESA backbone: ' +
            '; '.join(problems))

    def layers(keys):
        return sorted({_LESA_MODULE.fullmatch(k).group(1) for k in keys})

    report = []
    if dropped_outside:
        report.append(f'dropped {len(dropped_outside)} keys outside the '
                      f'backbone (e.g. {dropped_outside[0]})')
    if reinit_tables or dropped_tables:
        report.append(
            f're-initialised the position tables of '
            f'{len(layers(reinit_tables))} LESA layers and dropped '
            f'{len(dropped_tables)} source tables: the checkpoint\'s '
            f'encodings do not fit the model\'s (e.g. classification '
            f'flattened 1-D tables for a detection_qr backbone)')
    if reinit_pos_norms:
        report.append(
            f'kept the content-logit norm and re-initialised the '
            f'position-logit norm of {len(layers(reinit_pos_norms))} '
            f'LESA layers (3 logit terms -> 2)')
    if split_out_norms:
        report.append(
            f'kept the value channels (even channels) of the interleaved '
            f'output norm of {len(layers(split_out_norms))} LESA layers; '
            f'the value-embedding channels have no detection counterpart')
    if zero_offsets:
        report.append(f'zero-initialised {len(zero_offsets)} deformable-'
                      f'conv offset tensors absent from the checkpoint')
    report.append(f'loaded {len(used)} of {len(target)} tensors from the '
                  f'checkpoint')
    return out, report


def load_pretrained_backbone(model, checkpoint, prefix='backbone.',
                             logger=None):
    """Load ``checkpoint`` (a path or URL) into the backbone ``model`` with
    :func:`transfer_state_dict` and log its report.

    Raises:
        FileNotFoundError: If a local checkpoint path does not exist.
    """
    import os.path as osp

    from mmengine.logging import MMLogger, print_log
    from mmengine.runner.checkpoint import CheckpointLoader

    if '://' not in checkpoint and not osp.isfile(checkpoint):
        raise FileNotFoundError(
            f'LESA backbone checkpoint {checkpoint!r} does not exist. Train '
            f'an ImageNet model (configs/lesa/lesa-*_in1k.py), or convert the '
            f'authors\' checkpoint with tools/model_converters/'
            f'lesa_official_to_mm.py, then pass it with --cfg-options '
            f'model.backbone.init_cfg.checkpoint=PATH (or '
            f'model.backbone.init_cfg=None to start from scratch)')
    source = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state_dict, report = transfer_state_dict(source, model, prefix)
    model.load_state_dict(state_dict, strict=True)
    logger = logger or MMLogger.get_current_instance()
    print_log(f'LESA transfer from {checkpoint}:', logger=logger)
    for line in report:
        print_log(f'  - {line}', logger=logger)
    return report
