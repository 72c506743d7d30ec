"""Fusions of LESA's two terms: ``y = fuse(u, b)``.

* ``'DynamicGate'`` (:class:`DynamicGateFusion`, LESA's fusion and the
  default): ``y = u + sigmoid(gate(u, b)) * b``, a per-pixel, per-channel
  gate computed from both terms by a stack of "reasoning" convolutions and a
  "projection" convolution (``docs/lesa.md``, section 3).
* ``'Sum'`` (:class:`SumFusion`): ``y = u + b``, the static alternative.

A LESA layer builds its fusion from ``fusion=dict(type=..., **options)``
with ``channels`` and ``norm_cfg`` added. A new fusion is one more class
here, registered in :data:`FUSIONS`.
"""
import inspect
import numbers

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer

from ..utils import init_convs_and_norms, positive_int


def _sequence(owner, name, value):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f'{owner} {name} must be a list or tuple (one entry '
                         f'per reasoning step), got {value!r}')
    return tuple(value)


class DynamicGateFusion(nn.Module):
    """LESA's dynamic gate: ``y = u + sigmoid(BN(Conv(z_n))) * b``.

    ``z_0 = ReLU([u, b])`` (``2C`` channels); reasoning step ``i`` is
    ``z_{i+1} = ReLU(BN(Conv_k(z_i)))`` with ``c_{i+1} = c_i / shrinks[i]``
    channels, kernel ``kernel_sizes[i]`` (padded to keep the map size) and
    ``groups[i]`` groups; the projection maps ``z_n`` to the ``C``-channel
    gate. The defaults are the published models' fusion (one step, ``2C ->
    C``, 1x1 convolutions). These options are the authors' ``df_channel_shrink``
    (``shrinks``), ``df_kernel_size`` (``kernel_sizes`` then
    ``gate_kernel_size``) and ``df_group`` (``groups`` then ``gate_groups``).

    Parameter names: step 1 is ``reason_conv`` / ``reason_norm``, step
    ``i >= 2`` is ``reason_conv{i}`` / ``reason_norm{i}``, the projection is
    ``gate_conv`` / ``gate_norm``.

    Args:
        channels (int): Channels ``C`` of ``u`` and ``b``.
        shrinks (Sequence[int | float]): Channel shrink factor of each
            reasoning step; each must leave a whole number of channels.
            Defaults to ``(2, )``.
        kernel_sizes (Sequence[int]): Odd kernel size of each reasoning
            step. Defaults to ``(1, )``.
        groups (Sequence[int]): Groups of each reasoning step's conv,
            dividing its input and output channels. Defaults to ``(1, )``.
        gate_kernel_size (int): Kernel of the projection. Only 1: the
            projection is unpadded, so a larger kernel would make the gate
            smaller than ``b`` (the authors' code fails there as well).
            Defaults to 1.
        gate_groups (int): Groups of the projection conv, dividing ``c_n``
            and ``C``. Defaults to 1.
        norm_cfg (dict): Config of the BatchNorms.
    """

    def __init__(self, channels, shrinks=(2, ), kernel_sizes=(1, ),
                 groups=(1, ), gate_kernel_size=1, gate_groups=1,
                 norm_cfg=dict(type='BN')):
        super().__init__()
        owner = 'LESA DynamicGate fusion'
        shrinks = _sequence(owner, 'shrinks', shrinks)
        kernel_sizes = _sequence(owner, 'kernel_sizes', kernel_sizes)
        groups = _sequence(owner, 'groups', groups)
        if not len(shrinks) == len(kernel_sizes) == len(groups):
            raise ValueError(
                f'{owner} needs one shrinks, kernel_sizes and groups entry '
                f'per reasoning step, got shrinks={shrinks}, kernel_sizes='
                f'{kernel_sizes}, groups={groups}')
        if positive_int(owner, 'gate_kernel_size', gate_kernel_size) != 1:
            raise ValueError(
                f'{owner} gate_kernel_size must be 1: the projection conv is '
                f'unpadded, so a kernel of {gate_kernel_size} would give a '
                f'gate smaller than the binary term (the authors\' code '
                f'cannot run it either); got {gate_kernel_size}')
        self.num_steps = len(shrinks)
        in_ch = 2 * channels
        for i, (shrink, kernel, group) in enumerate(
                zip(shrinks, kernel_sizes, groups)):
            step = f'reasoning step {i + 1}'
            out_ch = self._shrunk(owner, step, in_ch, shrink)
            kernel = positive_int(owner, f'kernel_sizes[{i}]', kernel)
            if kernel % 2 == 0:
                raise ValueError(
                    f'{owner} kernel_sizes[{i}] must be odd (a padded conv '
                    f'that keeps the map size), got {kernel}')
            group = self._groups(owner, f'groups[{i}]', group, in_ch, out_ch)
            suffix = '' if i == 0 else str(i + 1)
            self.add_module(f'reason_conv{suffix}', nn.Conv2d(
                in_ch, out_ch, kernel, padding=(kernel - 1) // 2,
                groups=group, bias=False))
            self.add_module(f'reason_norm{suffix}',
                            build_norm_layer(norm_cfg, out_ch)[1])
            in_ch = out_ch
        gate_groups = self._groups(owner, 'gate_groups', gate_groups, in_ch,
                                   channels)
        self.gate_conv = nn.Conv2d(in_ch, channels, 1, groups=gate_groups,
                                   bias=False)
        self.gate_norm = build_norm_layer(norm_cfg, channels)[1]
        init_convs_and_norms(self)

    @staticmethod
    def _shrunk(owner, step, channels, shrink):
        if isinstance(shrink, bool) or not isinstance(shrink, numbers.Real) \
                or not shrink > 0:
            raise ValueError(f'{owner} shrinks: {step} needs a positive '
                             f'number, got {shrink!r}')
        out = channels / shrink
        if out != int(out) or out < 1:
            raise ValueError(
                f'{owner} shrinks: {step} divides {channels} channels by '
                f'{shrink!r}, which does not leave a whole number of '
                f'channels (>= 1)')
        return int(out)

    @staticmethod
    def _groups(owner, name, groups, in_ch, out_ch):
        groups = positive_int(owner, name, groups)
        if in_ch % groups or out_ch % groups:
            raise ValueError(
                f'{owner} {name}={groups} must divide the conv\'s input and '
                f'output channels, {in_ch} and {out_ch}')
        return groups

    def reasoning_steps(self):
        """``(conv, norm)`` of each reasoning step, in order."""
        suffixes = ['' if i == 1 else str(i)
                    for i in range(1, self.num_steps + 1)]
        return [(getattr(self, 'reason_conv' + s),
                 getattr(self, 'reason_norm' + s)) for s in suffixes]

    def gate(self, u, b):
        """The gate ``sigmoid(BN(Conv(z_n)))`` in ``(0, 1)``, shaped as
        ``b``."""
        z = torch.relu(torch.cat([u, b], dim=1))
        for conv, norm in self.reasoning_steps():
            z = torch.relu(norm(conv(z)))
        return torch.sigmoid(self.gate_norm(self.gate_conv(z)))

    def forward(self, u, b):
        return u + self.gate(u, b) * b


class SumFusion(nn.Module):
    """The static fusion ``y = u + b`` (no parameters).

    Args:
        channels (int): Channels ``C`` of ``u`` and ``b`` (unused).
        norm_cfg (dict): Unused; accepted as every fusion is built with it.
    """

    def __init__(self, channels, norm_cfg=None):
        super().__init__()

    def gate(self, u, b):
        """The constant gate 1, shaped as ``b``."""
        return torch.ones_like(b)

    def forward(self, u, b):
        return u + b


#: ``fusion=dict(type=...)`` of a LESA layer -> the fusion class.
FUSIONS = {
    'DynamicGate': DynamicGateFusion,
    'Sum': SumFusion,
}


def build_fusion(cfg, channels, norm_cfg):
    """The fusion that ``cfg`` (``dict(type=..., **options)``) names."""
    if not isinstance(cfg, dict) or cfg.get('type') not in FUSIONS:
        raise ValueError(
            f'LESA fusion must be a dict whose type is one of '
            f'{tuple(FUSIONS)}, e.g. dict(type=\'DynamicGate\'), got {cfg!r}')
    fusion = FUSIONS[cfg['type']]
    options = {k: v for k, v in cfg.items() if k != 'type'}
    allowed = [name for name in inspect.signature(fusion).parameters
               if name not in ('channels', 'norm_cfg')]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"LESA fusion {cfg['type']!r} has no option(s) "
                         f'{unknown}; its options are {allowed}')
    return fusion(channels, norm_cfg=norm_cfg, **options)
