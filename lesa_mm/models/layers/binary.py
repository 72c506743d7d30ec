"""LESA's binary (context) term: multi-head self-attention with relative
positions and BatchNorms over the projection, the logits and the outputs
(``docs/lesa.md``, section 3), and the layout of its state dict."""
import math
import re

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from torch.nn.modules.batchnorm import _BatchNorm

from .attention import ATTENTION_KERNELS, under_functorch
from .logit_norm import LogitBatchNorm
from .position import POSITION_ENCODINGS


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
