"""The kernel of the ``classification`` encoding (:class:`.position.\
FlattenedRelPos1d`): the attention with positions over the flattened raster
index, the position terms as products batched over positions on sliding
windows of the table (``docs/lesa.md`` section 7.7)."""
import torch

from .kernel_utils import autocast_dtype, cast


def per_position(x):
    """``(N, g, c, L) -> (L, N g, c)``, contiguous: per position, the
    vectors of every head and image, the operand layout of the products
    batched over positions."""
    n, g, c, length = x.shape
    return x.permute(3, 0, 1, 2).reshape(length, n * g, c).contiguous()


class _Permuted(torch.autograd.Function):
    """``x.permute(*dims)`` (a view) whose backward hands the gradient back
    contiguous in ``x``'s layout.

    The products batched over positions take their operands with the
    positions outermost; the tensors they feed (the logits, the layer's
    output) are laid out with the positions innermost. Permuted back by
    autograd alone, their gradient is strided along every axis, and a
    batched product copies such an operand matrix by matrix; here it is
    copied once. The backward is made of differentiable operators, so
    higher derivatives still flow.
    """

    generate_vmap_rule = True  # (torch.func transforms of a compiled graph)

    @staticmethod
    def forward(x, dims):
        return x.permute(*dims)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dims = inputs[1]
        ctx.inverse = [dims.index(axis) for axis in range(len(dims))]

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(*ctx.inverse).contiguous(), None


def flattened_attention(q, k, v, q_pos, k_pos, scale, table):
    """``softmax_j(a q_i.k_j + b S_qr + c S_kr)`` with the per-head scales
    ``a, b, c`` of ``BNsim``.

    The keys and values are taken in reverse order, ``j' = L - 1 - j``
    (softmax and the weighted sums do not depend on the order). Then
    the offset ``i - j`` is column ``i + j'`` of the table, so the
    ``L`` offsets that query ``i`` meets are one sliding window of the
    table, a strided view (``unfold``) that no copy materialises; the
    key term reads the windows of the flipped ``Ek`` the same way. The
    position terms are products batched over the positions: query
    ``i`` times its window gives its row of ``S_qr``, key ``j'`` times
    its window its column of ``S_kr``, and the attention row of query
    ``i`` times its window of ``Ev`` gives ``o_e[i]``. Each product
    costs the method's ``L^2 c`` multiply-accumulates per head; the
    scales multiply ``q`` and ``k`` before the products, so no pass
    over the ``L x L`` logits normalises them.

    Args:
        q (Tensor): Queries ``(N, g, dq, L)``.
        k (Tensor): Keys ``(N, g, dq, L)``.
        v (Tensor): Values ``(N, g, dv, L)``.
        q_pos (Tensor): ``q`` laid out per position (:func:`per_position`).
        k_pos (Tensor): ``k`` laid out per position.
        scale (Tensor): Per-head scales ``(3, g)`` of the content, query and
            key position logits (:meth:`.LogitBatchNorm.scales`).
        table (Tensor): The table ``E`` ``(2 dq + dv, 2L - 1)``.

    Returns:
        list[Tensor]: ``[o_v, o_e]``, each ``(N, g, dv, L)``.
    """
    n, g, d, length = q.shape
    heads = n * g
    dtype = autocast_dtype(q.device.type) or q.dtype
    # per-head scales, over the (N g) heads
    a, b, c = cast(scale, dtype).view(3, 1, g, 1).expand(3, n, g, 1) \
        .reshape(3, 1, heads, 1)
    eq, ek, ev = cast(table, dtype).split([d, d, v.shape[2]], dim=0)
    # windows (c, L, L): [:, i, j'] -> column i + j'
    win_q, win_k, win_v = (t.unfold(-1, length, 1)
                           for t in (eq, ek.flip(-1), ev))
    q_pos = cast(q_pos, dtype)
    k_rev = cast(k_pos, dtype).flip(0)  # (j', N g, dq)
    s_qr = torch.bmm(q_pos * b, win_q.transpose(0, 1))  # (i, N g, j')
    s_kr = torch.bmm(k_rev * c, win_k.transpose(0, 1))  # (j', N g, i)
    logits = torch.baddbmm(s_qr.transpose(0, 1),
                           (q_pos * a).transpose(0, 1),
                           k_rev.permute(1, 2, 0))  # (N g, i, j')
    logits += _Permuted.apply(s_kr, (1, 2, 0))
    attn = logits.softmax(dim=-1)
    # o_e first: autograd then meets o_v's gradient of the attention
    # first and accumulates o_e's into it, in the attention's layout
    o_e = torch.bmm(attn.transpose(0, 1), win_v.permute(1, 2, 0))
    v_rev = cast(v, dtype).flip(-1).flatten(0, 1).transpose(1, 2)
    o_v = torch.bmm(attn, v_rev)  # (N g, i, dv)
    dv = v.shape[2]
    return [o_v.view(n, g, length, dv).transpose(-1, -2),
            _Permuted.apply(o_e.view(length, n, g, dv), (1, 2, 3, 0))]
