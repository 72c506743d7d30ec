"""Kernels of LESA's binary (context) term.

Every kernel takes the per-head queries ``q (N, g, dq, L)``, keys
``k (N, g, dq, L)`` and values ``v (N, g, dv, L)`` that the binary term
projected, its position encoding (:class:`.position.RelativePosition`) and
the BatchNorm over logits (``BNsim``), and returns the per-head outputs
before the output BatchNorm: ``[o_v]`` for ``'detection_qr'``, ``[o_v, o_e]``
for ``'classification'``.

* :func:`reference_attention` is the spec's direct formulation: it
  materialises the ``(N, terms * g, L, L)`` logits and normalises them with
  ``BNsim`` exactly as ``docs/lesa.md`` section 3 writes it.
* :func:`fused_attention` computes the same outputs, gradients and running
  statistics with the encoding's own exact kernel (``fused_attention`` of
  each encoding, ``docs/lesa.md`` section 7): the norm reduces to per-head
  scales, from closed-form batch statistics in training.

This module also holds what those kernels share: the closed-form content
statistics, the autocast query and :func:`one_call_attention`, which runs
``detection_qr`` attention as one fused attention call (the CPU key blocks
of :mod:`.key_blocks` are its eager-mode alternative).
"""
import torch
import torch.nn.functional as F

from .capture import is_graph_capture
from .logit_norm import LogitBatchNorm


def reference_attention(q, k, v, position, logit_norm, height, width):
    """The binary term's attention, computed as the spec writes it.

    Args:
        q (Tensor): Queries ``(N, g, dq, L)``.
        k (Tensor): Keys ``(N, g, dq, L)``.
        v (Tensor): Values ``(N, g, dv, L)``.
        position (RelativePosition): The position encoding.
        logit_norm (nn.Module): ``BNsim``, a norm over ``terms * g``
            channels.
        height (int): Feature-map height ``H`` (``L = H * W``).
        width (int): Feature-map width ``W``.

    Returns:
        list[Tensor]: ``[o_v]`` and the encoding's embedding outputs, each
        ``(N, g, dv, L)``.
    """
    n, g, _, length = q.shape
    terms = [torch.einsum('ngci,ngcj->ngij', q, k),  # S_qk
             *position.logits(q, k, height, width)]
    normed = logit_norm(torch.cat(terms, dim=1))  # (N, terms * g, L, L)
    logits = normed.view(n, len(terms), g, length, length).sum(dim=1)
    attn = logits.softmax(dim=-1)
    return [torch.einsum('ngij,ngcj->ngci', attn, v),
            *position.embedding_outputs(attn, height, width)]


def fused_attention(q, k, v, position, logit_norm, height, width):
    """The binary term's attention, exact and memory-efficient: the
    encoding's ``fused_attention``.

    ``BNsim`` only scales and shifts each head's logit terms and softmax
    ignores the shift, so the attention is ``softmax(sum_t a_t S_t)`` with
    per-head scalars ``a_t`` (:meth:`.LogitBatchNorm.scales`).

    Arguments and returns as :func:`reference_attention`; ``logit_norm``
    must be a :class:`.LogitBatchNorm`.
    """
    if not isinstance(logit_norm, LogitBatchNorm):
        raise ValueError(
            f'the fused LESA attention needs its LogitBatchNorm over logits, '
            f'got {type(logit_norm).__name__} (built from a non-BatchNorm '
            f'norm_cfg, or replaced after building by something other than '
            f"a runner's sync_bn conversion, which the layer adopts); use a "
            f"BatchNorm-type norm_cfg, e.g. dict(type='SyncBN'), or "
            f"attn_impl='reference', which takes any norm")
    return position.fused_attention(q, k, v, logit_norm, height, width)


def under_functorch(tensor):
    """Whether ``tensor`` is being transformed by ``torch.func`` (``grad``,
    ``vmap``, ``jacrev``, ...) in eager mode: the fused kernels' private ops
    and autograd Functions have no rules for those transforms, so the binary
    term takes the reference kernel there. While a graph is compiled or
    exported the answer is no: dynamo cannot trace the query (it would
    break the graph at every layer), and a captured graph runs the
    shape-generic formulations, made of plain operators."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


class _FirstDerivativeOnly(torch.autograd.Function):
    """Identity whose backward refuses to be differentiated again, with a
    message naming the way out: PyTorch's fused attention kernels, which
    the ``detection_qr`` kernels run on, have no second derivative."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "LESA's fused 'detection_qr' attention (attn_impl='fused') "
                'has first derivatives only: it runs on fused attention '
                'kernels, which have no second derivative. A backward with '
                'create_graph=True (gradient penalties, meta-learning, '
                "Hessians) needs attn_impl='reference' (e.g. "
                "model.backbone.attn_impl='reference'); torch.func "
                'transforms take it by themselves')
        return grad


def first_derivative_only(x):
    """``x``, refusing a second derivative clearly where autograd records
    in eager mode (:class:`_FirstDerivativeOnly`; a captured graph keeps
    plain operators)."""
    if torch.is_grad_enabled() and x.requires_grad and \
            not is_graph_capture():
        return _FirstDerivativeOnly.apply(x)
    return x


def autocast_dtype(device_type):
    """The autocast dtype in force on ``device_type``, or ``None`` (also for
    device types that have no autocast, e.g. ``'meta'``)."""
    if torch.amp.is_autocast_available(device_type) and \
            torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(tensor, dtype):
    """``tensor`` in ``dtype``: ``tensor`` itself where it already is, so
    that a captured graph holds no operator for it."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def exact_moments(moments, *tensors):
    """``moments(*tensors)`` in float32 (at least), with autocast off: batch
    statistics of the logits are sums of squares that half precision would
    round."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    tensors = [cast(t, dtype) for t in tensors]
    if autocast_dtype(tensors[0].device.type) is None:
        return moments(*tensors)
    with torch.autocast(tensors[0].device.type, enabled=False):
        return moments(*tensors)


def content_moments(q, k):
    """Per-head sum and sum of squares of the content logits
    ``S_qk[i, j] = q_i.k_j`` over ``(N, L, L)`` and the element count, in
    closed form: ``sum_ij q_i.k_j = (sum_i q_i).(sum_j k_j)`` and
    ``sum_ij (q_i.k_j)^2 = trace(Q^T Q K^T K)``."""
    n, _, _, length = q.shape
    qk_sum = (q.sum(-1) * k.sum(-1)).sum(-1).sum(0)
    gram_q = q @ q.transpose(-1, -2)
    gram_k = k @ k.transpose(-1, -2)
    qk_sq = (gram_q * gram_k).sum((-1, -2)).sum(0)
    return qk_sum, qk_sq, n * length * length


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


#: ``attn_impl`` -> the kernel of the binary term.
ATTENTION_KERNELS = dict(fused=fused_attention, reference=reference_attention)
ATTENTION_IMPLS = tuple(ATTENTION_KERNELS)
