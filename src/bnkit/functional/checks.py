"""Input validation for the core. Every error names the rule, the value received and the fix.

All checks run before any state is touched, so a failed call leaves running statistics
and parameters exactly as they were. The exception classes live in `bnkit.errors`: each
also derives from the built-in exception torch raises for the same mistake.
"""
from __future__ import annotations

import operator

import torch

from ..errors import (
    BNDeviceError,
    BNDTypeError,
    BNShapeError,
    BNStateError,
    BNTypeError,
    BNValueError,
)
from .activation import ACTIVATIONS, check_act


def normalize_axis(axis, ndim: int) -> int:
    """Map a possibly negative channel axis (an int) into [0, ndim)."""
    if type(axis) is not int:
        axis = _index("axis", axis, "pass the channel dimension as an int, e.g. axis=1")
    if not -ndim <= axis < ndim:
        raise BNValueError(f"axis must index a dimension of the input: expected -{ndim} <= "
                           f"axis < {ndim} for a {ndim}D input (got axis={axis}); pass the "
                           "position of the channel dimension, e.g. axis=1 for (N, C, ...) or "
                           "axis=-1 for channels-last")
    return axis % ndim


def _index(name, v, fix) -> int:
    """v as a Python int (numpy integers too; not bool, float or str)."""
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise BNTypeError(f"{name} must be an int (got {v!r} of type {type(v).__name__}); "
                          f"{fix}") from None


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise BNTypeError(f"batch_norm expects a torch.Tensor input (got {type(x).__name__}); "
                          "convert it with torch.as_tensor(x, dtype=torch.float32)")
    if not x.is_floating_point():
        raise BNDTypeError(f"batch_norm expects a floating-point input (got dtype {x.dtype}); "
                           "convert it first, e.g. x.float()")
    if x.dim() < 2:
        raise BNValueError(f"batch_norm expects at least 2D input (N, C, ...) (got {x.dim()}D "
                           f"input of shape {tuple(x.shape)}); add a batch dimension with "
                           "x.unsqueeze(0) or a channel dimension with x.unsqueeze(1)")


def check_channel_vector(name, v, x, axis) -> None:
    """A per-channel tensor must be (C,) and live on the input's device."""
    if v is None:
        return
    c = x.shape[axis]
    try:  # no isinstance here: Tensor's instance check costs ~0.2 us a call
        if v.dim() == 1 and v.shape[0] == c and v.is_floating_point() and (
                v.is_cpu and x.is_cpu or v.device == x.device):
            return  # the common case in a few attribute reads; the rest explains a failure
    except AttributeError:  # not a tensor: explained below
        pass
    if not isinstance(v, torch.Tensor):
        raise BNTypeError(f"{name} must be a torch.Tensor of shape ({c},) or None (got "
                          f"{type(v).__name__}); convert it with torch.as_tensor({name}, "
                          f"dtype=x.dtype)")
    if tuple(v.shape) != (c,):
        raise BNShapeError(f"{name} must hold one value per channel: expected shape ({c},) "
                           f"for input of shape {tuple(x.shape)} with channels on axis {axis} "
                           f"(got {tuple(v.shape)}); make num_features match the input's "
                           "channel dimension, or pass the right axis")
    if v.device != x.device:
        raise BNDeviceError(f"{name} is on {v.device} but the input is on {x.device}: all "
                            f"tensors must share one device; move them with "
                            f".to({str(x.device)!r})")
    if not v.is_floating_point():
        raise BNDTypeError(f"{name} must be floating point (got dtype {v.dtype}); use "
                           ".float()")


def check_mask(mask, x, axis) -> None:
    """A mask is boolean, broadcastable to the input without its channel dim, and not empty."""
    if not isinstance(mask, torch.Tensor):
        raise BNTypeError(f"mask must be a boolean torch.Tensor or None (got "
                          f"{type(mask).__name__}); build it with a comparison, e.g. "
                          "lengths[:, None] > torch.arange(L)")
    if mask.dtype != torch.bool:
        raise BNDTypeError(f"mask must be a boolean tensor, True at valid positions (got dtype "
                           f"{mask.dtype}); build it with a comparison, e.g. lengths[:, None] > "
                           "torch.arange(L)")
    if mask.device != x.device:
        raise BNDeviceError(f"mask is on {mask.device} but the input is on {x.device}; move it "
                            f"with mask.to({str(x.device)!r})")
    target = tuple(s for d, s in enumerate(x.shape) if d != axis)
    ok = mask.dim() == len(target) and all(m in (1, t) for m, t in zip(mask.shape, target))
    if not ok:
        raise BNShapeError(f"mask must cover the input's non-channel dimensions: expected a "
                           f"shape broadcastable to {target} (input {tuple(x.shape)} without "
                           f"axis {axis}) (got {tuple(mask.shape)}); for (N, C, L) input pass "
                           "an (N, L) mask")


def check_enough_values(count: int, x, training: bool, masked: bool) -> None:
    """Training needs more than one value per channel: the unbiased variance divides by n-1."""
    if not training or count > 1:
        return
    what = "valid (unmasked) values" if masked else "values"
    raise BNValueError(f"expected more than 1 value per channel when training (got {count} "
                       f"{what} per channel, input shape {tuple(x.shape)}); use a batch of at "
                       "least 2, fewer masked positions, or call model.eval()")


def check_running(running_mean, running_var, training: bool) -> None:
    """Given together, present in eval, not requiring grad. Whether the update can write
    them in place is checked before the update runs (`check_writable`)."""
    if (running_mean is None) != (running_var is None):
        raise BNValueError("running_mean and running_var must be given together (got only "
                           f"{'running_mean' if running_var is None else 'running_var'}); "
                           "pass both or neither")
    if running_mean is None:
        if not training:
            raise BNStateError("training=False normalizes with running statistics, but "
                               "running_mean/running_var are None; pass them, or use "
                               "training=True to normalize with batch statistics")
        return
    if not (running_mean.requires_grad or running_var.requires_grad):
        return
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v.requires_grad:
            raise BNStateError(f"{name} must not require grad (got requires_grad=True): the "
                               "running statistics are state, not parameters; register them "
                               "with register_buffer, or call "
                               f"{name}.requires_grad_(False)")


def check_writable(running_mean, running_var) -> None:
    """Both buffers can be updated in place (`check_writable_one`); run before the first
    write of a call, so a failure leaves both as they were."""
    if running_mean.is_contiguous() and running_var.is_contiguous() and not (
            running_mean.is_inference() or running_var.is_inference()):
        return  # the common case in four attribute reads; the rest explains a failure
    check_writable_one("running_mean", running_mean)
    check_writable_one("running_var", running_var)


def check_writable_one(name, v) -> None:
    """The running-stat update writes v in place: not an expanded view, not an inference
    tensor outside inference_mode. Run before the first write of a call."""
    if not v.is_contiguous() and any(s == 0 and n > 1 for s, n in zip(v.stride(), v.shape)):
        raise BNStateError(f"{name} cannot be updated in place: it is an expanded view "
                           f"(shape {tuple(v.shape)}, stride {v.stride()}) whose elements "
                           f"share memory; pass a tensor of its own, e.g. {name}.clone()")
    if v.is_inference() and not torch.is_inference_mode_enabled():
        raise BNStateError(f"{name} was created under torch.inference_mode() and cannot be "
                           "updated outside it (Inference tensors cannot be updated in place); "
                           f"create the layer or buffers outside inference_mode, or pass "
                           f"{name}.clone(), or call model.eval()")


def _check_real(name, v, fix) -> None:
    """A Python/NumPy number or a 0-d tensor; float(v) must work (None and str do not)."""
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError
        float(v)
    except (TypeError, ValueError, RuntimeError):
        raise BNTypeError(f"{name} must be a real number (got {v!r}); {fix}") from None


def check_scalars(momentum, eps, training=False) -> None:
    """momentum in [0, 1] and eps >= 0, real numbers (checked in eval too: one answer on
    every path), and training a bool."""
    if type(momentum) is float and type(eps) is float and 0.0 <= momentum <= 1.0 and \
            eps >= 0 and type(training) is bool:
        return  # the common case; the rest explains a failure
    if type(training) is not bool:
        raise BNTypeError(f"training must be a bool (got {training!r} of type "
                          f"{type(training).__name__}); pass True to normalize with batch "
                          "statistics, False to use the running statistics")
    _check_real("momentum", momentum, "the functional form takes a float (a module's "
                "momentum=None, the cumulative average, reaches it as 1 / num_batches_tracked)")
    _check_real("eps", eps, "pass a float such as 1e-5")
    if not 0.0 <= float(momentum) <= 1.0:
        raise BNValueError(f"momentum must lie in [0, 1] (got {momentum}); PyTorch's "
                           "convention is used: 0.1 here equals 0.9 in Keras "
                           "(m_torch = 1 - m_keras)")
    if not float(eps) >= 0.0:
        raise BNValueError(f"eps must be >= 0 (got {eps}); the usual value is 1e-5")


def validate_call(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                  mask, act) -> int:
    """Every check of one core call, before anything is touched; returns the channel axis
    normalized to [0, x.dim()). Layers that run the core's pieces themselves (ghost, renorm,
    sync) call it first, so their errors are the core's."""
    fast = _plainly_valid(x, running_mean, running_var, weight, bias, training, momentum, eps,
                          axis, mask, act)
    if fast is not None:
        return fast
    check_input(x)
    axis = normalize_axis(axis, x.dim())
    for name, v in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_channel_vector(name, v, x, axis)
    check_scalars(momentum, eps, training)
    check_running(running_mean, running_var, training)
    if mask is not None:
        check_mask(mask, x, axis)
    check_act(act)
    return axis


_TENSORS = (torch.Tensor, torch.nn.Parameter)
_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _plainly_valid(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                   mask, act):
    """The normalized axis when the call is plainly valid, else None. Each condition is one
    that the full checks of `validate_call` also require, on plain tensors and Python
    numbers only, read with the fewest attribute lookups (a layer call's validation is a
    visible share of a small layer's time); None only means the full checks run and
    explain whatever is wrong."""
    if (type(x) not in _TENSORS or mask is not None or type(axis) is not int
            or type(act) is not str or act not in ACTIVATIONS or type(training) is not bool
            or type(momentum) is not float or type(eps) is not float
            or not (0.0 <= momentum <= 1.0 and eps >= 0.0) or x.dtype not in _FLOATS):
        return None
    shape = x.shape
    nd = len(shape)
    if nd < 2 or not -nd <= axis < nd:
        return None
    axis %= nd
    channels = shape[axis:axis + 1]  # torch.Size([C])
    cpu = x.is_cpu
    for v in (running_mean, running_var, weight, bias):
        if v is not None and not (type(v) in _TENSORS and v.shape == channels
                                  and v.dtype in _FLOATS
                                  and (v.is_cpu if cpu else v.device == x.device)):
            return None
    if running_mean is None or running_var is None:
        return axis if running_mean is None and running_var is None and training else None
    return None if running_mean.requires_grad or running_var.requires_grad else axis
