"""CPU folded rows: the inference kernel of LESA's fused ``detection_qr``
attention where the key blocks' heads would be wider than the value heads
(``docs/lesa.md`` section 7.5).

The queries of one map row attend keys that carry that row's row logits,
``k'_j = k_j + Th[r_j - r]``, in key blocks of whole columns: heads
``dq + w`` wide, the value width for ``w = dv - dq``. It runs on PyTorch's
CPU flash-attention kernel (:func:`.key_blocks.cpu_flash`), whose
log-sum-exp merges the blocks exactly.
"""
import itertools

import torch
import torch.nn.functional as F

from . import key_blocks

#: Bytes of folded keys per attention call of :func:`folded_attention`.
FOLDED_CHUNK_BYTES = 16 << 20


def folded_columns(q, dv, height, width):
    """Column-block width of :func:`folded_attention` for queries ``q (...,
    dq)``, or ``None`` where the key blocks (:func:`.key_blocks.key_blocks`) or the
    one-call path are taken instead.

    Folding each query row's row logits into the keys leaves heads
    ``dq + w`` wide for key blocks of ``w`` whole columns; with
    ``w = dv - dq`` the heads reach the value width, below which no
    equal-width fused kernel goes. The folded kernel is taken without
    autograd (inference), where the key blocks would run wider than ``dv``
    and at least 8 columns fit a block. With autograd the key blocks are
    taken: the flash backward over the folded layout, whose values repeat
    for every query row, costs more than the folded forward saves.
    """
    dq = q.shape[-1]
    blocks = key_blocks.key_blocks(q, height, width)
    if torch.is_grad_enabled() or blocks is None or dv - dq < 8 or \
            dq + sum(blocks) <= dv:
        return None
    return key_blocks.block_side(max(height, width), dv - dq)


class _FoldedLayout:
    """Queries grouped by map row; keys that carry that row's row logits;
    key blocks of whole columns.

    For the queries of row ``r`` the logit ``q_i.k_j + q_i.Th[r_j - r] +
    col_s[i, c_j]`` is ``q_i.k'_j + col_s[i, c_j]`` with the folded keys
    ``k'_j = k_j + Th[r_j - r]`` (``k`` and ``Th`` already scaled). Keys of
    ``H x w`` blocks of columns then need heads ``dq + w`` wide: ``[q_i,
    col_s[i, block cols]]`` against ``[k'_j, onehot(c_j - c0)]``, zero-padded
    to the value width. Columns that pad the map to whole blocks get a
    column logit of ``finfo.min / 4``, a weight of exactly zero.
    """

    def __init__(self, height, width, block_w, dq, dv, dtype):
        self.height, self.width = height, width
        self.cols = -(-width // block_w)
        self.w = block_w
        self.pad_w = self.cols * block_w - width
        self.dq, self.dv = dq, dv
        self.size = max(dq + block_w, dv)
        self.dtype = dtype

    def key_buffer(self, rows, like):
        """``(rows, cols, H, w, size)`` folded keys of ``rows`` query rows,
        their one-hot and zero channels filled (:meth:`fold_keys` writes the
        rest)."""
        w, dq = self.w, self.dq
        buf = like.new_empty(rows, self.cols, self.height, w, self.size)
        buf[..., dq:dq + w] = torch.eye(w, dtype=like.dtype,
                                        device=like.device)
        buf[..., dq + w:] = 0
        return buf

    def key_blocks(self, k):
        """``(L, c)`` -> ``(cols, H, w, c)``, zero-padded columns."""
        c = k.shape[-1]
        k = F.pad(k.view(self.height, self.width, c), (0, 0, 0, self.pad_w))
        return k.view(self.height, self.cols, self.w, c).transpose(0, 1)

    def fold_keys(self, buf, k_blocks, table, rows):
        """``k'_j = k_j + Th[r_j - r]`` of the query rows ``rows``, written
        into ``buf``: ``(rows, cols, H w, size)``; ``table (H, H, dq)`` is
        ``[r, r_j] -> Th[r_j - r]``."""
        n = rows.stop - rows.start
        torch.add(k_blocks, table[rows, None, :, None, :],
                  out=buf[:n, ..., :self.dq])
        return buf[:n].flatten(2, 3)

    def values(self, v):
        """``(L, dv)`` -> ``(cols, H w, size)``, its last dimension
        contiguous (it is expanded over the query rows, so the kernel's
        wrapper must not have to copy it)."""
        v = F.pad(self.key_blocks(v), (0, self.size - self.dv))
        return key_blocks.unit_stride(v.flatten(1, 2))

    def queries(self, q, col_s):
        """``[q_i, col_s[i, block cols]]``: ``(H, cols, W, size)``."""
        h, wd, dq, w = self.height, self.width, self.dq, self.w
        never = torch.finfo(self.dtype).min / 4
        q_aug = q.new_empty(h, self.cols, wd, self.size)
        q_aug[..., dq + w:] = 0
        q_aug[..., :dq] = q.view(h, 1, wd, dq)
        q_aug[..., dq:dq + w] = F.pad(col_s, (0, self.pad_w), value=never) \
            .view(h, wd, self.cols, w).transpose(1, 2)
        return q_aug

    def row_chunks(self, chunk_bytes):
        """Slices of query rows with about ``chunk_bytes`` of folded keys."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_row = self.height * self.cols * self.w * self.size * elem
        chunk = max(1, chunk_bytes // per_row)
        return [slice(s, min(s + chunk, self.height))
                for s in range(0, self.height, chunk)]


def folded_attention(q, k_s, v, row_table, col_table, row_s, col_s, height,
                     width, block_w, chunk_bytes=None):
    """``softmax_j(q[i].k_s[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with
    ``row_s[i, r] = q[i].row_table[r_i, r]``, for inference (no autograd).

    The queries of each map row attend keys that carry that row's row
    logits, in key blocks of ``block_w`` whole columns
    (:class:`_FoldedLayout`): per head and chunk of query rows, one batched
    call of the CPU flash kernel over every (query row, column block) pair,
    merged over the column blocks by their log-sum-exp as in
    :class:`_KeyBlockAttention`. A map taller than wide is transposed first
    (the column logits folded), so that the folded keys are copied
    ``min(H, W)`` times.

    Args:
        q (Tensor): Queries ``(N, g, L, dq)`` (the content scale is in
            ``k_s``).
        k_s (Tensor): Scaled keys ``(N, g, L, dq)``.
        v (Tensor): Values ``(N, g, L, dv)``.
        row_table (Tensor): Scaled row table ``(g, H, H, dq)``,
            ``[r_i, r_j] -> Th[r_j - r_i]``.
        col_table (Tensor): Scaled column table ``(g, W, W, dq)``, likewise.
        row_s (Tensor): Row logits ``(N, g, L, H)``, as above.
        col_s (Tensor): Column logits ``(N, g, L, W)``, likewise.
        height (int): ``H``.
        width (int): ``W``.
        block_w (int): Columns (rows, if transposed) per key block.
        chunk_bytes (int, optional): Folded keys per kernel call, about.
            Defaults to ``FOLDED_CHUNK_BYTES``.

    Returns:
        Tensor: ``(N, g, L, dv)``.
    """
    if torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k_s, v, row_table, col_table, col_s)):
        raise RuntimeError('folded_attention is an inference kernel; with '
                           'autograd use key_block_attention')
    chunk_bytes = FOLDED_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if height <= width:
        return _folded_rows(q, k_s, v, row_table, col_s, height, width,
                            block_w, chunk_bytes)

    def transpose(x, h=height, w=width):
        return x.unflatten(2, (h, w)).transpose(2, 3).flatten(2, 3)

    # fold the columns: the rows of the transposed map
    out = _folded_rows(*(transpose(t) for t in (q, k_s, v)), col_table,
                       transpose(row_s), width, height, block_w, chunk_bytes)
    return transpose(out, width, height)


def _folded_rows(q, k_s, v, row_table, col_s, height, width, block_w,
                 chunk_bytes):
    """:func:`folded_attention`, the row logits folded."""
    n, g, length, dq = q.shape
    dv = v.shape[-1]
    layout = _FoldedLayout(height, width, block_w, dq, dv, q.dtype)
    chunks = layout.row_chunks(chunk_bytes)
    keys = layout.key_buffer(chunks[0].stop, q)
    out = q.new_empty(n, g, height, width, dv)
    for b, h in itertools.product(range(n), range(g)):
        q_aug = layout.queries(q[b, h], col_s[b, h])
        k_blocks = layout.key_blocks(k_s[b, h])
        v_aug = layout.values(v[b, h])
        for rows in chunks:
            o, lse = key_blocks.cpu_flash(
                q_aug[rows], layout.fold_keys(keys, k_blocks, row_table[h],
                                              rows),
                v_aug.expand(rows.stop - rows.start, *v_aug.shape))
            weights = lse.softmax(dim=1).unsqueeze(-1)
            torch.sum(o[..., :dv] * weights, dim=1, out=out[b, h, rows])
    return out.view(n, g, length, dv)
