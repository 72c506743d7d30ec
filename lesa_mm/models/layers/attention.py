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

Where the fused kernels live: :mod:`.decomposed_kernels` (``detection_qr``:
one call, :mod:`.key_blocks`, :mod:`.folded_rows`, and the choice among
them) and :mod:`.flattened_kernels` (``classification``); what they share is
in :mod:`.kernel_utils`.
"""
import torch

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
    shape-generic formulations, which torch.func transforms handle (a
    compiled ``torch.func.grad`` of the layer matches eager mode)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


#: ``attn_impl`` -> the kernel of the binary term.
ATTENTION_KERNELS = dict(fused=fused_attention, reference=reference_attention)
ATTENTION_IMPLS = tuple(ATTENTION_KERNELS)
