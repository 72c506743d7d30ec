"""LESA: Locally Enhanced Self-Attention (arXiv:2107.05637).

``LESA(x) = pool( u + gate(u, b) * b )`` with

* ``u = LESAUnary(x)``: the local term, a grouped 3x3 convolution (optionally
  deformable), a 1x1 convolution and a BatchNorm;
* ``b = LESABinary(x)``: the context term, global multi-head self-attention
  with relative positions and BatchNorms over the qkv projection, the logits
  and the outputs;
* the fusion (``fusion.py``): by default the dynamic gate computed from
  ``[u, b]``.

The three pieces live in ``unary.py``, ``binary.py`` and ``fusion.py``;
this file composes them into the layer.

Without the unary term (``with_unary=False``) the layer is the plain
relative-position self-attention that LESA starts from: ``pool(b)``.

``docs/lesa.md`` (sections 1-5) states the computation; this file follows
it term by term.
"""
import contextlib

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from lesa_mm.registry import ROOT_MODELS
from ..utils import boolean, channel_norm, positive_int, registered_layer_cfg
from .attention import ATTENTION_IMPLS
from .binary import LESABinary
from .fusion import build_fusion
from .position import POSITION_ENCODINGS
from .unary import LESAUnary

PE_TYPES = tuple(POSITION_ENCODINGS)


@contextlib.contextmanager
def _restored_running_stats(module):
    """Undo the running-statistic updates made inside the block (used while
    checkpointing recomputes a forward, so that ``with_cp`` updates the
    BatchNorm statistics exactly once, as without it)."""
    norms = [m for m in module.modules()
             if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


@ROOT_MODELS.register_module()
class LESA(BaseModule):
    """Locally Enhanced Self-Attention layer, a drop-in for a 3x3 conv.

    Args:
        in_channels (int): Input channels ``Cin`` (divisible by ``groups``).
        out_channels (int): Output channels ``C`` (divisible by
            ``2 * groups``).
        feat_size (int | tuple[int, int]): Feature-map size, at the layer's
            input, that the relative position tables are built for.
            ``'classification'`` accepts exactly this size;
            ``'detection_qr'`` any size (the centre of its tables for
            smaller maps, interpolated tables for larger ones).
        groups (int): Heads of the binary term and groups of the unary
            convolution. Defaults to 8.
        stride (int): If > 1, the fused output is average-pooled with this
            kernel and stride (attention runs at the input resolution); the
            output is ``ceil(H / stride) x ceil(W / stride)``, the size of a
            strided convolution's, a window overhanging an odd side averaging
            the positions it covers. Defaults to 1.
        pe_type (str): Relative position encoding, ``'detection_qr'``
            (decomposed 2-D, queries only) or ``'classification'``
            (flattened 1-D for queries, keys and values).
            Defaults to ``'detection_qr'``.
        dcn (dict, optional): mmcv deformable-conv config for the unary 3x3
            convolution. Defaults to None.
        with_cp (bool): Gradient-checkpoint the unary and binary terms.
            Defaults to False.
        fusion (dict, optional): The fusion of the two terms,
            ``dict(type=name, **options)`` with a name of
            :data:`~lesa_mm.models.layers.fusion.FUSIONS`: ``'DynamicGate'``
            (LESA's gate; its options give deeper, wider-kernel or grouped
            gates) or ``'Sum'`` (``u + b``). None only with
            ``with_unary=False``. Defaults to ``dict(type='DynamicGate')``.
        with_unary (bool): Build the unary term. False gives the
            self-attention baseline, the binary term alone (its attention
            includes each position itself); it then takes
            ``fusion=None`` and has no use for ``dcn``. Defaults to True.
        norm_cfg (dict): Config of every internal norm.
            Defaults to ``dict(type='BN')``.
        attn_impl (str): Kernel of the binary term: ``'fused'`` (no
            ``L x L`` tensor for ``'detection_qr'``; identical outputs,
            gradients and running statistics) or ``'reference'`` (the spec's
            direct formulation). Defaults to ``'fused'``.
        dilation (int): Dilation of the unary term's 3x3 convolution, for a
            layer in a dilated ResNet stage; the binary term is global and
            has none. Defaults to 1 (the method's layer).
        init_cfg (dict | list[dict], optional): MMEngine init config.
            Without one, the layer keeps the initialisation its terms give
            themselves when built (see :meth:`init_weights`).
    """

    def __init__(self,
                 in_channels,
                 out_channels,
                 feat_size,
                 groups=8,
                 stride=1,
                 pe_type='detection_qr',
                 dcn=None,
                 with_cp=False,
                 norm_cfg=dict(type='BN'),
                 attn_impl='fused',
                 fusion=dict(type='DynamicGate'),
                 with_unary=True,
                 dilation=1,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        in_channels = positive_int('LESA', 'in_channels', in_channels)
        out_channels = positive_int('LESA', 'out_channels', out_channels)
        groups = positive_int('LESA', 'groups', groups)
        stride = positive_int('LESA', 'stride', stride)
        dilation = positive_int('LESA', 'dilation', dilation)
        with_cp = boolean('LESA', 'with_cp', with_cp)
        with_unary = boolean('LESA', 'with_unary', with_unary)
        if with_unary == (fusion is None):
            raise ValueError(
                f'LESA with_unary={with_unary} needs '
                f"{'a fusion config' if with_unary else 'fusion=None'} (the "
                f'self-attention baseline, with_unary=False, has no unary '
                f'term to fuse), got fusion={fusion!r}')
        if pe_type not in PE_TYPES:
            raise ValueError(f'LESA pe_type must be one of {PE_TYPES}, got '
                             f'{pe_type!r}')
        if out_channels % (2 * groups) != 0:
            raise ValueError(
                f'LESA out_channels must be divisible by 2 * groups = '
                f'{2 * groups} (half of each head is query/key), got '
                f'out_channels={out_channels}')
        if in_channels % groups != 0:
            raise ValueError(
                f'LESA in_channels must be divisible by groups = {groups} '
                f'(grouped unary convolution), got in_channels={in_channels}')
        if attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f'LESA attn_impl must be one of '
                             f'{ATTENTION_IMPLS}, got {attn_impl!r}')
        registered_layer_cfg('LESA', 'dcn', dcn,
                             dict(type='DCN', deform_groups=1), optional=True)
        registered_layer_cfg('LESA', 'norm_cfg', norm_cfg, dict(type='BN'))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.stride = stride
        self.with_cp = with_cp

        channel_norm('LESA', norm_cfg,
                     build_norm_layer(norm_cfg, out_channels)[1])
        self.unary = None
        if with_unary:
            self.unary = LESAUnary(in_channels, out_channels, groups, dcn,
                                   norm_cfg, dilation)
        self.binary = LESABinary(in_channels, out_channels, groups, feat_size,
                                 pe_type, norm_cfg, attn_impl)
        self.fusion = None
        if with_unary:
            self.fusion = build_fusion(fusion, out_channels, norm_cfg)
        # ceil_mode: an odd side keeps its last row/column (averaged over
        # what the window covers), so the output has the size of the
        # block's strided projection, (H + 1) // 2 at stride 2, as
        # MMDetection's avg_down pooling; on sides divisible by the stride
        # it is the plain AvgPool2d(stride, stride)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True,
                                 count_include_pad=False) \
            if stride > 1 else None

    @property
    def pe_type(self):
        return self.binary.pe_type

    @property
    def feat_size(self):
        return self.binary.position.feat_size

    def init_weights(self):
        """Each term initialises itself when built, as ``docs/lesa.md``
        section 5 states (qkv ~ N(0, 1/Cin), other convolutions Kaiming
        normal (fan_out, relu), norms weight 1 / bias 0, position tables per
        their encoding, deformable offsets 0); an ``init_cfg`` is applied
        over that."""
        if self.init_cfg is not None:
            super().init_weights()

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'LESA expects an input of shape (N, {self.in_channels}, H, W), '
                f'got {tuple(x.shape)}')
        if x.numel() == 0:
            raise ValueError(f'LESA needs a non-empty input (N, H, W >= 1), '
                             f'got shape {tuple(x.shape)}')

    def _term(self, term, x):
        if self.with_cp and torch.is_grad_enabled():
            return cp.checkpoint(
                term, x, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(),
                                    _restored_running_stats(term)))
        return term(x)

    def forward(self, x):
        self._check_input(x)
        u = None if self.unary is None else self._term(self.unary, x)
        b = self._term(self.binary, x)  # checks the size (split_heads)
        y = b if u is None else self.fusion(u, b)
        if self.pool is not None:
            y = self.pool(y)
        return y

    def extra_repr(self):
        return (f'in_channels={self.in_channels}, out_channels='
                f'{self.out_channels}, groups={self.groups}, stride='
                f'{self.stride}, pe_type={self.pe_type!r}, attn_impl='
                f'{self.binary.attn_impl!r}, with_cp={self.with_cp}, '
                f'with_unary={self.unary is not None}')
