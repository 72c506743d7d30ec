"""Loading checkpoints into LESA-ResNet backbones, and the ImageNet-to-COCO
transfer (``docs/lesa.md``, section 9).

Every state dict loaded into a LESA backbone, by any route
(``load_state_dict``, ``init_cfg=dict(type='Pretrained')``, a runner's
``load_from`` or ``resume``, ``tools/test.py``), passes through one
``load_state_dict`` pre-hook (:func:`adapt_on_load`). A state dict that fits
loads as it is. Otherwise:

* ``'detection_qr'`` position tables trained for other feature sizes are
  kept: the model's tables take the checkpoint's shape, so the model
  computes exactly what the checkpoint's model computes, at every input
  size (the encoding reads its tables at any size).
* A ``'classification'`` ImageNet model (one flattened 1-D table per layer,
  a 3-term logit norm and an interleaved 2C-channel output norm) loaded
  into a ``'detection_qr'`` backbone is adapted: the position tables are
  re-initialised (the flattened table has no 2-D form); the logit norm of
  the content logits (the first ``g`` channels) is kept and the one of the
  position logits re-initialised; the output norm of the values (the even
  channels of the interleaved norm) is kept and the one of the value
  embeddings dropped. ``'classification'`` tables of another size are
  re-initialised too (that encoding serves only its own size).
* The head of a whole classifier or detector is dropped, and
  deformable-conv offsets that the checkpoint lacks start at zero.

The log says what was adapted; a re-initialised trained tensor is a WARNING
that names it. Anything else that does not fit is left to
``load_state_dict`` to report.

The LESA recipe's ImageNet-to-COCO transfer re-initialises the ImageNet
model's position tables at the detector's sizes: ``init_cfg=dict(type=
'LESATransfer', checkpoint=...)`` (:class:`LESATransferInit`), which the
detection configs use, and :func:`transfer_state_dict` with
``position_tables='reinit'``; there, anything that does not fit is an error
naming the key.
"""
import logging
import os
from collections import OrderedDict

import torch
from mmengine.model.weight_init import PretrainedInit, update_init_info

from lesa_mm.registry import WEIGHT_INITIALIZERS

from lesa_mm.models.layers.binary import binary_key_parts
from .official_checkpoint import convert

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
    layer = binary_key_parts(key)[0] + '.'
    return any(k.startswith(layer) for k in src)


def _position_module(model, key):
    """The position encoding that owns the table ``key`` of ``model``."""
    return model.get_submodule(key.rsplit('.', 1)[0])


def _other_size(position, key, src_shape, shape):
    """Whether a checkpoint table of ``src_shape`` is the table ``key`` (of
    ``shape``) of the encoding ``position`` for another feature size: the
    same channels, only its offset axis (the encoding's
    ``table_offset_dims``) of another length."""
    dim = position.table_offset_dims[key.rsplit('.')[-1]]
    src_shape, shape = list(src_shape), list(shape)
    del src_shape[dim], shape[dim]
    return src_shape == shape


def _adapt(src, model, dropped_outside, position_tables='keep'):
    """The adaptation of :func:`transfer_state_dict`, without raising.

    Returns:
        tuple: ``(out, leftover, notes, problems, adapted, resized)``: the
        model's tensors from the source (adapted where covered), the source
        tensors that do not fit for an uncovered reason (mis-shaped or
        unknown keys, as they are), the report as ``(log level, line)``
        pairs, one line per problem, whether anything was adapted, and the
        model's tables that take the checkpoint's shape (key -> shape).
    """
    if position_tables not in ('keep', 'reinit'):
        raise ValueError(f"position_tables must be 'keep' or 'reinit', got "
                         f'{position_tables!r}')
    target = model.state_dict()
    out = OrderedDict()
    used = set()
    reinit_tables, reinit_pos_norms, split_out_norms = [], [], []
    kept_tables = {}  # key -> (checkpoint shape, model shape)
    recipe_tables, fixed_size_tables = [], []  # re-initialised, other size
    zero_offsets, problems, missing = [], [], []

    for key, value in target.items():
        lesa = binary_key_parts(key)  # (layer, part, name) or None
        if key in src and src[key].shape == value.shape:
            out[key] = src[key]
            used.add(key)
            continue
        position = _position_module(model, key) \
            if lesa and lesa[1] == 'position' else None
        if position is not None and key in src and \
                _other_size(position, key, src[key].shape, value.shape):
            used.add(key)
            if position.any_size and position_tables == 'keep':
                # the model takes the trained table as it is: an any-size
                # encoding reads it at every input size as the checkpoint's
                # model did
                out[key] = src[key]
                kept_tables[key] = (tuple(src[key].shape),
                                    tuple(value.shape))
            else:
                out[key] = value
                (recipe_tables if position.any_size
                 else fixed_size_tables).append(key)
            continue
        if position is not None and key not in src and \
                _lesa_layer_in(key, src):
            # the checkpoint's layer has tables of another encoding
            # (classification 'relative' for a detection_qr model)
            out[key] = value
            reinit_tables.append(key)
            continue
        if lesa and lesa[1] == 'logit_norm' and key in src and \
                lesa[2] in _NORM_STATS:
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
        if lesa and lesa[1] == 'out_norm' and key in src and \
                lesa[2] in _NORM_STATS:
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
        and (binary_key_parts(k) or (None, None))[1] == 'position'
    ]
    unexpected = [k for k in src
                  if k not in used and k not in target
                  and k not in dropped_tables]
    problems += [f'{k}: not a parameter of the model' for k in unexpected]
    leftover = OrderedDict((k, v) for k, v in src.items()
                           if k not in used and k not in dropped_tables)

    def layers(keys):
        return sorted({binary_key_parts(k)[0] for k in keys})

    info, warning = logging.INFO, logging.WARNING
    notes = []
    if dropped_outside:
        notes.append((info, f'dropped {len(dropped_outside)} keys outside '
                            f'the backbone (e.g. {dropped_outside[0]})'))
    if kept_tables:
        key, (src_shape, dst_shape) = next(iter(kept_tables.items()))
        notes.append((info, (
            f'kept the trained position tables of '
            f'{len(layers(kept_tables))} LESA layers at the checkpoint\'s '
            f'feature sizes (e.g. {key}: {src_shape} in the checkpoint, '
            f'{dst_shape} as built): the layers read them at every input '
            f'size as the checkpoint\'s model did')))
    if recipe_tables:
        notes.append((warning, (
            f're-initialised {len(recipe_tables)} trained position tables '
            f'of {len(layers(recipe_tables))} LESA layers at the model\'s '
            f'feature sizes, as the LESA transfer recipe does '
            f'(LESATransfer): {", ".join(recipe_tables)}')))
    if fixed_size_tables:
        key = fixed_size_tables[0]
        notes.append((warning, (
            f're-initialised {len(fixed_size_tables)} trained position '
            f'tables of {len(layers(fixed_size_tables))} LESA layers: the '
            f'checkpoint\'s are trained for another feature size (e.g. '
            f'{key}: {tuple(src[key].shape)} in the checkpoint, '
            f'{tuple(target[key].shape)} in the model) and their encoding '
            f'serves only the size it is built for: '
            f'{", ".join(fixed_size_tables)}')))
    if reinit_tables or dropped_tables:
        notes.append((warning, (
            f're-initialised the position tables of '
            f'{len(layers(reinit_tables))} LESA layers and dropped '
            f'{len(dropped_tables)} trained source tables: the checkpoint\'s '
            f'encodings do not fit the model\'s (e.g. classification '
            f'flattened 1-D tables for a detection_qr backbone): '
            f'{", ".join(dropped_tables)}')))
    if reinit_pos_norms:
        notes.append((warning, (
            f'kept the content-logit norm and re-initialised the '
            f'position-logit norm of {len(layers(reinit_pos_norms))} '
            f'LESA layers (3 logit terms -> 2)')))
    if split_out_norms:
        notes.append((warning, (
            f'kept the value channels (even channels) of the interleaved '
            f'output norm of {len(layers(split_out_norms))} LESA layers; '
            f'the value-embedding channels have no detection counterpart')))
    if zero_offsets:
        notes.append((info, f'zero-initialised {len(zero_offsets)} '
                            f'deformable-conv offset tensors absent from '
                            f'the checkpoint'))
    reinitialised = recipe_tables + fixed_size_tables + reinit_tables
    adapted_norms = len(reinit_pos_norms) + len(split_out_norms)
    unchanged = len(used) - adapted_norms - len(recipe_tables) - \
        len(fixed_size_tables)
    if adapted_norms:
        summary = (f'loaded {unchanged} of {len(target)} tensors unchanged '
                   f'and adapted {adapted_norms} norm tensors from the '
                   f'checkpoint')
    elif problems:
        summary = (f'loaded {unchanged} of {len(target)} tensors unchanged '
                   f'from the checkpoint')
    else:
        fresh = ['position tables'] * bool(reinitialised)
        fresh += ['deformable-conv offsets'] * bool(zero_offsets)
        summary = (f'loaded {unchanged} of {len(target)} tensors unchanged '
                   f'from the checkpoint: every tensor of the model' +
                   (f' except its {" and ".join(fresh)}' if fresh else ''))
    notes.append((info, summary))
    if problems:
        notes.append((warning, (
            f'{len(missing)} tensors of the model are missing from the '
            f'checkpoint and {len(problems) - len(missing)} of its tensors '
            f'do not fit (e.g. {problems[0]})')))
    adapted = bool(dropped_outside or kept_tables or reinitialised
                   or dropped_tables or adapted_norms or zero_offsets)
    resized = {key: shapes[0] for key, shapes in kept_tables.items()}
    return out, leftover, notes, problems, adapted, resized


def _resize_tables(model, resized):
    """Give the position tables ``resized`` (key -> shape) of ``model`` the
    checkpoint's shapes, in place: the parameters stay the same objects (an
    optimizer built before loading keeps them).

    A ``DistributedDataParallel`` wrapper built before the load (as
    MMEngine's runner builds it) cannot follow a parameter that changes
    shape: it stops at the first backward. In a distributed run a WARNING
    says so and names the feature sizes to build the model with.
    """
    for key, shape in resized.items():
        param = model.get_parameter(key)
        param.data = param.data.new_empty(shape)
    if resized and torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        from mmengine.logging import print_log
        layers = {}
        for key in resized:
            layer = binary_key_parts(key)[0]
            layers[layer] = _position_module(model, key).feat_size
        sizes = ', '.join(f'{layer}: {h}x{w}'
                          for layer, (h, w) in layers.items())
        print_log(
            f'the position tables took the checkpoint\'s feature sizes '
            f'({sizes}); a DistributedDataParallel wrapper built before '
            f'this load cannot train parameters that changed shape. To '
            f'fine-tune this checkpoint with several processes, build the '
            f'model with these feature sizes (model.backbone.feat_sizes, '
            f'the stage output sizes, a strided first LESA layer at twice '
            f'its stage\'s, with input_size=None; or the input_size that '
            f'gives them)', logger='current', level=logging.WARNING)


def _log_notes(title, notes):
    """The report, line by line, each at its level (MMEngine's logger shows
    a repeated WARNING once)."""
    from mmengine.logging import print_log
    print_log(title, logger='current')
    for level, line in notes:
        print_log(f'  - {line}', logger='current', level=level)


def transfer_state_dict(source, model, prefix='backbone.',
                        position_tables='keep'):
    """Adapt a checkpoint's backbone weights to ``model``.

    Position tables of the model's encoding trained for another feature
    size are kept where the encoding serves any size (``'detection_qr'``:
    the model's tables take the checkpoint's shape, in place, so that it
    computes what the checkpoint's model computes), unless
    ``position_tables='reinit'`` asks for the LESA transfer recipe (fresh
    tables at the model's sizes). Tables that cannot serve the model (a
    ``'classification'`` table of another size, another encoding's) are
    re-initialised; the report says which, and why.

    Args:
        source (dict): Checkpoint or state dict (see
            :func:`backbone_state_dict`).
        model (nn.Module): The target backbone, already initialised: its
            current values are kept wherever the source has nothing to give.
        prefix (str): Prefix of the backbone keys in ``source``.
        position_tables (str): ``'keep'`` or ``'reinit'`` (see above).
            Defaults to ``'keep'``.

    Returns:
        tuple[OrderedDict, list[str]]: A state dict that loads into ``model``
        with ``strict=True``, and a short report of what was dropped or
        re-initialised, and why.

    Raises:
        ValueError: Naming every key that is missing, unexpected or
            mis-shaped for a reason the transfer does not cover.
    """
    out, notes = _transfer(source, model, prefix, position_tables)
    return out, [line for _, line in notes]


def _transfer(source, model, prefix, position_tables,
              name='the checkpoint'):
    """:func:`transfer_state_dict`, its report as ``(log level, line)``
    pairs; ``name`` names the source in the error."""
    src, dropped_outside = backbone_state_dict(source, prefix)
    out, _, notes, problems, _, resized = _adapt(
        src, model, dropped_outside, position_tables)
    if problems:
        raise ValueError(f'{name} does not fit the LESA backbone: ' +
                         '; '.join(problems))
    _resize_tables(model, resized)
    return out, notes


def adapt_on_load(model, state_dict, prefix=''):
    """Adapt, in place, the part of ``state_dict`` under ``prefix`` to
    ``model`` as :func:`transfer_state_dict` does (trained ``'detection_qr'``
    tables kept); the body of the ``load_state_dict`` pre-hook of the LESA
    backbones, so that ``load_state_dict``, ``init_cfg=dict(type=
    'Pretrained')``, a runner's ``load_from`` and ``resume`` all load a
    checkpoint the same way.

    A state dict that fits the model is left untouched. Otherwise the
    covered cases are adapted and the report logged (a WARNING where a
    trained tensor is re-initialised); keys that do not fit for another
    reason are left as they are, for ``load_state_dict`` to report (an
    error with ``strict=True``; MMEngine's loaders, which load with
    ``strict=False``, log them).
    """
    local = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items()
                        if k.startswith(prefix))
    if not local:
        return
    src, dropped_outside = backbone_state_dict(local, 'backbone.')
    out, leftover, notes, _, adapted, resized = _adapt(
        src, model, dropped_outside)
    if not adapted and list(src) == list(local):
        return
    _resize_tables(model, resized)
    for key in local:
        del state_dict[prefix + key]
    for part in (out, leftover):
        for key, value in part.items():
            state_dict[prefix + key] = value
    _log_notes(f'{type(model).__name__}: adapted the checkpoint on load '
               f'(lesa_mm.utils.transfer):', notes)


@WEIGHT_INITIALIZERS.register_module(name='LESATransfer')
class LESATransferInit(PretrainedInit):
    """The ImageNet-to-COCO transfer of the LESA recipe as an ``init_cfg``:
    ``init_cfg=dict(type='LESATransfer', checkpoint=...)``.

    Loads the checkpoint's backbone into a LESA backbone as
    :func:`transfer_state_dict` adapts it, with ``position_tables=
    'reinit'``: position tables trained for other feature sizes (the
    ImageNet model's) start afresh at the model's sizes, as the authors'
    detectors do. Everything else that does not fit is an error naming the
    key. The report is logged; re-initialised tables as a WARNING that
    names them. ``dict(type='Pretrained', ...)`` instead keeps the trained
    tables.

    Args:
        checkpoint (str): Path or URL of the checkpoint.
        prefix (str): Prefix of the backbone keys in the checkpoint.
            Defaults to ``'backbone.'``.
        map_location (str): Defaults to ``'cpu'``.
    """

    def __init__(self, checkpoint, prefix='backbone.', map_location='cpu'):
        super().__init__(checkpoint, prefix, map_location)

    def __call__(self, module):
        from mmengine.runner.checkpoint import CheckpointLoader
        if '://' not in self.checkpoint and \
                not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(
                f'LESA backbone checkpoint {self.checkpoint!r} does not '
                f'exist. Train an ImageNet model (configs/lesa/'
                f'lesa-*_in1k.py), or convert the authors\' checkpoint with '
                f'tools/model_converters/lesa_official_to_mm.py, then pass '
                f'it with --cfg-options model.backbone.init_cfg.checkpoint='
                f'PATH (or model.backbone.init_cfg=None to start from '
                f'scratch)')
        source = CheckpointLoader.load_checkpoint(
            self.checkpoint, map_location=self.map_location)
        out, notes = _transfer(source, module, self.prefix, 'reinit',
                               name=f'the checkpoint {self.checkpoint}')
        module.load_state_dict(out, strict=True)
        _log_notes(f'LESA transfer from {self.checkpoint}:', notes)
        if hasattr(module, '_params_init_info'):
            update_init_info(module, init_info=self._get_init_info())
