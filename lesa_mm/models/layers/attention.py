"""Kernels of LESA's binary (context) term.

Every kernel takes the per-head queries, keys and values that the binary
term projected, the position-encoding module and the BatchNorm over logits
(``BNsim``), and returns the per-head attention outputs *before* the output
BatchNorm:

* ``detection_qr``: ``o_v`` of shape ``(N, g, dv, L)``.
* ``classification``: ``(o_v, o_e)``, both ``(N, g, dv, L)``.

* :func:`reference_attention` is the spec's direct formulation: it
  materialises the ``(N, terms * g, L, L)`` logits and normalises them with
  ``BNsim`` exactly as ``docs/lesa.md`` section 3 writes it.
* :func:`fused_attention` computes the same outputs, gradients and running
  statistics without any ``L x L`` tensor for ``detection_qr`` (see its
  docstring); ``classification`` (fixed 14x14 maps) keeps explicit logits but
  normalises them without a concatenated copy.

The fused ``detection_qr`` attention runs on PyTorch's fused attention
kernels in one of two ways, with the same result:

* :func:`one_call_attention`: one ``scaled_dot_product_attention`` call on
  queries and keys augmented with the position logits and one-hot
  row/column indicators (heads ``dq + H + W`` wide, padded to a multiple of
  8); on GPUs, on the CPU for small maps, and in every traced, exported or
  compiled graph (it is shape-generic);
* on the CPU in eager mode, where it at least halves that width, key blocks
  (:mod:`.key_blocks`): ``h x w`` blocks of keys need heads only
  ``dq + h + w`` wide, and their outputs merge exactly by their
  log-sum-exp.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import key_blocks
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


def _autocast_dtype(device_type):
    """The autocast dtype in force on ``device_type``, or ``None`` (also for
    device types that have no autocast, e.g. ``'meta'``)."""
    if torch.amp.is_autocast_available(device_type) and \
            torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


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
    args = [t.to(dtype) for t in (q, k, row, col)]
    if _autocast_dtype(q.device.type) is None:
        return _detection_moments_exact(*args)
    # autocast would run the Gram products in half precision
    with torch.autocast(q.device.type, enabled=False):
        return _detection_moments_exact(*args)


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
    row, col = position.axis_logits(q, height, width)  # (N,g,L,H), (N,g,L,W)
    scale = _logit_scales(logit_norm,
                          lambda: _detection_moments(q, k, row, col))
    g = q.shape[1]
    dtype = _autocast_dtype(q.device.type) or q.dtype
    a = scale[:g].view(1, g, 1, 1).to(dtype)
    b = scale[g:].view(1, g, 1, 1).to(dtype)
    # softmax_j(a q_i.k_j + b (R[i, r_j] + C[i, c_j]))
    q_s = q.transpose(-1, -2).to(dtype) * a
    row_s, col_s = row.to(dtype) * b, col.to(dtype) * b
    k_t, v_t = k.transpose(-1, -2).to(dtype), v.transpose(-1, -2).to(dtype)
    blocks = key_blocks.key_blocks(q_s, height, width)
    if blocks is not None:
        out = key_blocks.key_block_attention(q_s, k_t, v_t, row_s, col_s,
                                             height, width, blocks)
    else:
        out = one_call_attention(q_s, k_t, v_t, row_s, col_s, height, width)
    return out.transpose(-1, -2)


#: The augmented heads of the one-call path are zero-padded to a multiple of
#: this width: CUDA's flash and memory-efficient SDPA kernels need head sizes
#: that are multiples of 8.
HEAD_ALIGN = 8


def _aligned(width):
    """``width`` rounded up to a multiple of :data:`HEAD_ALIGN` (no Python
    branch, so it traces and exports for symbolic widths)."""
    return (width + HEAD_ALIGN - 1) // HEAD_ALIGN * HEAD_ALIGN


def one_call_attention(q_s, k, v, row_s, col_s, height, width):
    """``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` as one
    :func:`~torch.nn.functional.scaled_dot_product_attention` call.

    The queries ``[q_s[i], row_s[i], col_s[i]]`` against the keys
    ``[k_j, onehot(r_j), onehot(c_j)]`` give every logit; the heads are
    ``dq + H + W`` wide, zero-padded to a multiple of :data:`HEAD_ALIGN`.
    Zero channels add nothing to a logit, so the result is exact. In eager
    mode the values are zero-padded to the same width (the fused kernels
    need equal query/key and value head sizes); a traced or exported graph
    keeps them ``dv`` wide, which needs no comparison of symbolic sizes.
    The formulation is shape-generic: one export serves every map size.

    Args:
        q_s (Tensor): Scaled queries ``(N, g, L, dq)``.
        k (Tensor): Keys ``(N, g, L, dq)``.
        v (Tensor): Values ``(N, g, L, dv)``.
        row_s (Tensor): Scaled row logits ``(N, g, L, H)``.
        col_s (Tensor): Scaled column logits ``(N, g, L, W)``.
        height (int): ``H``.
        width (int): ``W``.

    Returns:
        Tensor: ``(N, g, L, dv)``.
    """
    n, g, length, dq = q_s.shape
    dv = v.shape[-1]
    rows = torch.arange(height, device=k.device)
    cols = torch.arange(width, device=k.device)
    eye_h = (rows[:, None] == rows).to(k.dtype)
    eye_w = (cols[:, None] == cols).to(k.dtype)
    # key j = r W + c carries onehot(r) and onehot(c)
    onehot = torch.cat([
        eye_h[:, None, :].expand(height, width, height),
        eye_w[None, :, :].expand(height, width, width)
    ], dim=-1).reshape(length, height + width)
    k_aug = torch.cat([k, onehot.expand(n, g, length, height + width)], -1)
    q_aug = torch.cat([q_s, row_s, col_s], dim=-1)
    width_aug = dq + height + width
    if key_blocks.is_graph_capture():
        size = _aligned(width_aug)
    else:
        size = _aligned(max(width_aug, dv))
        v = F.pad(v, (0, size - dv))
    q_aug = F.pad(q_aug, (0, size - width_aug))
    k_aug = F.pad(k_aug, (0, size - width_aug))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)
    return out[..., :dv]


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
