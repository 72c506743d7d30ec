"""ImageNet-to-COCO transfer of LESA-ResNet weights (``docs/lesa.md``,
section 9).

Two kinds of ImageNet checkpoint initialise a ``'detection_qr'`` detection
backbone:

* A ``'detection_qr'`` ImageNet model (``configs/lesa/lesa-*-qr_*_in1k.py``,
  the authors' route). Its norms have the detector's shapes; only the
  position tables, trained for other feature sizes, do not fit and are
  re-initialised. Every other tensor loads unchanged.
* A ``'classification'`` ImageNet model (one flattened 1-D table per layer,
  a 3-term logit norm and an interleaved 2C-channel output norm), adapted:
  the position tables are re-initialised (the flattened table has no 2-D
  form); the logit norm of the content logits (the first ``g`` channels) is
  kept and the one of the position logits re-initialised; the output norm
  of the values (the even channels of the interleaved norm) is kept and the
  one of the value embeddings dropped.

Either way the classifier head is dropped, deformable-conv offsets that the
checkpoint lacks start at zero, position tables of the model's shape load
as they are, and anything else that does not fit is an error naming the
key (:func:`transfer_state_dict`). The report says which of these happened.

The LESA backbones apply the same adaptation to every state dict loaded into
them, through a ``load_state_dict`` pre-hook (:func:`adapt_on_load`), so
``model.load_state_dict(sd)``, ``init_cfg=dict(type='Pretrained', ...)`` and
a runner's ``load_from`` agree; there, what does not fit for an uncovered
reason is left to ``load_state_dict`` to report.
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


def _owner_loads(key, src):
    """Whether the convolution owning the offset ``key`` loads from ``src``
    (a deformable conv whose weights come from the checkpoint)."""
    return key.split('.conv_offset.')[0] + '.weight' in src


def _lesa_layer_in(key, src):
    """Whether ``src`` holds anything of the LESA layer of ``key``."""
    layer = _LESA_MODULE.fullmatch(key).group(1) + '.'
    return any(k.startswith(layer) for k in src)


def _adapt(src, target, dropped_outside):
    """The adaptation of :func:`transfer_state_dict`, without raising.

    Returns:
        tuple: ``(out, leftover, report, problems, adapted)``: the model's
        tensors from the source (adapted where covered), the source tensors
        that do not fit for an uncovered reason (mis-shaped or unknown keys,
        as they are), the report, one line per problem, and whether
        anything was adapted.
    """
    out = OrderedDict()
    used = set()
    reinit_tables, reinit_pos_norms, split_out_norms = [], [], []
    resized_tables = {}  # key -> (checkpoint shape, model shape)
    zero_offsets, problems, missing = [], [], []

    for key, value in target.items():
        lesa = _LESA_MODULE.fullmatch(key)
        if key in src and src[key].shape == value.shape:
            out[key] = src[key]
            used.add(key)
            continue
        if lesa and lesa.group(2) == 'position' and (
                key in src or _lesa_layer_in(key, src)):
            # keep the model's fresh tables: the checkpoint's are trained
            # for other feature sizes (same encoding, another shape) or are
            # of another encoding (classification 'relative')
            out[key] = value
            if key in src:
                resized_tables[key] = (tuple(src[key].shape),
                                       tuple(value.shape))
                used.add(key)
            else:
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
        if key not in src and 'conv_offset' in key and \
                _owner_loads(key, src):
            out[key] = torch.zeros_like(value)
            zero_offsets.append(key)
            continue
        if key in src:
            problems.append(f'{key}: checkpoint {tuple(src[key].shape)} vs '
                            f'model {tuple(value.shape)}')
        else:
            problems.append(f'{key}: missing from the checkpoint')
            missing.append(key)

    dropped_tables = [
        k for k in src if k not in used and k not in target
        and re.fullmatch(r'.*\.binary\.position\.\w+', k)
    ]
    unexpected = [k for k in src
                  if k not in used and k not in target
                  and k not in dropped_tables]
    problems += [f'{k}: not a parameter of the model' for k in unexpected]
    leftover = OrderedDict((k, v) for k, v in src.items()
                           if k not in used and k not in dropped_tables)

    def layers(keys):
        return sorted({_LESA_MODULE.fullmatch(k).group(1) for k in keys})

    report = []
    if dropped_outside:
        report.append(f'dropped {len(dropped_outside)} keys outside the '
                      f'backbone (e.g. {dropped_outside[0]})')
    if resized_tables:
        key, (src_shape, dst_shape) = next(iter(resized_tables.items()))
        report.append(
            f're-initialised the position tables of '
            f'{len(layers(resized_tables))} LESA layers: the checkpoint\'s '
            f'are trained for other feature sizes (e.g. {key}: '
            f'{src_shape} in the checkpoint, {dst_shape} in the model)')
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
    adapted_norms = len(reinit_pos_norms) + len(split_out_norms)
    unchanged = len(used) - adapted_norms - len(resized_tables)
    if adapted_norms:
        report.append(f'loaded {unchanged} of {len(target)} tensors '
                      f'unchanged and adapted {adapted_norms} norm tensors '
                      f'from the checkpoint')
    elif problems:
        report.append(f'loaded {unchanged} of {len(target)} tensors '
                      f'unchanged from the checkpoint')
    else:
        fresh = ['position tables'] * bool(resized_tables or reinit_tables)
        fresh += ['deformable-conv offsets'] * bool(zero_offsets)
        report.append(
            f'loaded {unchanged} of {len(target)} tensors unchanged from the '
            f'checkpoint: every tensor of the model' +
            (f' except its {" and ".join(fresh)}' if fresh else ''))
    if problems:
        report.append(f'{len(missing)} tensors of the model are missing '
                      f'from the checkpoint and {len(problems) - len(missing)}'
                      f' of its tensors do not fit (e.g. {problems[0]})')
    adapted = bool(dropped_outside or resized_tables or reinit_tables
                   or dropped_tables or adapted_norms or zero_offsets)
    return out, leftover, report, problems, adapted


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
    out, _, report, problems, _ = _adapt(src, model.state_dict(),
                                         dropped_outside)
    if problems:
        raise ValueError(
            'the checkpoint does not fit the LESA backbone: ' +
            '; '.join(problems))
    return out, report


def adapt_on_load(model, state_dict, prefix=''):
    """Adapt, in place, the part of ``state_dict`` under ``prefix`` to
    ``model`` as :func:`transfer_state_dict` does; the body of the
    ``load_state_dict`` pre-hook of the LESA backbones, so that
    ``load_state_dict``, ``init_cfg=dict(type='Pretrained')`` and a
    runner's ``load_from`` all load a checkpoint the same way.

    A state dict that fits the model is left untouched. Otherwise the
    covered cases are adapted (and the report logged); keys that do not fit
    for another reason are left as they are, for ``load_state_dict`` to
    report (an error with ``strict=True``; MMEngine's loaders, which load
    with ``strict=False``, log them).
    """
    local = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items()
                        if k.startswith(prefix))
    if not local:
        return
    src, dropped_outside = backbone_state_dict(local, 'backbone.')
    out, leftover, report, _, adapted = _adapt(src, model.state_dict(),
                                               dropped_outside)
    if not adapted:
        return
    for key in local:
        del state_dict[prefix + key]
    for part in (out, leftover):
        for key, value in part.items():
            state_dict[prefix + key] = value
    from mmengine.logging import print_log
    print_log(f'{type(model).__name__}: adapted the checkpoint on load '
              f'(lesa_mm.utils.transfer):', logger='current')
    for line in report:
        print_log(f'  - {line}', logger='current')


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
