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
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
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


def _axis_indicators(height, width, device, dtype):
    """One-hot row and column indicators of every key ``(L, H + W)``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.cat([F.one_hot(rows, height), F.one_hot(cols, width)],
                     dim=-1).to(dtype)


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
    blocks = _key_blocks(q_s, (q_s, k_t, v_t, row_s, col_s), height, width)
    if blocks is not None:
        out = _key_block_attention(q_s, k_t, v_t, row_s, col_s, height,
                                   width, blocks)
        return out.transpose(-1, -2)
    # one attention call: queries [a q_i, b R[i], b C[i]] against keys
    # [k_j, onehot(r_j), onehot(c_j)]
    q_aug = torch.cat([q_s, row_s, col_s], dim=-1)
    indicators = _axis_indicators(height, width, q.device, dtype)
    k_aug = torch.cat(
        [k_t, indicators.expand(n, g, length, height + width)], dim=-1)
    # some fused kernels need equal query/key and value head sizes: pad the
    # smaller with zeros (zero columns add nothing to the logits)
    size = max(q_aug.shape[-1], dv)
    q_aug = F.pad(q_aug, (0, size - q_aug.shape[-1]))
    k_aug = F.pad(k_aug, (0, size - k_aug.shape[-1]))
    v_pad = F.pad(v_t, (0, size - dv))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)
    return out[..., :dv].transpose(-1, -2)


# --------------------------------------------------------------------------
# key-block path (CPU inference)
# --------------------------------------------------------------------------
#: Largest side of a key block of the CPU inference path.
KEY_BLOCK = 16
#: Bytes of augmented queries per attention call of that path.
KEY_BLOCK_CHUNK_BYTES = 4 << 20


def _block_side(size, target):
    """The side of near-equal blocks of at most ``target`` tiling ``size``
    (the last block may overhang by less than one block)."""
    count = -(-size // target)
    return -(-size // count)


def _key_blocks(q_s, tensors, height, width, target=None):
    """The ``(h, w)`` key blocks of :func:`_key_block_attention`, or ``None``
    where the one-call path is used: on other devices than the CPU, when a
    gradient is needed (the CPU kernel's log-sum-exp output has none), and
    where blocks would not at least halve the augmented head width."""
    target = KEY_BLOCK if target is None else target
    if q_s.device.type != 'cpu' or not hasattr(
            torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    h, w = _block_side(height, target), _block_side(width, target)
    dq = q_s.shape[-1]
    if 2 * (dq + h + w) > dq + height + width:
        return None
    return h, w


def _key_block_attention(q_s, k, v, row_s, col_s, height, width, blocks,
                         chunk_bytes=None):
    """``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with
    the keys split into ``h x w`` blocks of the feature map.

    Within a block only ``h`` rows and ``w`` columns occur, so its augmented
    head is ``dq + h + w`` wide instead of ``dq + H + W`` (the one-call
    path's): at a 64x64 map and 16x16 blocks, 48 instead of 144 channels.
    Every block is attended by all queries in one batched call of PyTorch's
    CPU flash kernel, which also returns each block's log-sum-exp ``lse_b``;
    the blocks' outputs ``o_b`` merge exactly as
    ``sum_b softmax_b(lse_b) o_b``. Keys that pad the map to whole blocks
    get a logit of ``finfo.min / 4``, a weight of exactly zero. Queries are
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
    n, g, length, dq = q_s.shape
    dv = v.shape[-1]
    h, w = blocks
    rows, cols = -(-height // h), -(-width // w)
    n_blocks = rows * cols
    pad_h, pad_w = rows * h - height, cols * w - width
    dtype = q_s.dtype
    width_aug = dq + h + w
    size = max(width_aug, dv)
    if pad_h or pad_w:
        never = torch.finfo(dtype).min / 4
        row_s = F.pad(row_s, (0, pad_h), value=never)
        col_s = F.pad(col_s, (0, pad_w), value=never)
    heads = n * g

    def to_blocks(x):
        """``(N, g, L, c)`` -> ``(N g, blocks, h w, c)``, zero-padded."""
        c = x.shape[-1]
        x = F.pad(x.reshape(heads, height, width, c),
                  (0, 0, 0, pad_w, 0, pad_h))
        x = x.view(heads, rows, h, cols, w, c).transpose(2, 3)
        return x.reshape(heads, n_blocks, h * w, c)

    # keys [k_j, onehot(r_j - r0), onehot(c_j - c0), 0], values [v_j, 0]
    k_aug = k.new_zeros(heads, n_blocks, h, w, size)
    k_aug[..., :dq] = to_blocks(k).view(heads, n_blocks, h, w, dq)
    k_aug[..., dq:dq + h] = torch.eye(h, dtype=dtype)[:, None]
    k_aug[..., dq + h:width_aug] = torch.eye(w, dtype=dtype)
    k_aug = k_aug.view(heads, n_blocks, 1, h * w, size)
    v_aug = F.pad(to_blocks(v), (0, size - dv)).unsqueeze(2)

    q_s = q_s.reshape(heads, length, dq)
    row_s = row_s.reshape(heads, length, rows, h)
    col_s = col_s.reshape(heads, length, cols, w)
    out = q_s.new_empty(heads, length, dv)
    chunk_bytes = KEY_BLOCK_CHUNK_BYTES if chunk_bytes is None else \
        chunk_bytes
    chunk = max(1, chunk_bytes // (n_blocks * size * q_s.element_size()))
    for head in range(heads):
        for start in range(0, length, chunk):
            part = slice(start, start + chunk)
            count = min(chunk, length - start)
            # queries [q_s[i], row_s[i, block rows], col_s[i, block cols], 0]
            q_aug = q_s.new_empty(rows, cols, count, size)
            q_aug[..., width_aug:] = 0
            q_aug[..., :dq] = q_s[head, part]
            q_aug[..., dq:dq + h] = row_s[head, part].transpose(0, 1)[:, None]
            q_aug[..., dq + h:width_aug] = \
                col_s[head, part].transpose(0, 1)[None]
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_aug.view(n_blocks, 1, count, size), k_aug[head],
                v_aug[head], scale=1.0)[:2]
            o = o.view(n_blocks, count, size)[..., :dv]
            weights = lse.view(n_blocks, count, 1).softmax(dim=0)
            merged = o[0] * weights[0]
            for block in range(1, n_blocks):
                merged.addcmul_(o[block], weights[block])
            out[head, part] = merged
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
    statistics are updated as ``BatchNorm2d`` would. The attention itself is
    one :func:`torch.nn.functional.scaled_dot_product_attention` call on
    augmented queries and keys, so no ``L x L`` tensor is materialised.

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
