"""Input validation for the core. Every error names the rule, the value received and the fix.

All checks run before any state is touched, so a failed call leaves running statistics
and parameters exactly as they were.
"""
from __future__ import annotations

import torch


def normalize_axis(axis: int, ndim: int) -> int:
    """Map a possibly negative channel axis into [0, ndim)."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must index a dimension of the input: expected -{ndim} <= axis < "
                         f"{ndim} for a {ndim}D input (got axis={axis}); pass the position of "
                         "the channel dimension, e.g. axis=1 for (N, C, ...) or axis=-1 for "
                         "channels-last")
    return axis % ndim


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch_norm expects a torch.Tensor input (got {type(x).__name__}); "
                        "convert it with torch.as_tensor(x, dtype=torch.float32)")
    if not x.is_floating_point():
        raise TypeError(f"batch_norm expects a floating-point input (got dtype {x.dtype}); "
                        "convert it first, e.g. x.float()")
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects at least 2D input (N, C, ...) (got {x.dim()}D "
                         f"input of shape {tuple(x.shape)}); add a batch dimension with "
                         "x.unsqueeze(0) or a channel dimension with x.unsqueeze(1)")


def check_channel_vector(name, v, x, axis) -> None:
    """A per-channel tensor must be (C,) and live on the input's device."""
    if v is None:
        return
    c = x.shape[axis]
    if v.dim() == 1 and v.shape[0] == c and v.is_floating_point() and (
            v.is_cpu and x.is_cpu or v.device == x.device):
        return  # the common case in four attribute reads; the rest explains a failure
    if tuple(v.shape) != (c,):
        raise ValueError(f"{name} must hold one value per channel: expected shape ({c},) for "
                         f"input of shape {tuple(x.shape)} with channels on axis {axis} (got "
                         f"{tuple(v.shape)}); make num_features match the input's channel "
                         "dimension, or pass the right axis")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but the input is on {x.device}: all tensors "
                         f"must share one device; move them with .to({str(x.device)!r})")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point (got dtype {v.dtype}); use .float()")


def check_mask(mask, x, axis) -> None:
    """A mask is boolean, broadcastable to the input without its channel dim, and not empty."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor, True at valid positions (got dtype "
                        f"{mask.dtype}); build it with a comparison, e.g. lengths[:, None] > "
                        "torch.arange(L)")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {x.device}; move it "
                         f"with mask.to({str(x.device)!r})")
    target = tuple(s for d, s in enumerate(x.shape) if d != axis)
    ok = mask.dim() == len(target) and all(m in (1, t) for m, t in zip(mask.shape, target))
    if not ok:
        raise ValueError(f"mask must cover the input's non-channel dimensions: expected a shape "
                         f"broadcastable to {target} (input {tuple(x.shape)} without axis "
                         f"{axis}) (got {tuple(mask.shape)}); for (N, C, L) input pass an "
                         "(N, L) mask")


def check_enough_values(count: int, x, training: bool, masked: bool) -> None:
    """Training needs more than one value per channel: the unbiased variance divides by n-1."""
    if not training or count > 1:
        return
    what = "valid (unmasked) values" if masked else "values"
    raise ValueError(f"expected more than 1 value per channel when training (got {count} "
                     f"{what} per channel, input shape {tuple(x.shape)}); use a batch of at "
                     "least 2, fewer masked positions, or call model.eval()")


def check_running(running_mean, running_var, training: bool) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (got only "
                         f"{'running_mean' if running_var is None else 'running_var'}); pass "
                         "both or neither")
    if not training and running_mean is None:
        raise ValueError("training=False normalizes with running statistics, but "
                         "running_mean/running_var are None; pass them, or use training=True "
                         "to normalize with batch statistics")


def _check_real(name, v, fix) -> None:
    """A Python/NumPy number or a 0-d tensor; float(v) must work (None and str do not)."""
    try:
        if isinstance(v, str):
            raise TypeError
        float(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number (got {v!r}); {fix}") from None


def check_scalars(momentum, eps) -> None:
    if type(momentum) is float and type(eps) is float and 0.0 <= momentum <= 1.0 and eps >= 0:
        return  # the common case; the rest explains a failure
    _check_real("momentum", momentum, "the functional form takes a float (a module's "
                "momentum=None, the cumulative average, reaches it as 1 / num_batches_tracked)")
    _check_real("eps", eps, "pass a float such as 1e-5")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1] (got {momentum}); PyTorch's convention "
                         "is used: 0.1 here equals 0.9 in Keras (m_torch = 1 - m_keras)")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0 (got {eps}); the usual value is 1e-5")
