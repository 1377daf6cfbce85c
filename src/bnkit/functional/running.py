"""Running-statistic update, in place, PyTorch's convention.

    running = (1 - momentum) * running + momentum * batch      (momentum 0.1 = Keras's 0.9)
running_var receives the unbiased batch variance var * n / (n - 1). Modules turn
`momentum=None` into the cumulative average by passing momentum = 1 / num_batches_tracked.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def update_running(running_mean, running_var, mean, var, count, momentum):
    """Blend batch statistics (mean, biased var, count) into the running buffers in place."""
    n = count.to(var.dtype)
    unbiased = var * (n / (n - 1))
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
