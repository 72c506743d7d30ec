"""Relative position encodings of LESA's binary (context) term.

Two kinds, chosen by ``pe_type`` (see ``docs/lesa.md`` section 3):

* :class:`DecomposedRelPos2d` (``'detection_qr'``): two tables, one for row
  offsets and one for column offsets, read by the queries only.
* :class:`FlattenedRelPos1d` (``'classification'``): one table indexed by the
  offset between *flattened raster indices*, read by queries, keys and values.

Both modules only hold the tables and know how to look them up for a given
feature-map size; the attention kernels in :mod:`.attention` consume them.
"""
import math
import numbers

import torch
import torch.nn as nn
from mmengine.utils import to_2tuple


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


class DecomposedRelPos2d(nn.Module):
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
    """

    pe_type = 'detection_qr'

    def __init__(self, feat_size, head_channels: int):
        super().__init__()
        self.feat_size = _check_feat_size(feat_size)
        self.head_channels = head_channels
        ph, pw = self.feat_size
        self.rel_height = nn.Parameter(torch.empty(2 * ph - 1, head_channels))
        self.rel_width = nn.Parameter(torch.empty(2 * pw - 1, head_channels))
        self.reset_parameters()

    def reset_parameters(self):
        scale = self.head_channels**-0.5
        with torch.no_grad():
            self.rel_height.normal_(0, 1).mul_(scale)
            self.rel_width.normal_(0, 1).mul_(scale)

    def check_size(self, height: int, width: int):
        """Every size is served (larger ones by interpolation)."""

    @staticmethod
    def axis_table(table: torch.Tensor, size: int) -> torch.Tensor:
        """Table rows for offsets ``-(size-1) .. size-1`` along one axis:
        the centre of ``table`` if it has enough rows, else ``table``
        linearly interpolated to ``2 * size - 1`` rows (as
        ``F.interpolate(mode='linear', align_corners=False)``).

        Written without a Python branch on ``size``: both readings are one
        linear interpolation ``(1 - t) T[i0] + t T[i1]`` at source
        positions chosen by a tensor condition, so a traced or exported
        graph keeps the choice for every input size. The centre reading
        has ``t = 0``, so it returns the table's rows exactly.
        """
        rows = table.shape[0]  # 2 P - 1
        # output offsets j = 0 .. 2 size - 2; `last` = 2 size - 2
        j = torch.arange(2 * size - 1, device=table.device,
                         dtype=torch.promote_types(table.dtype,
                                                   torch.float32))
        last = j[-1]
        centre = j + (rows - 1 - last) / 2  # j + P - size
        scale = rows / (last + 1)
        stretched = ((j + 0.5) * scale - 0.5).clamp_min(0)
        source = torch.where(last <= rows - 1, centre, stretched)
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

    def axis_logits(self, q: torch.Tensor, height: int, width: int):
        """Row and column logits of every query.

        Args:
            q (Tensor): Queries ``(N, g, dq, L)``.

        Returns:
            tuple[Tensor, Tensor]: ``row (N, g, L, H)`` with
            ``row[i, r] = q_i . Th[r - r_i + P - 1]`` and ``col (N, g, L, W)``
            with ``col[i, c] = q_i . Tw[c - c_i + P - 1]``.
        """
        n, g, d, _ = q.shape
        th, tw = self.tables(height, width)
        q = q.reshape(n, g, d, height, width)
        row = torch.einsum('ngdyx,yrd->ngyxr', q, th.to(q.dtype))
        col = torch.einsum('ngdyx,xcd->ngyxc', q, tw.to(q.dtype))
        return (row.reshape(n, g, height * width, height),
                col.reshape(n, g, height * width, width))

    def logit_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one head's position logits: the row and
        column products ``L (H + W) dq`` (their sum is an addition)."""
        return height * width * (height + width) * self.head_channels

    def dense_logits(self, q: torch.Tensor, height: int, width: int):
        """The full ``(N, g, L, L)`` position logits ``S_r``."""
        row, col = self.axis_logits(q, height, width)
        n, g, length, _ = row.shape
        dense = row.unsqueeze(-1) + col.unsqueeze(-2)  # (N, g, L, H, W)
        return dense.reshape(n, g, length, length)

    def extra_repr(self):
        return f'feat_size={self.feat_size}, head_channels={self.head_channels}'


class FlattenedRelPos1d(nn.Module):
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
        second)."""
        self.check_size(height, width)
        length = height * width
        index = relative_index(length, length, length - 1,
                               self.relative.device).t()
        emb = self.relative[:, index]
        d = self.head_channels
        return emb.split([d, d, self.value_channels], dim=0)

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
