"""The BatchNorm over LESA's attention logits (``BNsim``).

The binary term normalises each of its logit terms (the content logits and
the position terms) with one BatchNorm channel per term and head, then sums
them. Its shift is constant over the keys, so softmax ignores it: the fused
kernels need only one scale per channel, ``weight / sqrt(var + eps)``.
:class:`LogitBatchNorm` gives those scales, from its running variance in
eval mode and from the batch statistics the caller computes in closed form
in training mode, and updates its own running statistics as
``BatchNorm2d`` would; the kernels that use the scales stay pure functions.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class LogitBatchNorm(_BatchNorm):
    """``BatchNorm2d`` over ``terms * heads`` logit channels that also
    serves the fused attention its per-channel scales.

    Its parameters and buffers are those of ``BatchNorm2d`` (the checkpoint
    layout does not change); called on a ``(N, terms * g, L, L)`` tensor it
    is a ``BatchNorm2d`` (a ``SyncBatchNorm`` with ``sync=True``).

    Args:
        num_features (int): ``terms * g`` channels.
        eps (float): As ``BatchNorm2d``. Defaults to 1e-5.
        momentum (float | None): As ``BatchNorm2d``. Defaults to 0.1.
        affine (bool): As ``BatchNorm2d``. Defaults to True.
        track_running_stats (bool): As ``BatchNorm2d``. Defaults to True.
        sync (bool): Reduce batch statistics over the default process group
            in distributed training, as ``SyncBatchNorm``. Defaults to False.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, sync=False):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats)
        self.sync = sync
        self.process_group = None  # the default group, as SyncBatchNorm

    @classmethod
    def from_norm(cls, norm):
        """The :class:`LogitBatchNorm` of the settings (and ``requires_grad``
        flags) of a built ``_BatchNorm``, e.g. ``build_norm_layer``'s
        ``BN`` or ``SyncBN``."""
        new = cls(norm.num_features, norm.eps, norm.momentum, norm.affine,
                  norm.track_running_stats,
                  sync=isinstance(norm, nn.SyncBatchNorm))
        if norm.affine:
            new.weight.requires_grad_(norm.weight.requires_grad)
            new.bias.requires_grad_(norm.bias.requires_grad)
        return new

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f'LogitBatchNorm expects (N, C, L, L) logits, '
                             f'got {input.dim()}D input')

    def _syncs(self):
        return (self.sync and self.training and dist.is_available()
                and dist.is_initialized() and dist.get_world_size() > 1)

    def forward(self, input):
        if not self._syncs():
            return super().forward(input)
        # the batch statistics of every process, as SyncBatchNorm's: the
        # per-channel moments all-reduced (differentiably), then the
        # normalisation of _BatchNorm
        self._check_input_dim(input)
        dims = (0, 2, 3)
        mean, var = self._batch_moments(input.sum(dims),
                                        input.square().sum(dims),
                                        input.numel() // input.shape[1])
        shape = (1, -1, 1, 1)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) +
                                                       self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def uses_batch_stats(self):
        """Whether it normalises with batch statistics (as in
        ``_BatchNorm.forward``)."""
        return self.training or (self.running_mean is None
                                 and self.running_var is None)

    def scales(self, moments):
        """Per-channel factors ``weight / sqrt(var + eps)``, float32 or
        wider. With batch statistics, ``var`` comes from ``moments`` and is
        differentiable, and the running statistics are updated.

        Args:
            moments (callable): Returns the per-channel sums and sums of
                squares of the logits over one batch and the element count
                per channel; called only when batch statistics are used.
        """
        if not self.uses_batch_stats():
            return self.running_scales()
        _, var = self._batch_moments(*moments())
        return self._scales(var)

    def _batch_moments(self, sums, sq_sums, count):
        """Batch mean and biased variance from the per-channel sums, sums
        of squares and element count, over every process when it syncs
        (``torch.distributed.nn.functional.all_reduce``, differentiable);
        updates the running statistics."""
        stats = torch.stack([sums, sq_sums, torch.full_like(sums, count)])
        if self._syncs():
            from torch.distributed.nn.functional import all_reduce
            stats = all_reduce(stats)
        sums, sq_sums, counts = stats
        count = counts[0]
        mean = sums / count
        var = (sq_sums / count - mean.square()).clamp_min(0)
        self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return mean, var

    def running_scales(self):
        """:meth:`scales` from the running variance (eval mode's)."""
        return self._scales(self.running_var)

    def _scales(self, var):
        var = var.to(torch.promote_types(var.dtype, torch.float32))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        if self.bias is not None:
            # softmax ignores the shift, so the bias's gradient is exactly
            # zero; keep it in the graph so that DDP sees every parameter
            scale = scale + 0 * self.bias.to(scale.dtype)
        return scale

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        """As ``BatchNorm2d`` from a batch of ``count`` elements per channel
        with biased variance ``var``."""
        if not (self.training and self.track_running_stats):
            return
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / (count - 1).clamp_min(1))
        self.running_mean.mul_(1 - momentum).add_(
            mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(
            unbiased.to(self.running_var.dtype), alpha=momentum)
