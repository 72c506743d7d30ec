"""The kernels of the ``detection_qr`` encoding (:class:`.position.\
DecomposedRelPos2d`) and the choice among them.

``softmax_j(a q_i.k_j + b (R[i, r_j] + C[i, c_j])) v_j``, exact and without
an ``L x L`` tensor, runs on fused attention kernels over queries augmented
with their row and column logits and keys augmented with one-hot row and
column indicators (``docs/lesa.md`` section 7). :func:`decomposed_attention`
chooses, in this order:

* folded rows (:mod:`.folded_rows`): CPU inference, eager mode, where the
  key blocks' heads would be wider than the value heads;
* key blocks (:mod:`.key_blocks`): the CPU in eager mode, where blocks at
  least halve the augmented head width;
* one call (:func:`one_call_attention`): everywhere else, on GPUs, for small
  maps, and in every traced, exported or compiled graph (the formulation is
  the same for every map size).
"""
import torch
import torch.nn.functional as F

from . import folded_rows, key_blocks
from .capture import is_graph_capture
from .kernel_utils import autocast_dtype, cast, first_derivative_only


def decomposed_attention(q, k, v, scale, tables, row, col, height, width):
    """The ``detection_qr`` attention on the kernel chosen for the inputs.

    Args:
        q (Tensor): Queries ``(N, g, dq, L)``.
        k (Tensor): Keys ``(N, g, dq, L)``.
        v (Tensor): Values ``(N, g, dv, L)``.
        scale (Tensor): Per-head scales ``(2, g)`` of the content and the
            position logits (:meth:`.LogitBatchNorm.scales`).
        tables (tuple[Tensor, Tensor]): The row and column tables gathered
            per query row and column (:meth:`.DecomposedRelPos2d.tables`).
        row (Tensor): Row logits ``(N, g, L, H)``.
        col (Tensor): Column logits ``(N, g, L, W)``.
        height (int): ``H``.
        width (int): ``W``.

    Returns:
        Tensor: ``o_v`` ``(N, g, dv, L)``.
    """
    g = q.shape[1]
    dtype = autocast_dtype(q.device.type) or q.dtype
    a, b = cast(scale.view(2, 1, g, 1, 1), dtype)
    q_t = cast(q.transpose(-1, -2), dtype)
    row_s, col_s = cast(row, dtype) * b, cast(col, dtype) * b
    k_t, v_t = (cast(t.transpose(-1, -2), dtype) for t in (k, v))
    fold_w = folded_rows.folded_columns(q_t, v.shape[2], height, width)
    if fold_w is not None:
        th, tw = (b.view(g, 1, 1, 1) * cast(t, dtype) for t in tables)
        out = folded_rows.folded_attention(q_t, k_t * a, v_t, th, tw, row_s,
                                           col_s, height, width, fold_w)
        return out.transpose(-1, -2)
    q_s = q_t * a
    blocks = key_blocks.key_blocks(q_s, height, width)
    if blocks is not None:
        out = key_blocks.key_block_attention(q_s, k_t, v_t, row_s, col_s,
                                             height, width, blocks)
    else:
        out = one_call_attention(q_s, k_t, v_t, row_s, col_s, height, width)
    return first_derivative_only(out.transpose(-1, -2))


#: The augmented heads of the one-call path are zero-padded to a multiple of
#: this width: CUDA's flash and memory-efficient SDPA kernels need head sizes
#: that are multiples of 8.
HEAD_ALIGN = 8


def _aligned(width):
    """``width`` rounded up to a multiple of :data:`HEAD_ALIGN` (no Python
    branch, so it traces and exports for symbolic widths)."""
    return (width + HEAD_ALIGN - 1) // HEAD_ALIGN * HEAD_ALIGN


def _at_least(width, minimum):
    """``max(width, minimum)`` for a symbolic width without a branch:
    ``torch.sym_max`` of an exported or compiled graph's sizes, a clamp of
    the traced tensors ``torch.jit.trace`` makes of them."""
    if isinstance(width, torch.Tensor):
        return width.clamp(min=minimum)
    return torch.sym_max(width, minimum)


def one_call_attention(q_s, k, v, row_s, col_s, height, width):
    """``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` as one
    :func:`~torch.nn.functional.scaled_dot_product_attention` call.

    The queries ``[q_s[i], row_s[i], col_s[i]]`` against the keys
    ``[k_j, onehot(r_j), onehot(c_j)]`` give every logit; the heads are
    ``dq + H + W`` wide, zero-padded to a multiple of :data:`HEAD_ALIGN`.
    Zero channels add nothing to a logit, so the result is exact. In eager
    mode the values are zero-padded to the same width (the fused kernels
    need equal query/key and value head sizes); a traced or exported graph
    keeps them ``dv`` wide and pads the heads past ``dv`` at every size, so
    that no comparison of the symbolic widths enters the graph.
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
    if is_graph_capture():
        # values dv wide, heads wider than dv for every map size (no
        # branch), so that whether the two widths are equal never becomes a
        # guard of the captured graph
        size = _aligned(_at_least(width_aug, dv + 1))
    else:
        size = _aligned(max(width_aug, dv))
        v = F.pad(v, (0, size - dv))
    q_aug = F.pad(q_aug, (0, size - width_aug))
    k_aug = F.pad(k_aug, (0, size - width_aug))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)
    return out[..., :dv]
