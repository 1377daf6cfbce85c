"""Lowering for deployment: batch norm as standard torch ops while a model is being exported.

The core runs as bnkit's own ops (the native node, the `bnkit::batch_norm_fwd` custom op,
C++ or Triton kernels), which a deployed model cannot carry: ONNX has no function for
them, a TorchScript or `.pt2` file that names them fails to load where bnkit is not
installed, and `torch.jit.trace` cannot see into the kernels at all. So while
`torch.export` (also under `torch.onnx.export`, whose default exporter uses it) or
`torch.jit.trace` (also under the legacy `torch.onnx.export(..., dynamo=False)`) records
the model, the core lowers each call to `lowered_batch_norm`: torch's
`batch_norm` for channels at dim 1, otherwise the per-channel formula
(x - mean) * rsqrt(var + eps) * weight + bias in the input's dtype. `torch.jit.script` uses
the same function through the layers' `__prepare_scriptable__` (`bnkit.nn.export`).

What lowers: every eval-mode call (the running statistics; a mask is irrelevant there), and
training-mode calls that only use batch statistics (no running buffers to update, no mask).
A training call that updates running buffers or takes a mask stays the custom op under
`torch.export` (a program that needs bnkit to run) and is refused under `torch.jit.trace`,
which would silently record a graph without the kernels.

Numerics: the lowered ops compute in the input's dtype as torch's BN does, where the core
accumulates in float64; outputs agree to float32 rounding (tests/test_deploy.py).

This file is written for TorchScript (no postponed annotations): `lowered_batch_norm` is
compiled into scripted modules and saved with them, so they load without bnkit.
"""

import torch
from torch import Tensor


def lowering() -> bool:
    """True while torch.export (strict or not, also under torch.onnx.export's default
    exporter) or torch.jit.trace (also under the legacy ONNX exporter) records the model."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def lowered_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                       weight: Tensor | None, bias: Tensor | None, eps: float,
                       axis: int) -> Tensor:
    """Batch norm in standard torch ops, channels at `axis` (negative counts from the end).

    With running statistics: eval-mode BN. Without them (None): the batch's biased
    statistics over every dimension but `axis`, as BN without running statistics.
    Returns a tensor of x's dtype; half and bfloat16 inputs compute in float32.
    """
    nd = x.dim()
    if axis < 0:
        axis = axis + nd
    if running_mean is not None and running_var is not None and axis == 1 \
            and _all_dtype(x.dtype, running_mean, running_var, weight, bias):
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                              False, 0.0, eps)
    cdt = x.dtype
    if cdt == torch.float16 or cdt == torch.bfloat16:
        cdt = torch.float32
    xc = x.to(cdt)
    shape: list[int] = [1] * nd
    shape[axis] = -1
    if running_mean is not None and running_var is not None:
        mean = running_mean.to(cdt).reshape(shape)
        var = running_var.to(cdt).reshape(shape)
    else:
        dims: list[int] = []
        for d in range(nd):
            if d != axis:
                dims.append(d)
        mean = xc.mean(dims, keepdim=True)
        var = (xc - mean).pow(2).mean(dims, keepdim=True)
    y = (xc - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(cdt).reshape(shape)
    if bias is not None:
        y = y + bias.to(cdt).reshape(shape)
    return y.to(x.dtype)


def _all_dtype(dtype: torch.dtype, running_mean: Tensor, running_var: Tensor,
               weight: Tensor | None, bias: Tensor | None) -> bool:
    """Every per-channel tensor has `dtype` (torch's batch_norm takes them as they are)."""
    if running_mean.dtype != dtype or running_var.dtype != dtype:
        return False
    if weight is not None and weight.dtype != dtype:
        return False
    return bias is None or bias.dtype == dtype


def lowered_call(x, running_mean, running_var, weight, bias, training, eps, axis, mask, act):
    """y of a core call recorded by an exporter, in standard torch ops; None where the call
    stays bnkit's custom op (torch.export of a training call that updates running buffers
    or takes a mask). Raises under torch.jit.trace for such a call. `axis` is normalized."""
    from .activation import apply_act

    if not training:
        return apply_act(lowered_batch_norm(x, running_mean, running_var, weight, bias, eps,
                                            axis), act)
    if running_mean is None and mask is None:  # batch statistics, nothing to update
        return apply_act(lowered_batch_norm(x, None, None, weight, bias, eps, axis), act)
    if torch.compiler.is_exporting():
        return None
    what = "a mask" if mask is not None else "running statistics to update"
    refuse_trace(f"a training-mode batch norm with {what} (got training=True with {what})")


def refuse_trace(what: str) -> None:
    """Raise the error for a training-mode call torch.jit.trace cannot record; `what` names
    the call and the value received."""
    raise RuntimeError(
        f"torch.jit.trace (also torch.onnx.export with dynamo=False, which traces) cannot "
        f"record {what}: bnkit's kernels are invisible to the tracer; call model.eval() "
        "before tracing or exporting, or use torch.export.export, which keeps bnkit's op for "
        "training")
