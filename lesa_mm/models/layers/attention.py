"""Kernels of LESA's binary (context) term.

Every kernel takes the per-head queries, keys and values that the binary
term projected, the position-encoding module and the BatchNorm over logits
(``BNsim``), and returns the per-head attention outputs *before* the output
BatchNorm:

* ``detection_qr``: ``o_v`` of shape ``(N, g, dv, L)``.
* ``classification``: ``(o_v, o_e)``, both ``(N, g, dv, L)``.

* :func:`reference_attention` is the spec's direct formulation: it
  materialises the ``(N, terms * g, L, L)`` logits and normalises them with
  ``BNsim`` exactly as ``LESA_SPEC.md`` section 2 writes it.
* :func:`fused_attention` computes the same outputs, gradients and running
  statistics without any ``L x L`` tensor for ``detection_qr`` (see its
  docstring); ``classification`` (fixed 14x14 maps) keeps explicit logits but
  normalises them without a concatenated copy.

The fused ``detection_qr`` attention runs on PyTorch's fused attention
kernels in one of two ways, with the same result:

* one ``scaled_dot_product_attention`` call on queries and keys augmented
  with the position logits and one-hot row/column indicators (heads
  ``dq + H + W`` wide); on GPUs, and on the CPU for small maps;
* on the CPU where it at least halves that width, key blocks
  (:func:`_key_block_attention`): ``h x w`` blocks of keys need heads only
  ``dq + h + w`` wide, and their outputs merge exactly by their
  log-sum-exp.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .position import DecomposedRelPos2d, FlattenedRelPos1d

ATTENTION_IMPLS = ('fused', 'reference')


def _normalise_and_sum(logit_norm, terms):
    """``BNsim`` over the channel-concatenation of the logit terms, summed."""
    n, g, length, _ = terms[0].shape
    stacked = torch.cat(terms, dim=1)  # (N, terms * g, L, L)
    normed = logit_norm(stacked)
    return normed.view(n, len(terms), g, length, length).sum(dim=1)


def reference_attention(q, k, v, position, logit_norm, height, width):
    """The binary term's attention, computed as the spec writes it.

    Args:
        q (Tensor): Queries ``(N, g, dq, L)``.
        k (Tensor): Keys ``(N, g, dq, L)``.
        v (Tensor): Values ``(N, g, dv, L)``.
        position (DecomposedRelPos2d | FlattenedRelPos1d): Position tables.
        logit_norm (nn.Module): ``BNsim``, a BatchNorm over ``terms * g``
            channels.
        height (int): Feature-map height ``H`` (``L = H * W``).
        width (int): Feature-map width ``W``.

    Returns:
        Tensor | tuple[Tensor, Tensor]: ``o_v``, or ``(o_v, o_e)`` for
        classification encodings.
    """
    content = torch.einsum('ngci,ngcj->ngij', q, k)  # S_qk
    if isinstance(position, DecomposedRelPos2d):
        s_r = position.dense_logits(q, height, width)
        logits = _normalise_and_sum(logit_norm, [content, s_r])
        attn = logits.softmax(dim=-1)
        return torch.einsum('ngij,ngcj->ngci', attn, v)
    if isinstance(position, FlattenedRelPos1d):
        eq, ek, ev = position.tables(height, width)  # (c, L, L), [i-j]
        s_qr = torch.einsum('ngci,cij->ngij', q, eq)
        s_kr = torch.einsum('ngcj,cji->ngij', k, ek)
        logits = _normalise_and_sum(logit_norm, [content, s_qr, s_kr])
        attn = logits.softmax(dim=-1)
        o_v = torch.einsum('ngij,ngcj->ngci', attn, v)
        o_e = torch.einsum('ngij,cij->ngci', attn, ev)
        return o_v, o_e
    raise TypeError(f'unsupported position encoding {type(position)!r}')


# --------------------------------------------------------------------------
# fused path
# --------------------------------------------------------------------------
def _uses_batch_stats(norm):
    """Whether a BatchNorm normalises with batch statistics (as in
    ``_BatchNorm.forward``)."""
    return norm.training or (norm.running_mean is None
                             and norm.running_var is None)


def _all_reduce_for_syncbn(norm, stats):
    """Sum per-channel statistics over the process group of a SyncBatchNorm
    (differentiably, as SyncBatchNorm does); other norms keep them local."""
    if (isinstance(norm, torch.nn.SyncBatchNorm) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size() > 1):
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(stats)
    return stats


def _count_batch(norm):
    """Count one more training batch in ``norm`` and return the momentum of
    its running-statistic update, as ``_BatchNorm.forward`` does (``None``
    momentum: cumulative average)."""
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


def _update_running_stats(norm, mean, var, count):
    """Update ``norm``'s running statistics as ``BatchNorm2d`` would from a
    batch of ``count`` (a tensor) elements per channel with biased variance
    ``var``."""
    if not (norm.training and norm.track_running_stats):
        return
    with torch.no_grad():
        momentum = _count_batch(norm)
        unbiased = var * (count / (count - 1).clamp_min(1))
        norm.running_mean.mul_(1 - momentum).add_(
            mean.to(norm.running_mean.dtype), alpha=momentum)
        norm.running_var.mul_(1 - momentum).add_(
            unbiased.to(norm.running_var.dtype), alpha=momentum)


def _logit_scales(norm, moments):
    """Per-channel factors ``weight / sqrt(var + eps)`` of a BatchNorm over
    logits. Its shift is constant over the keys, so softmax ignores it.

    Args:
        norm (_BatchNorm): ``BNsim``.
        moments (callable): Returns per-channel ``(sum, sum of squares)`` of
            the logits over one batch and the element count per channel;
            called only when batch statistics are used.
    """
    if _uses_batch_stats(norm):
        sums, sq_sums, count = moments()
        # statistics in float32 (at least), whatever the autocast dtype
        stats = torch.stack([sums, sq_sums, torch.full_like(sums, count)])
        sums, sq_sums, counts = _all_reduce_for_syncbn(norm, stats)
        count = counts[0]
        mean = sums / count
        var = (sq_sums / count - mean.square()).clamp_min(0)
        _update_running_stats(norm, mean.detach(), var.detach(),
                              count.detach())
    else:
        var = norm.running_var
    var = var.to(torch.promote_types(var.dtype, torch.float32))
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(scale.dtype)
    if norm.bias is not None:
        # softmax ignores the shift, so the bias's gradient is exactly zero;
        # keep it in the graph so that DDP sees every parameter used
        scale = scale + 0 * norm.bias.to(scale.dtype)
    return scale


def _detection_moments(q, k, row, col):
    """Per-head sums and sums of squares of ``S_qk`` and ``S_r`` over
    ``(N, L, L)``, in closed form, without ``L x L`` tensors.

    ``sum_ij q_i.k_j = (sum_i q_i).(sum_j k_j)``,
    ``sum_ij (q_i.k_j)^2 = trace(Q^T Q K^T K)``; with
    ``S_r[i, j] = R[i, r_j] + C[i, c_j]``:
    ``sum_j S_r = W sum_r R + H sum_c C`` and
    ``sum_j S_r^2 = W sum_r R^2 + H sum_c C^2 + 2 (sum_r R)(sum_c C)``.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    # autocast would run the Gram products in half precision
    with torch.autocast(q.device.type, enabled=False):
        return _detection_moments_exact(
            *(t.to(dtype) for t in (q, k, row, col)))


def _detection_moments_exact(q, k, row, col):
    n, g, _, length = q.shape
    height, width = row.shape[-1], col.shape[-1]
    qk_sum = (q.sum(-1) * k.sum(-1)).sum(-1).sum(0)
    gram_q = q @ q.transpose(-1, -2)
    gram_k = k @ k.transpose(-1, -2)
    qk_sq = (gram_q * gram_k).sum((-1, -2)).sum(0)
    row_sum, col_sum = row.sum(-1), col.sum(-1)
    pos_sum = (width * row_sum + height * col_sum).sum(-1).sum(0)
    pos_sq = (width * row.square().sum(-1) + height * col.square().sum(-1) +
              2 * row_sum * col_sum).sum(-1).sum(0)
    count = n * length * length
    return torch.cat([qk_sum, pos_sum]), torch.cat([qk_sq, pos_sq]), count


def _fused_detection(q, k, v, position, logit_norm, height, width):
    n, g, dq, length = q.shape
    dv = v.shape[2]
    row, col = position.axis_logits(q, height, width)  # (N,g,L,H), (N,g,L,W)
    scale = _logit_scales(logit_norm,
                          lambda: _detection_moments(q, k, row, col))
    dtype = q.dtype if not torch.is_autocast_enabled(q.device.type) else \
        torch.get_autocast_dtype(q.device.type)
    a = scale[:g].view(1, g, 1, 1).to(dtype)
    b = scale[g:].view(1, g, 1, 1).to(dtype)
    # softmax_j(a q_i.k_j + b (R[i, r_j] + C[i, c_j]))
    q_s = q.transpose(-1, -2).to(dtype) * a
    row_s, col_s = row.to(dtype) * b, col.to(dtype) * b
    k_t, v_t = k.transpose(-1, -2).to(dtype), v.transpose(-1, -2).to(dtype)
    blocks = _key_blocks(q_s, height, width)
    if blocks is not None:
        out = _key_block_attention(q_s, k_t, v_t, row_s, col_s, height,
                                   width, blocks)
        return out.transpose(-1, -2)
    # one attention call: the whole map is one block, queries
    # [a q_i, b R[i], b C[i]] against keys [k_j, onehot(r_j), onehot(c_j)]
    layout = _KeyBlockLayout(height, width, (height, width), dq, dv, dtype)
    q_aug = layout.queries(q_s, row_s, col_s).squeeze(2)
    k_aug = layout.keys(_flat_heads(k_t)).view(n, g, length, layout.size)
    v_aug = layout.values(_flat_heads(v_t)).view(n, g, length, layout.size)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)
    return out[..., :dv].transpose(-1, -2)


# --------------------------------------------------------------------------
# key-block path (CPU)
# --------------------------------------------------------------------------
#: Largest side of a key block of the CPU path.
KEY_BLOCK = 16
#: Bytes of augmented queries per attention call of that path.
KEY_BLOCK_CHUNK_BYTES = 4 << 20

_cpu_flash = getattr(torch.ops.aten,
                     '_scaled_dot_product_flash_attention_for_cpu', None)
_cpu_flash_backward = getattr(
    torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu_backward',
    None)


def _flat_heads(x):
    """``(N, g, L, c)`` -> ``(N g, L, c)``."""
    n, g, length, c = x.shape
    return x.reshape(n * g, length, c)


def _block_side(size, target):
    """The side of near-equal blocks of at most ``target`` tiling ``size``
    (the last block may overhang by less than one block)."""
    count = -(-size // target)
    return -(-size // count)


def _key_blocks(q_s, height, width, target=None):
    """The ``(h, w)`` key blocks of :func:`_key_block_attention`, or ``None``
    where the one-call path is used: on other devices than the CPU (the
    blocks need the CPU flash kernel's log-sum-exp) and where blocks would
    not at least halve the augmented head width."""
    target = KEY_BLOCK if target is None else target
    if q_s.device.type != 'cpu' or _cpu_flash is None or \
            _cpu_flash_backward is None:
        return None
    h, w = _block_side(height, target), _block_side(width, target)
    dq = q_s.shape[-1]
    if 2 * (dq + h + w) > dq + height + width:
        return None
    return h, w


class _KeyBlockLayout:
    """Keys of an ``H x W`` map split into ``h x w`` blocks, and the
    augmented queries, keys and values of each block (the one-call path is
    the single ``H x W`` block).

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
        k_aug = k.new_zeros(k.shape[0], self.count, h, w, self.size)
        k_aug[..., :dq] = self.to_blocks(k).view(*k_aug.shape[:-1], dq)
        k_aug[..., dq:dq + h] = torch.eye(h, dtype=k.dtype)[:, None]
        k_aug[..., dq + h:self.width_aug] = torch.eye(w, dtype=k.dtype)
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
    """:func:`_key_block_attention` with its exact gradient.

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
                    k_aug[head], v_aug[head], scale=1.0)[:2]
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
        grad_k = k.new_zeros(heads, count, h * w, dq, dtype=acc)
        grad_v = v.new_zeros(heads, count, h * w, dv, dtype=acc)
        grad_out = grad_out.to(q_s.dtype)
        for head in range(heads):
            for part in layout.query_chunks(length, ctx.chunk_bytes):
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
                    lse_part.view(count, 1, n), 0.0, False, scale=1.0)
                gq = gq.view(rows, cols, n, size)
                grad_q[head, part] = gq[..., :dq].sum((0, 1))
                grad_row[head, part] = gq[..., dq:dq + h].sum(1).permute(
                    1, 0, 2).reshape(n, rows * h)
                grad_col[head, part] = gq[..., dq + h:dq + h + w].sum(
                    0).permute(1, 0, 2).reshape(n, cols * w)
                grad_k[head] += gk.view(count, h * w, size)[..., :dq]
                grad_v[head] += gv.view(count, h * w, size)[..., :dv]
        return (grad_q, layout.from_blocks(grad_k).to(k.dtype),
                layout.from_blocks(grad_v).to(v.dtype),
                grad_row[..., :layout.height], grad_col[..., :layout.width],
                None, None, None, None, None)


def _key_block_attention(q_s, k, v, row_s, col_s, height, width, blocks,
                         chunk_bytes=None):
    """``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with
    the keys split into ``h x w`` blocks of the feature map.

    Within a block only ``h`` rows and ``w`` columns occur, so its augmented
    head is ``dq + h + w`` wide instead of ``dq + H + W`` (the one-call
    path's): at a 64x64 map and 16x16 blocks, 48 instead of 144 channels.
    See :class:`_KeyBlockLayout` for the blocks and
    :class:`_KeyBlockAttention` for the exact merge and gradient. Queries are
    processed in chunks of about ``chunk_bytes`` of augmented queries.

    Args:
        q_s (Tensor): Scaled queries ``(N, g, L, dq)``.
        k (Tensor): Keys ``(N, g, L, dq)``.
        v (Tensor): Values ``(N, g, L, dv)``.
        row_s (Tensor): Scaled row logits ``(N, g, L, H)``.
        col_s (Tensor): Scaled column logits ``(N, g, L, W)``.
        height (int): ``H``.
        width (int): ``W``.
        blocks (tuple[int, int]): Block height ``h`` and width ``w``.
        chunk_bytes (int, optional): Defaults to ``KEY_BLOCK_CHUNK_BYTES``.

    Returns:
        Tensor: ``(N, g, L, dv)``.
    """
    n, g, length, _ = q_s.shape
    dv = v.shape[-1]
    chunk_bytes = KEY_BLOCK_CHUNK_BYTES if chunk_bytes is None else \
        chunk_bytes
    out = _KeyBlockAttention.apply(*map(_flat_heads,
                                        (q_s, k, v, row_s, col_s)),
                                   # plain ints: a jit trace records sizes
                                   *(int(i) for i in (height, width,
                                                      *blocks)),
                                   chunk_bytes)
    return out.view(n, g, length, dv)


def _normalise_terms_in_place(logit_norm, terms):
    """``BNsim`` applied term by term to slices of its parameters and
    running statistics: what :func:`_normalise_and_sum` computes, without
    the concatenated ``(N, terms * g, L, L)`` copy."""
    g = terms[0].shape[1]
    use_batch = _uses_batch_stats(logit_norm)
    update = logit_norm.training and logit_norm.track_running_stats
    momentum = _count_batch(logit_norm) if update else 0.0
    out = 0
    for t, term in enumerate(terms):
        part = slice(t * g, (t + 1) * g)

        def sliced(x):
            return None if x is None else x[part]

        keep_stats = update or not use_batch
        out = out + F.batch_norm(
            term,
            sliced(logit_norm.running_mean) if keep_stats else None,
            sliced(logit_norm.running_var) if keep_stats else None,
            sliced(logit_norm.weight), sliced(logit_norm.bias),
            training=use_batch, momentum=momentum,
            eps=logit_norm.eps)
    return out


def _fused_classification(q, k, v, position, logit_norm, height, width):
    eq, ek, ev = position.tables(height, width)
    content = torch.einsum('ngci,ngcj->ngij', q, k)
    s_qr = torch.einsum('ngci,cij->ngij', q, eq)
    s_kr = torch.einsum('ngcj,cji->ngij', k, ek)
    if isinstance(logit_norm, torch.nn.SyncBatchNorm) and \
            _uses_batch_stats(logit_norm):
        logits = _normalise_and_sum(logit_norm, [content, s_qr, s_kr])
    else:
        logits = _normalise_terms_in_place(logit_norm, [content, s_qr, s_kr])
    attn = logits.softmax(dim=-1)
    o_v = torch.einsum('ngij,ngcj->ngci', attn, v)
    o_e = torch.einsum('ngij,cij->ngci', attn, ev)
    return o_v, o_e


def fused_attention(q, k, v, position, logit_norm, height, width):
    """The binary term's attention, exact and memory-efficient.

    ``detection_qr``: the BatchNorm over logits only scales and shifts each
    head's content and position logits and softmax ignores the shift, so the
    attention is ``softmax(a q.k + b S_r)`` with per-head scalars ``a, b``:
    from running statistics in eval mode, from closed-form batch statistics
    (:func:`_detection_moments`) in training mode, where the running
    statistics are updated as ``BatchNorm2d`` would. The attention itself
    runs on fused attention kernels over augmented queries and keys: one
    :func:`torch.nn.functional.scaled_dot_product_attention` call, or on the
    CPU for larger maps :func:`_key_block_attention`. No ``L x L`` tensor is
    materialised.

    Arguments and returns as :func:`reference_attention`.
    """
    if not isinstance(logit_norm, _BatchNorm):
        raise ValueError(f'the fused LESA attention needs a BatchNorm over '
                         f'logits, got {type(logit_norm).__name__}; use '
                         f"attn_impl='reference' for other norms")
    if isinstance(position, DecomposedRelPos2d):
        return _fused_detection(q, k, v, position, logit_norm, height, width)
    if isinstance(position, FlattenedRelPos1d):
        return _fused_classification(q, k, v, position, logit_norm, height,
                                     width)
    raise TypeError(f'unsupported position encoding {type(position)!r}')


ATTENTION_KERNELS = dict(fused=fused_attention, reference=reference_attention)
