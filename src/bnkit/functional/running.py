"""Running-statistic update, in place, PyTorch's convention.

    running = (1 - momentum) * running + momentum * batch      (momentum 0.1 = Keras's 0.9)
running_var receives the unbiased batch variance var * n / (n - 1). Modules turn
`momentum=None` into the cumulative average by passing momentum = 1 / num_batches_tracked.
"""
from __future__ import annotations

import torch


def update_running(running_mean, running_var, mean, var, count, momentum):
    """Blend batch statistics (mean, biased var, count) into the running buffers in place.

    Computed in float64 (the statistics' dtype for float32/float64 input; float32 for half
    input) as `r * (1 - momentum) + stat * w` (two products, one sum, each rounded) and
    rounded once into the buffer's dtype: the arithmetic of the cpu
    backend's in-kernel blend (`kernels/cpu_ops._blend`), so eager runs on either backend
    and compiled graphs agree bit for bit. Tensors that carry autograd history are blended
    under no_grad (a context costs ~10 us, so it is entered only then).
    """
    tracked = (t is not None and t.requires_grad for t in (mean, var, running_mean, running_var))
    if torch.is_grad_enabled() and any(tracked):
        with torch.no_grad():
            return _blend(running_mean, running_var, mean, var, count, momentum)
    return _blend(running_mean, running_var, mean, var, count, momentum)


def _blend(running_mean, running_var, mean, var, count, momentum):
    keep = 1 - momentum
    if running_mean is not None:
        running_mean.copy_(_mix(running_mean, keep, mean, momentum))
    if running_var is None:
        return
    n = _host_count(count)
    if n is None:  # a traced or device count: stay in tensor ops (no sync, no graph break)
        nt = count.to(torch.float64)
        factor = momentum * (nt / (nt - 1))
    else:  # n / (n - 1) folded into the scalar factor
        factor = momentum * (n / (n - 1))
    running_var.copy_(_mix(running_var, keep, var, factor))


def _mix(running, keep, stat, weight):
    """running * keep + stat * weight in the wider of the two dtypes (float64 for float32 or
    float64 input, whose statistics are float64), as a new tensor."""
    dt = torch.promote_types(running.dtype, stat.dtype)
    return (running.to(dt) * keep).add_(stat.to(dt) * weight)


def _host_count(count):
    """count as a Python float when reading it is free (an eager CPU tensor above 1), else
    None."""
    if count.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    n = float(count)
    return n if n > 1 else None
