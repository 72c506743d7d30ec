"""LESA: Locally Enhanced Self-Attention (arXiv:2107.05637).

``LESA(x) = pool( u + gate(u, b) * b )`` with

* ``u = LESAUnary(x)``: the local term, a grouped 3x3 convolution (optionally
  deformable), a 1x1 convolution and a BatchNorm;
* ``b = LESABinary(x)``: the context term, global multi-head self-attention
  with relative positions and BatchNorms over the qkv projection, the logits
  and the outputs;
* the fusion (``fusion.py``): by default the dynamic gate computed from
  ``[u, b]``.

Without the unary term (``with_unary=False``) the layer is the plain
relative-position self-attention that LESA starts from: ``pool(b)``.

``docs/lesa.md`` (sections 1-5) states the computation; this file follows
it term by term.
"""
import contextlib
import math
import re

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
# importing mmcv.ops registers the deformable convs ('DCN', 'DCNv2') that
# `dcn` configs name
import mmcv.ops  # noqa: F401
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init
from torch.nn.modules.batchnorm import _BatchNorm

from lesa_mm.registry import ROOT_MODELS
from ..utils import (boolean, channel_norm, init_convs_and_norms,
                     positive_int, registered_layer_cfg, split_dcn_cfg)
from .attention import ATTENTION_IMPLS, ATTENTION_KERNELS, under_functorch
from .fusion import build_fusion
from .logit_norm import LogitBatchNorm
from .position import POSITION_ENCODINGS

PE_TYPES = tuple(POSITION_ENCODINGS)


class LESAUnary(nn.Module):
    """Local (unary) term: ``BN_x(Conv1x1(GroupConv3x3(x)))``.

    Args:
        in_channels (int): Input channels.
        channels (int): Output channels ``C``.
        groups (int): Groups of the 3x3 convolution. The 1x1 convolution that
            mixes the groups exists only when ``groups != 1``.
        dcn (dict, optional): mmcv config of a deformable convolution used as
            the 3x3 convolution, e.g. ``dict(type='DCN', deform_groups=1)``.
        norm_cfg (dict): Config of the BatchNorm.
    """

    def __init__(self, in_channels, channels, groups, dcn=None,
                 norm_cfg=dict(type='BN')):
        super().__init__()
        # LESA's unary conv never strides: fallback_on_stride has no use
        conv_cfg, _ = split_dcn_cfg(dcn)
        self.conv = build_conv_layer(
            conv_cfg, in_channels, channels, kernel_size=3, padding=1,
            groups=groups, bias=False)
        self.pointwise = (nn.Conv2d(channels, channels, 1, bias=False)
                    if groups != 1 else None)
        self.norm = build_norm_layer(norm_cfg, channels)[1]
        init_convs_and_norms(self)
        offset = getattr(self.conv, 'conv_offset', None)
        if offset is not None:  # a deformable conv starts undeformed
            constant_init(offset, 0)

    def forward(self, x):
        x = self.conv(x)
        if self.pointwise is not None:
            x = self.pointwise(x)
        return self.norm(x)


class LESABinary(nn.Module):
    """Context (binary) term: multi-head self-attention, relative positions.

    ``t = BN_qkv(Conv1x1(x))`` is split head-major into ``q, k, v``; the
    logits ``q.k`` and the position logits are each normalised by one
    BatchNorm (``logit_norm``) and summed; the softmax-weighted values (plus,
    for classification encodings, the softmax-weighted value embeddings) are
    normalised by ``out_norm``.

    Args:
        in_channels (int): Input channels.
        channels (int): Output channels ``C``; ``dq = C / (2 g)`` query/key
            and ``dv = C / g`` value channels per head.
        groups (int): Number of heads ``g``.
        feat_size (int | tuple[int, int]): Feature size the position tables
            are built for.
        pe_type (str): ``'detection_qr'`` or ``'classification'``.
        norm_cfg (dict): Config of the BatchNorms.
        attn_impl (str): ``'fused'`` (exact, memory-efficient) or
            ``'reference'`` (the spec's direct formulation).
    """

    def __init__(self, in_channels, channels, groups, feat_size, pe_type,
                 norm_cfg=dict(type='BN'), attn_impl='fused'):
        super().__init__()
        self.attn_impl = attn_impl
        self.groups = groups
        self.head_channels = channels // (2 * groups)  # dq
        self.value_channels = channels // groups  # dv
        self.qkv = nn.Conv2d(in_channels, 2 * channels, 1, bias=False)
        nn.init.normal_(self.qkv.weight, 0, math.sqrt(1.0 / in_channels))
        self.qkv_norm = build_norm_layer(norm_cfg, 2 * channels)[1]
        self.position = POSITION_ENCODINGS[pe_type](
            feat_size, self.head_channels, self.value_channels)
        logit_norm = build_norm_layer(
            norm_cfg, (1 + self.position.num_terms) * groups)[1]
        if isinstance(logit_norm, _BatchNorm):
            logit_norm = LogitBatchNorm.from_norm(logit_norm)
        elif attn_impl == 'fused':
            raise ValueError(
                f"LESA attn_impl='fused' needs a BatchNorm-type norm_cfg "
                f"(it folds the norm over logits into the softmax), got "
                f"{norm_cfg!r}; use attn_impl='reference' for other norms")
        self.logit_norm = logit_norm
        # the outputs o_v (and o_e), interleaved per channel
        self.out_norm = build_norm_layer(
            norm_cfg, self.position.num_outputs * channels)[1]

    @property
    def pe_type(self):
        return self.position.pe_type

    def train(self, mode=True):
        self._adopt_synced_logit_norm()
        return super().train(mode)

    def _adopt_synced_logit_norm(self):
        """A runner's ``sync_bn`` conversion (MMEngine's
        ``convert_sync_batchnorm``, after the model is built, before it
        trains or tests) replaces ``logit_norm`` by a plain SyncBatchNorm,
        which cannot give the fused kernels their scales. Take it back as a
        synchronised :class:`LogitBatchNorm` holding the same parameter and
        buffer objects (those the optimizer and the DDP wrapper hold), so
        that the conversion works; called by :meth:`train` and
        :meth:`eval`, which the runner's loops call first."""
        norm = self.logit_norm
        if isinstance(norm, LogitBatchNorm) or not _is_sync_batchnorm(norm):
            return
        adopted = LogitBatchNorm(norm.num_features, norm.eps, norm.momentum,
                                 norm.affine, norm.track_running_stats,
                                 sync=True)
        for name in ('weight', 'bias', 'running_mean', 'running_var',
                     'num_batches_tracked'):
            setattr(adopted, name, getattr(norm, name))
        self.logit_norm = adopted

    def attention_macs(self, batch, height, width):
        """Multiply-accumulates of the attention on ``batch`` maps of
        ``height x width``, as the method defines it (``docs/lesa.md``,
        section 3), whichever kernel runs: the content logits ``q.k``
        (``L^2 dq`` per head), the position terms (the encoding's
        ``logit_macs``) and the softmax-weighted values (``L^2 dv``). The
        ``qkv`` convolution and the norms are counted as modules.
        """
        length = height * width
        per_head = (length * length *
                    (self.head_channels + self.value_channels) +
                    self.position.logit_macs(height, width))
        return batch * self.groups * per_head

    def split_heads(self, x):
        """``q (N,g,dq,L)``, ``k (N,g,dq,L)``, ``v (N,g,dv,L)`` of ``x``,
        whose size the position encoding must serve: the one place the
        input size is checked (every path of the binary term, and so of the
        layer, starts here)."""
        n, _, h, w = x.shape
        self.position.check_size(h, w)
        t = self.qkv_norm(self.qkv(x))
        t = t.view(n, self.groups, 2 * self.head_channels + self.value_channels,
                   h * w)
        d = self.head_channels
        return t.split([d, d, self.value_channels], dim=2)

    @torch.no_grad()
    def attention_maps(self, x, queries):
        """Attention of chosen query positions over all keys, for
        visualisation: ``softmax_j`` of the normalised logits, with the
        norms' running statistics (the layer's eval-mode attention).

        Args:
            x (Tensor): Layer input ``(N, Cin, H, W)``.
            queries (Sequence[int]): Flat (raster) indices ``r * W + c``.

        Returns:
            Tensor: ``(N, g, len(queries), H, W)``, each map summing to 1.
        """
        n, _, h, w = x.shape
        index = torch.as_tensor(queries, device=x.device, dtype=torch.long)
        if index.numel() == 0 or index.min() < 0 or index.max() >= h * w:
            raise ValueError(f'query indices must lie in [0, {h * w}) for a '
                             f'{h}x{w} map, got {list(queries)}')
        q, k, _ = self.split_heads(x)
        scale = self.logit_norm.running_scales().to(q.dtype)
        scale = scale.view(-1, self.groups, 1, 1)  # (terms, g, 1, 1)
        terms = [torch.einsum('ngcq,ngcj->ngqj', q[..., index], k),
                 *self.position.logits(q, k, h, w, queries=index)]
        logits = sum(s * term for s, term in zip(scale, terms))
        return logits.softmax(dim=-1).view(n, self.groups, -1, h, w)

    def forward(self, x):
        n, _, h, w = x.shape
        q, k, v = self.split_heads(x)
        impl = self.attn_impl
        if impl == 'fused' and under_functorch(q):
            impl = 'reference'  # torch.func transforms need plain ops
        attention = ATTENTION_KERNELS[impl]
        outs = attention(q, k, v, self.position, self.logit_norm, h, w)
        if len(outs) == 1:
            # contiguous: with one head the reshape is a view, laid out
            # channels-last, and for a batch of one its batch stride can be
            # one that PyTorch's CPU BatchNorm backward misreads (a
            # silently wrong input gradient, seen with torch 2.13)
            return self.out_norm(outs[0].reshape(n, -1, h, w).contiguous())
        stacked = torch.stack(outs, dim=3)  # (N, g, dv, outputs, L)
        normed = self.out_norm(stacked.reshape(n, -1, h, w))
        return normed.view(n, -1, len(outs), h, w).sum(dim=2)


#: A state-dict key under a LESA layer's binary term.
_BINARY_KEY = re.compile(r'(.+)\.binary\.(\w+)\.(.+)')


def binary_key_parts(key):
    """``(layer, part, name)`` of a state-dict key under the binary term of
    a LESA layer, e.g. ``'layer3.1.conv2.binary.position.rel_height'`` ->
    ``('layer3.1.conv2', 'position', 'rel_height')``; None for any other
    key. The one statement of the layer's layout that checkpoint adaptation
    reads (:mod:`lesa_mm.utils.transfer`)."""
    match = _BINARY_KEY.fullmatch(key)
    return match.groups() if match else None


def _is_sync_batchnorm(norm):
    """torch's or mmcv's SyncBatchNorm (the two ``sync_bn`` conversions)."""
    from mmcv.ops import SyncBatchNorm as MMSyncBatchNorm
    return isinstance(norm, (nn.SyncBatchNorm, MMSyncBatchNorm))


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
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        in_channels = positive_int('LESA', 'in_channels', in_channels)
        out_channels = positive_int('LESA', 'out_channels', out_channels)
        groups = positive_int('LESA', 'groups', groups)
        stride = positive_int('LESA', 'stride', stride)
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
                                   norm_cfg)
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
