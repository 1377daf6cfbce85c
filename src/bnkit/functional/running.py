"""Running-statistic update, in place, PyTorch's convention.

    running = (1 - momentum) * running + momentum * batch      (momentum 0.1 = Keras's 0.9)
running_var receives the unbiased batch variance var * n / (n - 1). Modules turn
`momentum=None` into the cumulative average by passing momentum = 1 / num_batches_tracked.
"""
from __future__ import annotations

import torch


def update_running(running_mean, running_var, mean, var, count, momentum):
    """Blend batch statistics (mean, biased var, count) into the running buffers in place.

    Two in-place ops per buffer: `add_` takes the statistics in their own (accumulation)
    dtype, so the blend computes in it and rounds once into the buffer's dtype. Tensors
    that carry autograd history are blended under no_grad (a context costs ~10 us, so
    it is entered only then).
    """
    tracked = (t is not None and t.requires_grad for t in (mean, var, running_mean, running_var))
    if torch.is_grad_enabled() and any(tracked):
        with torch.no_grad():
            return _blend(running_mean, running_var, mean, var, count, momentum)
    return _blend(running_mean, running_var, mean, var, count, momentum)


def _blend(running_mean, running_var, mean, var, count, momentum):
    keep = 1 - momentum
    if running_mean is not None:
        running_mean.mul_(keep).add_(mean, alpha=momentum)
    if running_var is None:
        return
    n = _host_count(count)
    if n is None:  # a traced or device count: stay in tensor ops (no sync, no graph break)
        nt = count.to(var.dtype)
        running_var.mul_(keep).add_(var * (nt / (nt - 1)), alpha=momentum)
    else:  # n / (n - 1) folded into the scalar factor
        running_var.mul_(keep).add_(var, alpha=momentum * (n / (n - 1)))


def _host_count(count):
    """count as a Python float when reading it is free (an eager CPU tensor above 1), else
    None."""
    if count.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    n = float(count)
    return n if n > 1 else None
