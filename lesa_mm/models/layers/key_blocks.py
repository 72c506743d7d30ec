"""CPU key blocks: the eager-mode training kernel of LESA's fused
``detection_qr`` attention (``docs/lesa.md`` section 7.4), and the CPU
flash-attention wrappers it shares with :mod:`.folded_rows`.

``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with the
keys split into ``h x w`` blocks of the feature map, whose outputs merge
exactly by their log-sum-exp: within a block only ``h`` rows and ``w``
columns occur, so its augmented head is ``dq + h + w`` wide instead of
``dq + H + W`` (the one-call path's). Exact gradient.

It runs on PyTorch's CPU flash-attention kernel, whose private ATen ops
return the log-sum-exp and take it back in the backward. Where those ops
are missing, on other devices, and while a graph is traced, exported or
compiled (the Python loops are not a graph), the planner :func:`key_blocks`
returns ``None`` and :func:`.decomposed_kernels.decomposed_attention` takes
the one-call path, which computes the same attention.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .capture import is_graph_capture

#: Largest side of a key block of the CPU path.
KEY_BLOCK = 16
#: Bytes of augmented queries per attention call of that path.
KEY_BLOCK_CHUNK_BYTES = 4 << 20

_cpu_flash_op = getattr(torch.ops.aten,
                        '_scaled_dot_product_flash_attention_for_cpu', None)
_cpu_flash_backward_op = getattr(
    torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu_backward',
    None)


def unit_stride(t):
    """``t`` with a contiguous last dimension (``t`` itself if it has one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cpu_flash(q, k, v):
    """PyTorch's CPU flash-attention kernel at scale 1: ``(out, lse)``.

    The private op reads every tensor as if its last dimension were
    contiguous and, unlike the public ``scaled_dot_product_attention``,
    neither checks nor copies: a value tensor of stride ``(..., L, 1)``
    read as ``(..., 1, L)`` gives a silently wrong result. Every input is
    given a contiguous last dimension here (a copy only where it lacks one).
    """
    return _cpu_flash_op(unit_stride(q), unit_stride(k), unit_stride(v),
                         scale=1.0)[:2]


def cpu_flash_backward(grad_out, q, k, v, out, lse):
    """The backward of :func:`cpu_flash` (``grad_q, grad_k, grad_v``),
    its inputs likewise given a contiguous last dimension."""
    return _cpu_flash_backward_op(
        *(unit_stride(t) for t in (grad_out, q, k, v, out, lse)), 0.0,
        False, scale=1.0)


def block_side(size, target):
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
    h, w = block_side(height, target), block_side(width, target)
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
                o, lse_part = cpu_flash(
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
                gq, gk, gv = cpu_flash_backward(
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
    :func:`lesa_mm.models.layers.decomposed_kernels.one_call_attention`, and:

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
