"""Helpers the binary term's fused kernels share: the autocast dtype and
casts, exact (float32 or wider) batch statistics, the closed-form content
statistics and the refusal of second derivatives."""
import torch

from .capture import is_graph_capture


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
