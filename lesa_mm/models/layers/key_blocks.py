"""CPU key blocks: runtime optimisations of LESA's fused ``detection_qr``
attention.

``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with the
keys split into blocks of the feature map whose outputs merge exactly by
their log-sum-exp (see ``docs/lesa.md``):

* :func:`key_block_attention`: ``h x w`` blocks. Within a block only ``h``
  rows and ``w`` columns occur, so its augmented head is ``dq + h + w`` wide
  instead of ``dq + H + W`` (the one-call path's). Exact gradient.
* :func:`folded_attention` (inference): the queries of one map row against
  keys that carry that row's row logits, in blocks of whole columns: heads
  ``dq + w`` wide, the value width for ``w = dv - dq``.

Both run on PyTorch's CPU flash-attention kernel, whose private ATen ops
return the log-sum-exp and take it back in the backward. Fallback: where
those ops are missing, on other devices, and while a graph is traced,
exported or compiled (the Python loops are not a graph), the planners
:func:`key_blocks` and :func:`folded_columns` return ``None`` and the
caller takes the one-call path, which computes the same attention.
"""
import itertools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .capture import is_graph_capture

#: Largest side of a key block of the CPU path.
KEY_BLOCK = 16
#: Bytes of augmented queries per attention call of that path.
KEY_BLOCK_CHUNK_BYTES = 4 << 20
#: Bytes of folded keys per attention call of :func:`folded_attention`.
FOLDED_CHUNK_BYTES = 16 << 20

_cpu_flash_op = getattr(torch.ops.aten,
                        '_scaled_dot_product_flash_attention_for_cpu', None)
_cpu_flash_backward_op = getattr(
    torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu_backward',
    None)


def _unit_stride(t):
    """``t`` with a contiguous last dimension (``t`` itself if it has one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _cpu_flash(q, k, v):
    """PyTorch's CPU flash-attention kernel at scale 1: ``(out, lse)``.

    The private op reads every tensor as if its last dimension were
    contiguous and, unlike the public ``scaled_dot_product_attention``,
    neither checks nor copies: a value tensor of stride ``(..., L, 1)``
    read as ``(..., 1, L)`` gives a silently wrong result. Every input is
    given a contiguous last dimension here (a copy only where it lacks one).
    """
    return _cpu_flash_op(_unit_stride(q), _unit_stride(k), _unit_stride(v),
                         scale=1.0)[:2]


def _cpu_flash_backward(grad_out, q, k, v, out, lse):
    """The backward of :func:`_cpu_flash` (``grad_q, grad_k, grad_v``),
    its inputs likewise given a contiguous last dimension."""
    return _cpu_flash_backward_op(
        *(_unit_stride(t) for t in (grad_out, q, k, v, out, lse)), 0.0,
        False, scale=1.0)


def _block_side(size, target):
    """The side of near-equal blocks of at most ``target`` tiling ``size``
    (the last block may overhang by less than one block)."""
    count = -(-size // target)
    return -(-size // count)


def key_blocks(q_s, height, width, target=None):
    """The ``(h, w)`` key blocks of :func:`key_block_attention`, or ``None``
    where the one-call path is used: on other devices than the CPU (the
    blocks need the CPU flash kernel's log-sum-exp), while tracing,
    exporting or compiling, and where blocks would not at least halve the
    augmented head width."""
    target = KEY_BLOCK if target is None else target
    if q_s.device.type != 'cpu' or _cpu_flash_op is None or \
            _cpu_flash_backward_op is None or is_graph_capture():
        return None
    h, w = _block_side(height, target), _block_side(width, target)
    dq = q_s.shape[-1]
    if 2 * (dq + h + w) > dq + height + width:
        return None
    return h, w


class _KeyBlockLayout:
    """Keys of an ``H x W`` map split into ``h x w`` blocks, and the
    augmented queries, keys and values of each block.

    A block holds only ``h`` rows and ``w`` columns, so the queries
    ``[q_s[i], row_s[i, block rows], col_s[i, block cols]]`` against the keys
    ``[k_j, onehot(r_j - r0), onehot(c_j - c0)]`` give every logit
    ``q_s[i].k_j + row_s[i, r_j] + col_s[i, c_j]`` of the block with heads
    ``dq + h + w`` wide, zero-padded to the value width where that is larger
    (fused kernels need equal query/key and value head sizes; zero channels
    add nothing to the logits). Keys that pad the map to whole blocks get a
    logit of ``finfo.min / 4``, a weight of exactly zero; every block holds
    at least one real key.
    """

    def __init__(self, height, width, blocks, dq, dv, dtype):
        self.height, self.width = height, width
        self.h, self.w = blocks
        self.rows, self.cols = -(-height // self.h), -(-width // self.w)
        self.count = self.rows * self.cols
        self.pad_h = self.rows * self.h - height
        self.pad_w = self.cols * self.w - width
        self.dq, self.dv = dq, dv
        self.width_aug = dq + self.h + self.w
        self.size = max(self.width_aug, dv)
        self.dtype = dtype

    def to_blocks(self, x):
        """``(heads, L, c)`` -> ``(heads, blocks, h w, c)``, zero-padded."""
        heads, _, c = x.shape
        x = F.pad(x.reshape(heads, self.height, self.width, c),
                  (0, 0, 0, self.pad_w, 0, self.pad_h))
        x = x.view(heads, self.rows, self.h, self.cols, self.w, c)
        return x.transpose(2, 3).reshape(heads, self.count, self.h * self.w,
                                         c)

    def from_blocks(self, x):
        """The inverse of :meth:`to_blocks`, dropping the padding."""
        heads, c = x.shape[0], x.shape[-1]
        x = x.view(heads, self.rows, self.cols, self.h, self.w, c)
        x = x.transpose(2, 3).reshape(heads, self.rows * self.h,
                                      self.cols * self.w, c)
        return x[:, :self.height, :self.width].reshape(heads, -1, c)

    def pad_axes(self, row_s, col_s):
        """Row and column logits of padding keys: ``finfo.min / 4``."""
        never = torch.finfo(self.dtype).min / 4
        return (F.pad(row_s, (0, self.pad_h), value=never),
                F.pad(col_s, (0, self.pad_w), value=never))

    def keys(self, k):
        """``(heads, L, dq)`` -> augmented keys ``(heads, blocks, 1, hw,
        size)``."""
        h, w, dq = self.h, self.w, self.dq
        shape = (k.shape[0], self.count, h, w)
        eye_h = torch.eye(h, dtype=k.dtype, device=k.device)
        eye_w = torch.eye(w, dtype=k.dtype, device=k.device)
        k_aug = torch.cat([  # each channel written once
            self.to_blocks(k).view(*shape, dq),
            eye_h[:, None].expand(*shape, h), eye_w.expand(*shape, w),
            k.new_zeros(()).expand(*shape, self.size - self.width_aug)
        ], dim=-1)
        return k_aug.view(k.shape[0], self.count, 1, h * w, self.size)

    def values(self, v):
        """``(heads, L, dv)`` -> ``(heads, blocks, 1, hw, size)``."""
        return F.pad(self.to_blocks(v), (0, self.size - self.dv)).unsqueeze(2)

    def queries(self, q_s, row_s, col_s):
        """Augmented queries ``(..., blocks, n, size)`` of ``n`` queries
        ``q_s (..., n, dq)``, ``row_s (..., n, rows h)``, ``col_s (..., n,
        cols w)``."""
        h, w, dq = self.h, self.w, self.dq
        *lead, n, _ = q_s.shape
        q_aug = q_s.new_empty(*lead, self.rows, self.cols, n, self.size)
        q_aug[..., self.width_aug:] = 0
        q_aug[..., :dq] = q_s[..., None, None, :, :]
        q_aug[..., dq:dq + h] = row_s.unflatten(-1, (self.rows, h)).movedim(
            -2, -3).unsqueeze(-3)
        q_aug[..., dq + h:self.width_aug] = col_s.unflatten(
            -1, (self.cols, w)).movedim(-2, -3).unsqueeze(-4)
        return q_aug.flatten(-4, -3)

    def query_chunks(self, length, chunk_bytes):
        """Slices of about ``chunk_bytes`` of augmented queries."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        chunk = max(1, chunk_bytes // (self.count * self.size * elem))
        return [slice(s, min(s + chunk, length))
                for s in range(0, length, chunk)]


class _KeyBlockAttention(torch.autograd.Function):
    """:func:`key_block_attention` with its exact gradient.

    Forward: every block is attended by all queries in one batched call of
    PyTorch's CPU flash kernel, which also returns each block's
    log-sum-exp ``lse_b``; the blocks' outputs merge exactly as
    ``O = sum_b softmax_b(lse_b) o_b``.

    Backward: the kernel's backward, given block ``b``'s log-sum-exp, the
    output gradient ``softmax_b(lse_b) dO`` and the merged output ``O``,
    returns exactly block ``b``'s share of the gradients of the whole
    softmax: the logit gradient it forms, ``P_b (w_b dO.v - w_b dO.O)``
    with ``w_b P_b = P`` the whole softmax restricted to the block, is
    the whole attention's ``P (dO.v - dO.O)``. The augmented queries are
    rebuilt in the backward, not stored.
    """

    @staticmethod
    def forward(ctx, q_s, k, v, row_s, col_s, height, width, block_h,
                block_w, chunk_bytes):
        heads, length, dq = q_s.shape
        layout = _KeyBlockLayout(height, width, (block_h, block_w), dq,
                                 v.shape[-1], q_s.dtype)
        row_p, col_p = layout.pad_axes(row_s, col_s)
        k_aug, v_aug = layout.keys(k), layout.values(v)
        out = q_s.new_empty(heads, length, layout.dv)
        # the kernel's log-sum-exp is float32 for half-precision inputs
        lse = q_s.new_empty(heads, layout.count, length,
                            dtype=torch.promote_types(q_s.dtype,
                                                      torch.float32))
        chunks = layout.query_chunks(length, chunk_bytes)
        for head in range(heads):
            for part in chunks:
                o, lse_part = _cpu_flash(
                    layout.queries(q_s[head, part], row_p[head, part],
                                   col_p[head, part]).unsqueeze(1),
                    k_aug[head], v_aug[head])
                lse_part = lse_part.view(layout.count, -1)
                lse[head, :, part] = lse_part
                o = o.view(layout.count, -1, layout.size)[..., :layout.dv]
                weights = lse_part.softmax(dim=0).unsqueeze(-1)
                merged = o[0] * weights[0]
                for block in range(1, layout.count):
                    merged.addcmul_(o[block], weights[block])
                out[head, part] = merged
        ctx.layout, ctx.chunk_bytes = layout, chunk_bytes
        ctx.save_for_backward(q_s, k, v, row_s, col_s, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_s, k, v, row_s, col_s, out, lse = ctx.saved_tensors
        layout = ctx.layout
        heads, length, dq = q_s.shape
        count, size, dv = layout.count, layout.size, layout.dv
        h, w, rows, cols = layout.h, layout.w, layout.rows, layout.cols
        row_p, col_p = layout.pad_axes(row_s, col_s)
        k_aug, v_aug = layout.keys(k), layout.values(v)
        acc = torch.promote_types(q_s.dtype, torch.float32)
        grad_q = torch.empty_like(q_s)
        grad_row = torch.empty_like(row_p)
        grad_col = torch.empty_like(col_p)
        grad_k = k.new_empty(heads, count, h * w, dq, dtype=acc)
        grad_v = v.new_empty(heads, count, h * w, dv, dtype=acc)
        grad_out = grad_out.to(q_s.dtype)
        chunks = layout.query_chunks(length, ctx.chunk_bytes)
        for head in range(heads):
            for part in chunks:
                q_aug = layout.queries(q_s[head, part], row_p[head, part],
                                       col_p[head, part]).unsqueeze(1)
                n = q_aug.shape[2]
                lse_part = lse[head, :, part].contiguous()
                weights = lse_part.softmax(dim=0).unsqueeze(-1)
                grad_block = (weights * F.pad(grad_out[head, part],
                                              (0, size - dv))).to(q_s.dtype)
                merged = F.pad(out[head, part], (0, size - dv))
                gq, gk, gv = _cpu_flash_backward(
                    grad_block.view(count, 1, n, size), q_aug, k_aug[head],
                    v_aug[head], merged.expand(count, 1, n, size),
                    lse_part.view(count, 1, n))
                gq = gq.view(rows, cols, n, size)
                grad_q[head, part] = gq[..., :dq].sum((0, 1))
                grad_row[head, part] = gq[..., dq:dq + h].sum(1).permute(
                    1, 0, 2).reshape(n, rows * h)
                grad_col[head, part] = gq[..., dq + h:dq + h + w].sum(
                    0).permute(1, 0, 2).reshape(n, cols * w)
                gk = gk.view(count, h * w, size)[..., :dq]
                gv = gv.view(count, h * w, size)[..., :dv]
                if part is chunks[0]:  # the first chunk sets, no zero fill
                    grad_k[head], grad_v[head] = gk, gv
                else:
                    grad_k[head] += gk
                    grad_v[head] += gv
        return (grad_q, layout.from_blocks(grad_k).to(k.dtype),
                layout.from_blocks(grad_v).to(v.dtype),
                grad_row[..., :layout.height], grad_col[..., :layout.width],
                None, None, None, None, None)


def key_block_attention(q_s, k, v, row_s, col_s, height, width, blocks,
                         chunk_bytes=None):
    """``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with
    the keys split into ``h x w`` blocks of the feature map.

    Within a block only ``h`` rows and ``w`` columns occur, so its augmented
    head is ``dq + h + w`` wide instead of ``dq + H + W`` (the one-call
    path's): at a 64x64 map and 16x16 blocks, 48 instead of 144 channels.
    See :class:`_KeyBlockLayout` for the blocks and
    :class:`_KeyBlockAttention` for the exact merge and gradient. Queries are
    processed in chunks of about ``chunk_bytes`` of augmented queries.

    Arguments ``q_s`` to ``width`` and the return value are those of
    :func:`lesa_mm.models.layers.attention.one_call_attention`, and:

    Args:
        blocks (tuple[int, int]): Block height ``h`` and width ``w``.
        chunk_bytes (int, optional): Defaults to ``KEY_BLOCK_CHUNK_BYTES``.
    """
    n, g, length, _ = q_s.shape
    dv = v.shape[-1]
    chunk_bytes = KEY_BLOCK_CHUNK_BYTES if chunk_bytes is None else \
        chunk_bytes
    out = _KeyBlockAttention.apply(
        *(t.reshape(n * g, length, t.shape[-1])
          for t in (q_s, k, v, row_s, col_s)),
        height, width, *blocks, chunk_bytes)
    return out.view(n, g, length, dv)


# ------------------------------------------------------------ folded rows
def folded_columns(q, dv, height, width):
    """Column-block width of :func:`folded_attention` for queries ``q (...,
    dq)``, or ``None`` where the key blocks (:func:`key_blocks`) or the
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
    blocks = key_blocks(q, height, width)
    if torch.is_grad_enabled() or blocks is None or dv - dq < 8 or \
            dq + sum(blocks) <= dv:
        return None
    return _block_side(max(height, width), dv - dq)


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
        return _unit_stride(v.flatten(1, 2))

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
            o, lse = _cpu_flash(
                q_aug[rows], layout.fold_keys(keys, k_blocks, row_table[h],
                                              rows),
                v_aug.expand(rows.stop - rows.start, *v_aug.shape))
            weights = lse.softmax(dim=1).unsqueeze(-1)
            torch.sum(o[..., :dv] * weights, dim=1, out=out[b, h, rows])
    return out.view(n, g, length, dv)
