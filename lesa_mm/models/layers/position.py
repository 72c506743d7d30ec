"""Relative position encodings of LESA's binary (context) term.

Two kinds, chosen by ``pe_type`` (see ``docs/lesa.md`` section 3):

* :class:`DecomposedRelPos2d` (``'detection_qr'``): two tables, one for row
  offsets and one for column offsets, read by the queries only.
* :class:`FlattenedRelPos1d` (``'classification'``): one table indexed by the
  offset between *flattened raster indices*, read by queries, keys and values.

Each encoding carries its whole behaviour (the interface of
:class:`RelativePosition`): its tables, its position logits and outputs for
the spec's direct formulation (:func:`.attention.reference_attention`), and
its exact memory-efficient attention (``fused_attention``: the batch
statistics of its logits, then its kernel module, :mod:`.decomposed_kernels`
or :mod:`.flattened_kernels`). A third encoding is one more class here,
registered in :data:`POSITION_ENCODINGS`.
"""
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.utils import to_2tuple

from .capture import is_shape_generic_capture
from .decomposed_kernels import decomposed_attention
from .flattened_kernels import flattened_attention, per_position
from .kernel_utils import cast, content_moments, exact_moments


def _check_feat_size(feat_size):
    size = to_2tuple(feat_size)
    if len(size) != 2 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool)
            and s > 0 for s in size):
        raise ValueError(f'feat_size must be a positive int or a pair of '
                         f'positive ints (height, width), got {feat_size!r}')
    return tuple(int(s) for s in size)


def relative_index(n_query: int, n_key: int, offset: int,
                   device=None) -> torch.Tensor:
    """``index[i, j] = j - i + offset`` for ``i < n_query``, ``j < n_key``."""
    q = torch.arange(n_query, device=device)
    k = torch.arange(n_key, device=device)
    return k[None, :] - q[:, None] + offset


def _window_sums(x, length):
    """``out[..., i] = sum_{m=i}^{i+L-1} x[..., m]`` for ``x (..., 2L-1)``:
    differences of a running sum, ``O(L)`` per row."""
    running = F.pad(x.cumsum(-1), (1, 0))
    return running[..., length:] - running[..., :length]


class RelativePosition(nn.Module):
    """Interface of a relative position encoding of the binary term.

    Attributes:
        pe_type (str): The ``pe_type`` that names it.
        any_size (bool): Whether it serves every feature-map size (else only
            the size it was built for).
        num_terms (int): Its logit terms (besides the content logits
            ``q.k``), each normalised by its own ``BNsim`` channels.
        num_outputs (int): Per-head outputs of the attention: the weighted
            values, then any weighted embeddings.
        table_offset_dims (dict[str, int]): The offset axis of each table.
    """

    pe_type = None
    any_size = True
    num_terms = 1
    num_outputs = 1
    #: The axis of each table (by parameter name) that runs over relative
    #: offsets, whose length follows from the feature size.
    table_offset_dims = {}

    def check_size(self, height: int, width: int):
        """Raise ``ValueError`` for a size the encoding cannot serve."""

    def logits(self, q, k, height, width, queries=None):
        """The position logit terms, each ``(N, g, Lq, L)``, of the spec's
        direct formulation (for the queries at flat indices ``queries``, or
        all)."""
        raise NotImplementedError

    def embedding_outputs(self, attn, height, width):
        """The outputs besides ``attn @ v`` (``(N, g, dv, L)`` each) of the
        direct formulation, from the ``(N, g, L, L)`` attention."""
        return []

    def fused_attention(self, q, k, v, logit_norm, height, width):
        """The exact memory-efficient attention: the outputs of the direct
        formulation (``[o_v, ...]``) with the logits normalised by
        ``logit_norm`` (a :class:`.LogitBatchNorm`)."""
        raise NotImplementedError

    def logit_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one head's position terms, as the method
        defines them."""
        raise NotImplementedError


class DecomposedRelPos2d(RelativePosition):
    """2-D relative positions decomposed into row and column tables.

    ``S_r[i, j] = q_i . Th[r_j - r_i + P - 1] + q_i . Tw[c_j - c_i + P - 1]``
    for query ``i`` at ``(r_i, c_i)`` and key ``j`` at ``(r_j, c_j)``.

    A map no larger than the trained size ``P`` reads the centre of the
    tables (exactly the offsets it can produce). A larger map reads tables
    linearly interpolated to ``2 * size - 1`` offsets (as ViTDet resizes its
    relative positions), so inputs of any size are served.

    Args:
        feat_size (int | tuple[int, int]): Trained feature size ``P``
            (height, width).
        head_channels (int): Query channels per head ``dq``.
        value_channels (int, optional): Value channels per head; unused (the
            encoding has no value embeddings).
    """

    pe_type = 'detection_qr'
    table_offset_dims = dict(rel_height=0, rel_width=0)

    def __init__(self, feat_size, head_channels: int, value_channels=None):
        super().__init__()
        ph, pw = _check_feat_size(feat_size)
        self.head_channels = head_channels
        self.rel_height = nn.Parameter(torch.empty(2 * ph - 1, head_channels))
        self.rel_width = nn.Parameter(torch.empty(2 * pw - 1, head_channels))
        self.reset_parameters()

    @property
    def feat_size(self):
        """``(Ph, Pw)``, the feature size the tables hold offsets for (a
        checkpoint's tables, loaded, bring their own)."""
        return ((self.rel_height.shape[0] + 1) // 2,
                (self.rel_width.shape[0] + 1) // 2)

    def reset_parameters(self):
        scale = self.head_channels**-0.5
        with torch.no_grad():
            self.rel_height.normal_(0, 1).mul_(scale)
            self.rel_width.normal_(0, 1).mul_(scale)

    @staticmethod
    def axis_table(table: torch.Tensor, size: int) -> torch.Tensor:
        """Table rows for offsets ``-(size-1) .. size-1`` along one axis:
        the centre of ``table`` if it has enough rows, else ``table``
        linearly interpolated to ``2 * size - 1`` rows (as
        ``F.interpolate(mode='linear', align_corners=False)``).

        A size known in Python (eager mode, ``torch.compile``, which
        guards the choice) chooses the reading in Python. A traced or
        exported graph must keep the choice for every input size: there
        both readings are one linear interpolation
        ``(1 - t) T[i0] + t T[i1]`` at source positions chosen by a tensor
        condition; the centre reading has ``t = 0``, so it returns the
        table's rows exactly either way.
        """
        rows = table.shape[0]  # 2 P - 1
        static = isinstance(size, int) and not is_shape_generic_capture()
        if static and 2 * size - 1 <= rows:
            start = (rows + 1) // 2 - size  # P - size
            return table[start:start + 2 * size - 1]
        # output offsets j = 0 .. 2 size - 2; `last` = 2 size - 2
        j = torch.arange(2 * size - 1, device=table.device,
                         dtype=torch.promote_types(table.dtype,
                                                   torch.float32))
        last = j[-1]
        scale = rows / (last + 1)
        source = ((j + 0.5) * scale - 0.5).clamp_min(0)  # stretched
        if not static:
            centre = j + (rows - 1 - last) / 2  # j + P - size
            source = torch.where(last <= rows - 1, centre, source)
        index = source.long().clamp_max(rows - 1)
        frac = (source - index).clamp(0, 1).to(table.dtype).unsqueeze(-1)
        upper = (index + 1).clamp_max(rows - 1)
        return table[index] * (1 - frac) + table[upper] * frac

    def tables(self, height: int, width: int):
        """Per-query-row and per-query-column tables.

        Returns:
            tuple[Tensor, Tensor]: ``Th`` gathered to ``(H, H, dq)`` with
            ``[r_i, r_j] -> Th[r_j - r_i]`` (offset ``r_j - r_i``) and ``Tw``
            gathered to ``(W, W, dq)`` likewise.
        """
        th = self.axis_table(self.rel_height, height)
        tw = self.axis_table(self.rel_width, width)
        dev = th.device
        return (th[relative_index(height, height, height - 1, dev)],
                tw[relative_index(width, width, width - 1, dev)])

    def axis_logits(self, q: torch.Tensor, height: int, width: int,
                    tables=None):
        """Row and column logits of every query.

        Args:
            q (Tensor): Queries ``(N, g, dq, L)``.
            tables (tuple[Tensor, Tensor], optional): :meth:`tables`, if
                already computed.

        Returns:
            tuple[Tensor, Tensor]: ``row (N, g, L, H)`` with
            ``row[i, r] = q_i . Th[r - r_i + P - 1]`` and ``col (N, g, L, W)``
            with ``col[i, c] = q_i . Tw[c - c_i + P - 1]``.
        """
        n, g, d, _ = q.shape
        th, tw = tables or self.tables(height, width)
        q = q.reshape(n, g, d, height, width)
        row = torch.einsum('ngdyx,yrd->ngyxr', q, cast(th, q.dtype))
        col = torch.einsum('ngdyx,xcd->ngyxc', q, cast(tw, q.dtype))
        return (row.reshape(n, g, height * width, height),
                col.reshape(n, g, height * width, width))

    def logit_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one head's position logits: the row and
        column products ``L (H + W) dq`` (their sum is an addition)."""
        return height * width * (height + width) * self.head_channels

    def logits(self, q, k, height, width, queries=None):
        """``[S_r]``: the ``(N, g, Lq, L)`` position logits
        ``S_r[i, j] = R[i, r_j] + C[i, c_j]``."""
        row, col = self.axis_logits(q, height, width)
        if queries is not None:
            row, col = row[:, :, queries], col[:, :, queries]
        n, g, count, _ = row.shape
        dense = row.unsqueeze(-1) + col.unsqueeze(-2)  # (N, g, Lq, H, W)
        return [dense.reshape(n, g, count, height * width)]

    @staticmethod
    def _moments(q, k, row, col):
        """Per-channel sums and sums of squares of ``S_qk`` and ``S_r`` over
        ``(N, L, L)``, without ``L x L`` tensors: with
        ``S_r[i, j] = R[i, r_j] + C[i, c_j]``,
        ``sum_j S_r = W sum_r R + H sum_c C`` and
        ``sum_j S_r^2 = W sum_r R^2 + H sum_c C^2 + 2 (sum_r R)(sum_c C)``.
        """
        height, width = row.shape[-1], col.shape[-1]
        qk_sum, qk_sq, count = content_moments(q, k)
        row_sum, col_sum = row.sum(-1), col.sum(-1)
        pos_sum = (width * row_sum + height * col_sum).sum(-1).sum(0)
        pos_sq = (width * row.square().sum(-1) +
                  height * col.square().sum(-1) +
                  2 * row_sum * col_sum).sum(-1).sum(0)
        return (torch.cat([qk_sum, pos_sum]), torch.cat([qk_sq, pos_sq]),
                count)

    def fused_attention(self, q, k, v, logit_norm, height, width):
        """``softmax_j(a q_i.k_j + b (R[i, r_j] + C[i, c_j])) v_j`` with the
        per-head scales ``a, b`` of ``BNsim`` (its shift is constant over
        the keys; batch statistics in closed form, :meth:`_moments`), on the
        kernel :func:`.decomposed_kernels.decomposed_attention` chooses: no
        ``L x L`` tensor."""
        tables = self.tables(height, width)
        # (N, g, L, H), (N, g, L, W)
        row, col = self.axis_logits(q, height, width, tables)
        scale = logit_norm.scales(
            lambda: exact_moments(self._moments, q, k, row, col))
        return [decomposed_attention(q, k, v, scale, tables, row, col, height,
                                     width)]

    def extra_repr(self):
        return f'feat_size={self.feat_size}, head_channels={self.head_channels}'


class FlattenedRelPos1d(RelativePosition):
    """Relative positions over the flattened raster index (classification).

    One table ``E`` of shape ``(2 dq + dv, 2K - 1)`` with ``K = Ph * Pw``;
    rows split into ``Eq`` (dq), ``Ek`` (dq) and ``Ev`` (dv), and
    ``e[m] = E[:, m + K - 1]`` for offset ``m``. Only the trained size is
    accepted.

    Args:
        feat_size (int | tuple[int, int]): Feature size (height, width).
        head_channels (int): Query channels per head ``dq``.
        value_channels (int): Value channels per head ``dv``.
    """

    pe_type = 'classification'
    any_size = False
    num_terms = 2
    num_outputs = 2
    table_offset_dims = dict(relative=1)

    def __init__(self, feat_size, head_channels: int, value_channels: int):
        super().__init__()
        self.feat_size = _check_feat_size(feat_size)
        self.head_channels = head_channels
        self.value_channels = value_channels
        length = self.feat_size[0] * self.feat_size[1]
        self.relative = nn.Parameter(
            torch.empty(2 * head_channels + value_channels, 2 * length - 1))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.relative.normal_(0, math.sqrt(1.0 / self.value_channels))

    def check_size(self, height: int, width: int):
        if (height, width) != self.feat_size:
            ph, pw = self.feat_size
            raise ValueError(
                f"LESA 'classification' position encodings serve only the "
                f'trained feature size {ph}x{pw}, got a {height}x{width} '
                f"input; use pe_type='detection_qr' for other sizes")

    def tables(self, height: int, width: int):
        """``(Eq, Ek, Ev)`` gathered to ``(c, L, L)`` with
        ``[:, i, j] -> E[:, i - j + K - 1]`` (offset first index minus
        second), by the flattened index the spec writes."""
        length = height * width
        index = relative_index(length, length, length - 1,
                               self.relative.device).t()
        emb = self.relative[:, index]
        d = self.head_channels
        return emb.split([d, d, self.value_channels], dim=0)

    def logits(self, q, k, height, width, queries=None):
        """``[S_qr, S_kr]``: ``S_qr[i, j] = q_i . Eq[i - j]`` and
        ``S_kr[i, j] = k_j . Ek[j - i]``, each ``(N, g, Lq, L)``."""
        eq, ek, _ = self.tables(height, width)
        q_i = q
        if queries is not None:
            eq, ek, q_i = eq[:, queries], ek[:, :, queries], q[..., queries]
        return [torch.einsum('ngci,cij->ngij', q_i, eq),
                torch.einsum('ngcj,cji->ngij', k, ek)]

    def embedding_outputs(self, attn, height, width):
        """``[o_e]``: ``o_e[i] = sum_j attn[i, j] Ev[i - j]``."""
        _, _, ev = self.tables(height, width)
        return [torch.einsum('ngij,cij->ngci', attn, ev)]

    def _moments(self, q, k, q_pos, k_pos):
        """Per-channel sums and sums of squares of ``S_qk``, ``S_qr`` and
        ``S_kr`` over ``(N, L, L)``, in closed form. Query ``i`` meets the
        offsets ``i .. i + L - 1`` of ``Eq`` (key ``j`` those of ``Ek``), so
        ``sum_j S_qr[i, j] = q_i . A_i`` and
        ``sum_j S_qr[i, j]^2 = q_i^T G_i q_i`` with ``A_i`` and ``G_i`` the
        sums of ``e_m`` and ``e_m e_m^T`` over that window (likewise for
        ``S_kr`` over the keys). ``q_pos`` and ``k_pos`` are ``q`` and ``k``
        laid out per position (:func:`.flattened_kernels.per_position`)."""
        length = q.shape[-1]
        d = self.head_channels
        table = cast(self.relative, q.dtype)
        sums, sq_sums = [], []
        for x, x_i, e in ((q, q_pos, table[:d]), (k, k_pos, table[d:2 * d])):
            outer = e[:, None, :] * e[None, :, :]  # (d, d, 2L-1)
            window, gram = _window_sums(e, length), _window_sums(outer, length)
            sums.append((x * window).sum((0, 2, 3)))
            # q_i^T G_i q_i as one batched product over the positions i
            quad = torch.bmm(x_i,
                             gram.permute(2, 0, 1).contiguous())
            n, g = x.shape[:2]
            sq_sums.append((quad * x_i).sum(-1).view(length, n, g).sum((0, 1)))
        qk_sum, qk_sq, count = content_moments(q, k)
        return (torch.cat([qk_sum, *sums]), torch.cat([qk_sq, *sq_sums]),
                count)

    def fused_attention(self, q, k, v, logit_norm, height, width):
        """``softmax_j(a q_i.k_j + b S_qr + c S_kr)`` with the per-head
        scales of ``BNsim`` (its shift is constant over the keys), batch
        statistics in closed form (:meth:`_moments`), on
        :func:`.flattened_kernels.flattened_attention`: no ``(c, L, L)``
        gather of the table, no pass over the ``L x L`` logits to normalise
        them."""
        q_pos, k_pos = per_position(q), per_position(k)  # (L, N g, dq)
        scale = logit_norm.scales(
            lambda: exact_moments(self._moments, q, k, q_pos, k_pos))
        return flattened_attention(q, k, v, q_pos, k_pos, scale,
                                   self.relative)

    def logit_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one head's position logits and value
        embeddings: ``q.Eq`` and ``k.Ek`` (``L^2 dq`` each) and the
        softmax-weighted ``Ev`` (``L^2 dv``)."""
        length = height * width
        return length * length * (2 * self.head_channels +
                                   self.value_channels)

    def extra_repr(self):
        return (f'feat_size={self.feat_size}, head_channels='
                f'{self.head_channels}, value_channels={self.value_channels}')


POSITION_ENCODINGS = {
    cls.pe_type: cls
    for cls in (DecomposedRelPos2d, FlattenedRelPos1d)
}
