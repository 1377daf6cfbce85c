"""The functional core: `batch_norm`, the one op every bnkit layer calls.

Made of five pieces (see docs/architecture.md): stats, normalize, backward (reduce and
elementwise), running (the running-stat update) and autograd (custom-op wiring).
"""
from __future__ import annotations

import torch

from . import checks
from .activation import ACTIVATIONS
from .autograd import bn_apply, native_apply
from .backward import act_backward, backward_elemt, backward_reduce, grad_affine
from .export import lowered_call, lowering
from .normalize import normalize
from .running import record_step, update_running
from .stats import Stats, batch_stats, merge_many, merge_stats

__all__ = [
    "ACTIVATIONS",
    "Stats",
    "act_backward",
    "backward_elemt",
    "backward_reduce",
    "batch_norm",
    "batch_stats",
    "grad_affine",
    "merge_many",
    "merge_stats",
    "normalize",
    "record_step",
    "update_running",
]


def _valid_count(x, axis, mask) -> int:
    """Values per channel that enter the statistics (a Python int; syncs for a mask)."""
    if mask is None:
        return x.numel() // max(x.shape[axis], 1)
    shape = [s for d, s in enumerate(x.shape) if d != axis]
    return int(mask.expand(shape).sum())


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, mask=None, act="identity"):
    """Batch normalization over every dimension but the channel `axis`.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with (mean, var) the biased batch
    statistics when `training` (the running buffers then move towards the batch mean and
    the unbiased variance by `momentum`, in place) and the running statistics otherwise.
    With axis=1 and no mask it matches torch.nn.functional.batch_norm (same arguments,
    same outputs, gradients and running statistics) and is more accurate off-centre.

    Args:
        input: (N, C, ...) tensor, or any rank >= 2 with channels at `axis`.
        running_mean, running_var: (C,) buffers or None (then batch statistics only).
        weight, bias: optional (C,) affine parameters.
        training: normalize with batch statistics and update the running buffers.
        momentum: running = (1 - momentum) * running + momentum * batch. Default 0.1.
        eps: added to the variance. Default 1e-5.
        axis: the channel dimension; negative values count from the end.
        mask: optional boolean tensor over the non-channel dims (e.g. (N, L) for (N, C, L)),
            True where a value is real. Statistics use only valid positions, whatever the
            padding holds (NaN and Inf too); padded positions are normalized with the same
            statistics.
        act: activation fused into the output ('identity', 'relu', 'silu', 'gelu'); its
            derivative is fused into the backward. Used by BatchNormAct.

    Shape: input (*), output the same shape and dtype.

    Unlike torch: eps=0 is allowed (a zero-variance channel then gives exactly the bias); a
    channel whose batch statistics are not finite keeps its running statistics (a
    RuntimeWarning says so, once per buffer); momentum is checked in eval too. Errors are
    `bnkit.errors` classes, each also the built-in type torch raises for the same mistake
    (docs/errors.md); a failed call changes nothing.

    Example:
        >>> x = torch.randn(8, 3, 5)
        >>> y = batch_norm(x, training=True)
        >>> torch.allclose(y.mean((0, 2)), torch.zeros(3), atol=1e-6)
        True
    """
    return counted_batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, axis, mask, act, None)


def counted_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       axis, mask, act, counter):
    """`batch_norm` with positional arguments, for layers: `counter` (a layer's
    num_batches_tracked, or None) advances by one after a successful training call with
    running buffers (`running.record_step`, the one owner of both). Every call is
    validated first, so every path and dtype gives the same errors."""
    axis = checks.validate_call(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, axis, mask, act)
    count = _valid_count(input, axis, mask) if training else 2
    if input.numel() == 0:
        return _empty(input, weight, bias, axis, act)
    checks.check_enough_values(count, input, training, mask is not None)
    if lowering():  # torch.export / torch.jit.trace: standard torch ops (export.py)
        y = lowered_call(input, running_mean, running_var, weight, bias, training, eps, axis,
                         mask, act)
        if y is not None:
            return y
    update = training and running_mean is not None
    if update and not torch.compiler.is_compiling():  # the update writes them in place:
        checks.check_writable(running_mean, running_var)  # refuse what it cannot, first
    if mask is None:  # the C++ node takes most eager calls (None: the path below runs)
        y = native_apply(input, weight, bias, running_mean, running_var, training, momentum,
                         eps, axis, act)
        if y is not None:
            if update:
                record_step(running_mean, running_var, None, None, None, momentum, counter,
                            blended=True)
            return y
    y, mean, var, n, blended = bn_apply(input, weight, bias, running_mean, running_var, mask,
                                        training, eps, axis, act,
                                        float(momentum) if update else None)
    if update:
        record_step(running_mean, running_var, mean, var, n, momentum, counter, blended)
    return y


def _empty(x, weight, bias, axis, act):
    """An empty batch: empty output (still connected to weight/bias), no statistics touched."""
    c = x.shape[axis]
    zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
    return normalize(x, zeros, torch.ones_like(zeros), weight, bias, axis, act)
