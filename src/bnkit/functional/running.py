"""Running-statistic update, in place, PyTorch's convention, and its one owner.

`record_step` is the single place where a successful training call with running buffers
leaves its trace: the batch statistics blended into running_mean/running_var and the
layer's step counter (num_batches_tracked) advanced by one. Every layer of the family
(BatchNorm*, BatchNormAct, Ghost, Renorm, Recurrent, Sync, InPlaceABN) and every
functional entry point goes through it; no other module writes a running buffer or a
step counter.

    running = (1 - momentum) * running + momentum * batch      (momentum 0.1 = Keras's 0.9)
running_var receives the unbiased batch variance var * n / (n - 1). Modules turn
`momentum=None` into the cumulative average by passing momentum = 1 / num_batches_tracked.

Unlike torch, a channel whose batch statistics are not finite (NaN or Inf in its input)
keeps its running statistics, and a RuntimeWarning says so, once per running buffer
(`warn_nonfinite`); one bad batch would otherwise poison them for good, silently. Every
path applies this rule: here, and in the cpu backend's in-kernel blend
(`blend_running` in src/bnkit/csrc/running.cpp, which the C++ node runs too).
num_batches_tracked still advances, as torch counts every training call.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from .checks import check_writable_one


def record_step(running_mean, running_var, mean, var, count, momentum, counter,
                blended: bool = False) -> None:
    """What a successful training call with running buffers leaves behind, in one place.

    Blends the batch statistics (mean, biased var: (C,); count: positions per channel) into
    running_mean/running_var (`update_running`) unless `blended` says a kernel already did,
    in this module's arithmetic (the C++ backend blends inside its statistics pass; pass
    None statistics then), and advances `counter` (the layer's num_batches_tracked or one
    row of it, an int64 tensor; or None) by one. Call it after the output exists, so a
    failed call changes nothing. Without running buffers only the counter moves.
    """
    if running_mean is not None and not blended:
        update_running(running_mean, running_var, mean, var, count, momentum)
    if counter is not None:
        advance(counter)


def advance(counter) -> None:
    """counter + 1 in place (`record_step`); under torch.func transforms below their
    levels, like the buffers' blend (only jvp gets this far: vmap and grad refuse the blend
    first)."""
    if _transformed():
        with torch._C._DisableFuncTorch():
            counter.add_(1)
    else:
        counter.add_(1)


def update_running(running_mean, running_var, mean, var, count, momentum):
    """Blend batch statistics (mean, biased var, count) into the running buffers in place.

    Computed in float64 (the statistics' dtype for float32/float64 input; float32 for half
    input) as `r * (1 - momentum) + stat * w` (two products, one sum, each rounded) and
    rounded once into the buffer's dtype: the arithmetic of the cpu
    backend's in-kernel blend (src/bnkit/csrc/running.cpp), so eager runs on either backend
    and compiled graphs agree bit for bit. Tensors that carry autograd history are blended
    under no_grad (a context costs ~10 us, so it is entered only then). Channels whose batch
    statistics are not finite keep their running statistics (`warn_nonfinite`); buffers the
    update cannot write in place raise before the first write (`checks.check_writable_one`).
    """
    tracked = (t is not None and t.requires_grad for t in (mean, var, running_mean, running_var))
    if torch.is_grad_enabled() and any(tracked):
        with torch.no_grad():
            return _blend(running_mean, running_var, mean, var, count, momentum)
    return _blend(running_mean, running_var, mean, var, count, momentum)


def _blend(running_mean, running_var, mean, var, count, momentum):
    if not torch.compiler.is_compiling():  # before the first write: a failure leaves both
        for name, v in (("running_mean", running_mean), ("running_var", running_var)):
            if v is not None:
                check_writable_one(name, v)
    keep = 1 - momentum
    ok = _finite_channels(mean, var)
    if running_mean is not None:
        running_mean.copy_(_keep_bad(_mix(running_mean, keep, mean, momentum), running_mean,
                                     ok))
    if running_var is None:
        return _warn_if_bad(running_mean, mean, var, ok)
    n = _host_count(count)
    if n is None:  # a traced or device count: stay in tensor ops (no sync, no graph break)
        nt = count.to(torch.float64)
        factor = momentum * (nt / (nt - 1))
    else:  # n / (n - 1) folded into the scalar factor
        factor = momentum * (n / (n - 1))
    running_var.copy_(_keep_bad(_mix(running_var, keep, var, factor), running_var, ok))
    _warn_if_bad(running_mean if running_mean is not None else running_var, mean, var, ok)


def _finite_channels(mean, var):
    """None when every channel's statistics are finite (the common case: one check on the
    (C,) sum, no per-channel mask), else the (C,) mask of finite channels. While tracing,
    under a torch.func transform, or off the CPU, the mask always (no host sync)."""
    both = mean + var  # non-finite where either is (inf - inf is nan)
    if torch.compiler.is_compiling() or not both.is_cpu or _transformed():
        return torch.isfinite(both)
    if bool(torch.isfinite(both.sum())):
        return None
    return torch.isfinite(mean) & torch.isfinite(var)


# vmap / jvp: a Python bool of a batched tensor is data-dependent control flow (refused)
_transformed = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _keep_bad(new, running, ok):
    """new, with the running value kept where the channel's statistics are not finite."""
    return new if ok is None else torch.where(ok, new, running.to(new.dtype))


def _warn_if_bad(running, mean, var, ok) -> None:
    if ok is not None and not torch.compiler.is_compiling() and ok.is_cpu and \
            not _transformed() and not bool(ok.all()):
        warn_nonfinite(running, mean, var)


def warn_nonfinite(running, mean, var) -> None:
    """RuntimeWarning, once per running buffer: the channels whose batch statistics (mean,
    var: (C,)) are not finite kept their running statistics. `running` is the layer's
    running_mean (a row of a larger buffer counts as that buffer)."""
    owner = running if running._base is None else running._base
    if getattr(owner, "_bnkit_nonfinite_warned", False):
        return
    bad = (~(torch.isfinite(mean) & torch.isfinite(var))).nonzero().flatten().tolist()
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    warnings.warn(f"batch statistics of channel(s) {shown} ({len(bad)} of {mean.numel()}) "
                  "are not finite (NaN or Inf in the input); their running_mean/running_var "
                  f"(shape {tuple(owner.shape)}) were left unchanged instead of being "
                  "poisoned, and this batch's outputs for them are not finite. Find the "
                  "source of the NaN/Inf (inputs, a diverging learning rate; "
                  "torch.autograd.set_detect_anomaly helps) or mask it out. Warned once per "
                  "layer.", RuntimeWarning, stacklevel=_user_stacklevel())
    owner._bnkit_nonfinite_warned = True


_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.sep + "torch" + os.sep


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside bnkit and torch (its module-call and
    autograd.Function machinery), so the warning points at the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PKG)
                                 or _TORCH in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


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
