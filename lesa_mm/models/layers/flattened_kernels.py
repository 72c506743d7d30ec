"""The kernel of the ``classification`` encoding (:class:`.position.\
FlattenedRelPos1d`): the attention with positions over the flattened raster
index, the position terms as products batched over positions on sliding
windows of the table (``docs/lesa.md`` section 7.7).

:func:`_products` computes the attention; in eager training
:class:`_FlattenedAttention` runs it with its own backward
(:func:`_products_backward`), which reads each ``L x L`` tensor in the layout
it was made in and sums the table's gradient over the windows on a band
(:func:`anti_diagonal_sums`). Graph capture and higher derivatives
differentiate :func:`_products` with autograd.
"""
import torch

from .capture import is_graph_capture
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


def anti_diagonal_sums(prod):
    """``out[c, m] = sum_i prod[i, c, m - i]`` over ``0 <= m - i < L``, for
    ``prod (L, c, L)``: the gradient of a ``(c, 2L - 1)`` table from the
    gradients ``prod[i]`` of its sliding windows ``table[:, i:i + L]``.

    ``prod[i]`` is written into row ``i`` of a ``(c, L, 2L - 1)`` band at
    columns ``i .. i + L - 1`` and the rows are summed. Only the band's
    complement is zeroed: the end of row ``i`` with the start of row
    ``i + 1`` is one run of ``L`` elements, so the complement is one strided
    view.
    """
    length, channels, _ = prod.shape
    width = 2 * length - 1
    band = prod.new_empty(channels, length, width)
    band.as_strided((channels, length - 1, length),
                    (length * width, 2 * length, 1), length).zero_()
    band.as_strided((length, channels, length),
                    (2 * length, length * width, 1)).copy_(prod)
    return band.sum(1)


def _windows(length, *tables):
    """The sliding windows of each ``(c, 2L - 1)`` table, ``(c, L, L)``
    strided views: ``[:, i, j']`` is column ``i + j'``."""
    return [t.unfold(-1, length, 1) for t in tables]


def _products(qa, qb, kc, k_rev, v_rev, eq, ekf, ev):
    """The attention and its outputs, with ``B = N g`` heads, the keys and
    values in reverse order (``j' = L - 1 - j``) and the scales applied.

    Args:
        qa (Tensor): ``a q`` per position ``(i, B, dq)``.
        qb (Tensor): ``b q`` per position ``(i, B, dq)``.
        kc (Tensor): ``c k`` per reversed key ``(j', B, dq)``.
        k_rev (Tensor): ``k`` per reversed key ``(j', B, dq)``.
        v_rev (Tensor): Reversed values ``(B, j', dv)``.
        eq (Tensor): ``Eq`` ``(dq, 2L - 1)``.
        ekf (Tensor): ``Ek`` read backwards ``(dq, 2L - 1)``.
        ev (Tensor): ``Ev`` ``(dv, 2L - 1)``.

    Returns:
        tuple[Tensor]: ``o_v (B, i, dv)``, ``o_e (i, B, dv)`` and the
        attention ``(B, i, j')``.
    """
    win_q, win_k, win_v = _windows(qb.shape[0], eq, ekf, ev)
    s_qr = torch.bmm(qb, win_q.transpose(0, 1))  # (i, B, j')
    s_kr = torch.bmm(kc, win_k.transpose(0, 1))  # (j', B, i)
    logits = torch.baddbmm(s_qr.transpose(0, 1), qa.transpose(0, 1),
                           k_rev.permute(1, 2, 0))  # (B, i, j')
    logits += _Permuted.apply(s_kr, (1, 2, 0))
    attn = logits.softmax(dim=-1)
    # o_e first: autograd then meets o_v's gradient of the attention
    # first and accumulates o_e's into it, in the attention's layout
    o_e = torch.bmm(attn.transpose(0, 1), win_v.permute(1, 2, 0))
    o_v = torch.bmm(attn, v_rev)
    return o_v, o_e, attn


def _products_backward(qa, qb, kc, k_rev, v_rev, eq, ekf, ev, attn, g_ov,
                       g_oe):
    """The gradients of :func:`_products`'s inputs from those of ``o_v``
    and ``o_e``, given its attention.

    Each product's gradients are products over the same batch axis, so
    every ``L x L`` tensor is read in the layout it was made in: the
    attention and the logits per head ``(B, i, j')``, as ``(i, B, j')``
    views by the products over queries. The one transposition is the key
    term's gradient (the key term is batched over keys), copied within each
    head's ``L x L`` block. The windows' gradients go to the tables through
    :func:`anti_diagonal_sums`.
    """
    win_q, win_k, win_v = _windows(qb.shape[0], eq, ekf, ev)
    attn_i = attn.transpose(0, 1)  # (i, B, j')
    g_attn = torch.bmm(g_ov, v_rev.transpose(1, 2))
    g_attn += torch.bmm(g_oe, win_v.transpose(0, 1)).transpose(0, 1)
    g_v_rev = torch.bmm(g_ov.transpose(1, 2), attn).transpose(1, 2)
    g_ev = anti_diagonal_sums(torch.bmm(g_oe.transpose(1, 2), attn_i))
    # the softmax's own backward kernel (what autograd runs for it)
    g_logits = torch._softmax_backward_data(g_attn, attn, -1, attn.dtype)
    del g_attn
    g_i = g_logits.transpose(0, 1)  # (i, B, j')
    g_qb = torch.bmm(g_i, win_q.permute(1, 2, 0))
    g_eq = anti_diagonal_sums(torch.bmm(qb.transpose(1, 2), g_i))
    g_qa = torch.bmm(g_logits, k_rev.transpose(0, 1)).transpose(0, 1)
    g_k_rev = torch.bmm(qa.permute(1, 2, 0), g_logits).permute(2, 0, 1)
    g_kr = g_logits.transpose(1, 2).contiguous().transpose(0, 1)  # (j',B,i)
    del g_logits, g_i
    g_kc = torch.bmm(g_kr, win_k.permute(1, 2, 0))
    g_ekf = anti_diagonal_sums(torch.bmm(kc.transpose(1, 2), g_kr))
    return g_qa, g_qb, g_kc, g_k_rev, g_v_rev, g_eq, g_ekf, g_ev


class _FlattenedAttention(torch.autograd.Function):
    """:func:`_products` (``o_v`` and ``o_e``) with the backward of
    :func:`_products_backward`. It keeps the inputs and the attention, as
    autograd would. A backward that is itself differentiated
    (``create_graph=True``) differentiates the products with autograd
    instead, so higher derivatives flow."""

    @staticmethod
    def forward(ctx, *inputs):
        o_v, o_e, attn = _products(*inputs)
        ctx.save_for_backward(*inputs, attn)
        return o_v, o_e

    @staticmethod
    def backward(ctx, g_ov, g_oe):
        *inputs, attn = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return _products_backward(*inputs, attn, g_ov, g_oe)
        # aliases: the partial derivative in each input (the inputs depend
        # on one another, e.g. kc on k_rev, which autograd.grad in the
        # inputs themselves would follow), still functions of the inputs
        inputs = [x.view_as(x) for x in inputs]
        wanted = [x for x in inputs if x.requires_grad]
        o_v, o_e, _ = _products(*inputs)
        grads = iter(torch.autograd.grad((o_v, o_e), wanted, (g_ov, g_oe),
                                         create_graph=True))
        return tuple(next(grads) if x.requires_grad else None
                     for x in inputs)


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
    q_pos = cast(q_pos, dtype)
    k_rev = cast(k_pos, dtype).flip(0)  # (j', N g, dq)
    v_rev = cast(v, dtype).flip(-1).flatten(0, 1).transpose(1, 2)
    inputs = (q_pos * a, q_pos * b, k_rev * c, k_rev, v_rev, eq,
              ek.flip(-1), ev)
    if torch.is_grad_enabled() and not is_graph_capture():
        o_v, o_e = _FlattenedAttention.apply(*inputs)
    else:
        o_v, o_e, _ = _products(*inputs)
    dv = v.shape[2]
    return [o_v.view(n, g, length, dv).transpose(-1, -2),
            _Permuted.apply(o_e.view(length, n, g, dv), (1, 2, 3, 0))]
