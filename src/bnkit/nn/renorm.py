"""BatchRenorm (Ioffe 2017): BN whose training output is corrected towards the running stats."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .. import kernels
from ..functional.checks import validate_call
from ..functional.stats import mask_view
from .base import NormBase

Limit = float | Callable[[int], float]


def _ramp(step: int, start: int, end: int, lo: float, hi: float) -> float:
    """lo until `start`, then linear to hi at `end`, hi afterwards."""
    if step <= start:
        return lo
    return hi if step >= end else lo + (hi - lo) * (step - start) / (end - start)


def renorm_schedule(warmup_steps: int = 5000, r_max: float = 3.0, r_max_steps: int = 40000,
                    d_max: float = 5.0, d_max_steps: int = 25000) -> dict:
    """The paper's r_max/d_max schedule, as keyword arguments for `BatchRenorm`.

    r_max = 1 and d_max = 0 (plain BN) for the first `warmup_steps` steps, then linear to
    `r_max` at step `r_max_steps` and to `d_max` at step `d_max_steps`, constant afterwards.
    The step is the layer's `num_batches_tracked` (training batches seen before this one).

    Example:
        >>> s = renorm_schedule()
        >>> s["r_max"](5000), s["r_max"](22500), s["d_max"](25000)
        (1.0, 2.0, 5.0)
        >>> bn = BatchRenorm(16, **s)
    """
    if not 0 <= warmup_steps < min(r_max_steps, d_max_steps):
        raise ValueError(f"the schedule needs 0 <= warmup_steps < r_max_steps and d_max_steps "
                         f"(got warmup_steps={warmup_steps}, r_max_steps={r_max_steps}, "
                         f"d_max_steps={d_max_steps}); make the ramps end after the warm-up")
    _check_limits(r_max, d_max)
    return {"r_max": functools.partial(_ramp, start=warmup_steps, end=r_max_steps, lo=1.0,
                                       hi=float(r_max)),
            "d_max": functools.partial(_ramp, start=warmup_steps, end=d_max_steps, lo=0.0,
                                       hi=float(d_max))}


def _check_limits(r_max, d_max, step=None) -> None:
    at = "" if step is None else f" at step {step}"
    for name, v in (("r_max", r_max), ("d_max", d_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number or a callable of the step{at} (got "
                            f"{type(v).__name__}); pass e.g. {name}=3.0 or renorm_schedule()")
    if not (math.isfinite(r_max) and r_max >= 1.0):
        raise ValueError(f"r_max must be a finite number >= 1{at} (got {r_max}); r is clipped "
                         "to [1/r_max, r_max], and r_max = 1 gives plain BN")
    if not (math.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(f"d_max must be a finite number >= 0{at} (got {d_max}); d is clipped "
                         "to [-d_max, d_max], and d_max = 0 gives plain BN")


class BatchRenorm(NormBase, _BatchNorm):
    """Batch Renormalization (Ioffe 2017): train with batch statistics corrected by r and d.

    In training, with (mu_B, sigma_B) the batch mean and std (sqrt(biased var + eps)) and
    (mu, sigma) the running mean and std (sigma = sqrt(running_var + eps)):
        r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mu_B - mu) / sigma, -d_max, d_max)
        y = ((x - mu_B) / sigma_B * r + d) * weight + bias
    with r and d constants in the backward. This is plain BN with the effective affine
    weight * r and bias + weight * d, so the core op runs it; dL/dweight =
    sum(dy * (x_hat_B * r + d)). The running mean and variance then move towards the batch
    mean and unbiased variance by `momentum`, as in BatchNorm (the paper averages sigma
    itself; averaging the variance keeps the torch state dict, and BN checkpoints load).
    Eval uses the running statistics. With r_max = 1 and d_max = 0 it is exactly BatchNorm.
    Without running statistics (track_running_stats=False) r = 1 and d = 0.

    Args:
        num_features: C, the size of the channel dimension.
        eps: added to the variances (default 1e-5).
        momentum: running-average weight of the new batch (default 0.01, the paper's alpha);
            None for a cumulative average.
        r_max, d_max: clipping limits (defaults 3.0 and 5.0), each a float or a callable
            of the step (num_batches_tracked), e.g. from `renorm_schedule()`.
        affine, track_running_stats: as in `BatchNorm` (default True, True).
        axis: the channel dimension (default 1). bias: learn the shift (default True).
            Keyword-only.

    Shape: input (N, C, *) for axis=1; output the same shape and dtype.

    Example:
        >>> bn = BatchRenorm(8, **renorm_schedule())
        >>> y = bn(torch.randn(16, 8, 4, 4) * 2 + 1)
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(8), atol=1e-5)   # r=1, d=0 at step 0
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, *,
                 r_max: Limit = 3.0, d_max: Limit = 5.0, axis: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        _check_limits(*(1.0 if callable(v) else v for v in (r_max, d_max)))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         bias=bias, device=device, dtype=dtype)
        self.r_max, self.d_max = r_max, d_max

    def limits(self) -> tuple[float, float]:
        """(r_max, d_max) for the current step, callables evaluated and checked."""
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        r_max, d_max = (v(step) if callable(v) else v for v in (self.r_max, self.d_max))
        _check_limits(r_max, d_max, step)
        return float(r_max), float(d_max)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return self._scripted(input)
        momentum, step = self._momentum_and_step()
        rm, rv = self._running_buffers()
        training = self._uses_batch_stats()
        weight, bias = self.weight, self.bias
        if training and rm is not None:
            weight, bias = self._effective_affine(input, mask, rm, rv)
        counter = self.num_batches_tracked if step else None
        return F.counted_batch_norm(input, rm, rv, weight, bias, training, momentum, self.eps,
                                    self.axis, mask, "identity", counter)

    def _effective_affine(self, x, mask, rm, rv):
        """(weight * r, bias + weight * d), r and d (C,) detached, from one stats pass."""
        # the core's own checks first: a bad input fails before the extra statistics pass
        axis = validate_call(x, rm, rv, self.weight, self.bias, True, 0.0, self.eps, self.axis,
                             mask, "identity")
        r_max, d_max = self.limits()
        if mask is not None:
            mask = mask_view(mask, x.dim(), axis)
        with torch.no_grad():
            # the selected backend's statistics pass (compiled on CPU, Triton on GPU)
            _, mu_b, var_b = kernels.select(x, axis, mask).batch_stats(x.detach(), axis, mask)
            sigma = torch.sqrt(rv.to(var_b.dtype) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mu_b - rm.to(mu_b.dtype)) / sigma).clamp(-d_max, d_max)
        w = self.weight
        pdt = w.dtype if w is not None else x.dtype
        r, d = r.to(pdt), d.to(pdt)
        weight = r if w is None else w * r
        shift = d if w is None else w * d
        return weight, shift if self.bias is None else self.bias + shift

    def extra_repr(self) -> str:
        def show(v):
            return getattr(v, "__name__", "schedule") if callable(v) else v
        return f"{super().extra_repr()}, r_max={show(self.r_max)}, d_max={show(self.d_max)}"

