"""The 'cpu' backend: bnkit's compiled C++ kernels (`bnkit._C`) for dense float32/float64
CPU tensors.

A thin module over `torch.ops.bnkit_cpu.*` (sources in src/bnkit/csrc/, compiled when the
package is installed; nothing is compiled or cached at run time). It is available iff
`bnkit._C` imports; otherwise importing this module raises ImportError saying why (built
without it: BNKIT_BUILD_EXT=0, the build failed, or the import error), which
`bnkit info` shows, and bnkit runs on the reference backend.

Same primitives and results as the reference backend: statistics in float64 (float64
input: two passes per cache-sized chunk; float32: one pass of deviations from the first
value of each group of at most 4096 values; chunks and groups merged with Chan's formula),
y = (x - mean_hi) * scale + shift with the core's
`affine_coeffs`, dx with `elemt_coeffs`, on torch's threads (`at::parallel_for`; inputs
under 32768 values on the calling thread). Inputs the kernels do not take (masks in the
statistics and the elementwise backward, silu/gelu, non-dense layouts, a dy laid out
unlike x in `backward_elemt`) run on the reference primitives inside the same call.
`fused_forward` and `fused_backward_op` run the whole forward op (statistics,
coefficients, output, running-stat blend) and the whole backward op (relu's derivative,
sums, dweight, dbias, dx) in one C++ call each; an eager layer call runs as the C++
autograd node `bnkit_cpu::bn` (`bnkit.kernels.native`). `abn_forward`,
`abn_backward_reduce` and `abn_backward_elemt` are InPlaceABN's kernels
(`bnkit.functional.inplace_abn`): the forward written into x's storage, the backward from y.

Example:
    >>> import torch, bnkit
    >>> from bnkit.kernels import cpu
    >>> x = torch.randn(8, 4, 5, 5)
    >>> count, mean, var = cpu.batch_stats(x, 1)
    >>> torch.allclose(mean, x.double().mean((0, 2, 3)))
    True
"""
from __future__ import annotations

import torch

from ..functional.running import warn_nonfinite
from ..functional.stats import Stats
from . import cpu_layout as L
from . import reference
from .build_info import extension_error

try:
    from .. import _C  # noqa: F401 - loading it registers torch.ops.bnkit_cpu
except ImportError as _err:
    raise ImportError(extension_error(_err)) from _err

NAME = "cpu"
__all__ = ["NAME", "abn_backward_elemt", "abn_backward_reduce", "abn_forward", "act_backward",
           "available", "backward_elemt", "backward_reduce", "batch_stats", "fused_backward_op",
           "fused_forward", "normalize", "status", "supports"]

_DTYPES = (torch.float32, torch.float64)
_FAST_ACTS = ("identity", "relu")
_ops = torch.ops.bnkit_cpu


def available() -> bool:
    """True: importing this module needs bnkit._C, so reaching here means it is built."""
    return True


def supports(x, axis, mask) -> bool:
    """Dense non-empty float32/float64 CPU input (any mask, any act)."""
    return (x.is_cpu and x.dtype in _DTYPES and x.numel() > 0
            and L.resolve(x, axis) is not None)


def status() -> str:
    """One line for `bnkit info`: what runs and on how many threads."""
    return (f"C++ extension bnkit._C (torch {torch.__version__}), "
            f"{torch.get_num_threads()} threads, eager calls as one C++ autograd node")


def _fast(x, axis) -> bool:
    return x.is_cpu and x.dtype in _DTYPES and x.numel() > 0 and L.resolve(x, axis) is not None


def batch_stats(x, axis=1, mask=None) -> Stats:
    """Stats(count, mean, var) per channel, float64; see `bnkit.functional.batch_stats`."""
    if mask is not None or not _fast(x, axis):
        return reference.batch_stats(x, axis, mask)
    mean, var = _ops.batch_stats(x.detach(), axis)
    return Stats(torch.scalar_tensor(x.numel() // x.shape[axis], dtype=torch.float64), mean, var)


def normalize(x, mean, invstd, weight=None, bias=None, axis=1, act="identity"):
    """y = act((x - mean_hi) * scale + shift); see `bnkit.functional.normalize`."""
    if act not in _FAST_ACTS or not _fast(x, axis):
        return reference.normalize(x, mean, invstd, weight, bias, axis, act)
    return _ops.normalize(x, mean, invstd, weight, bias, axis, act == "relu")


def backward_reduce(dy, x, mean, axis=1):
    """(sum_dy, sum_dy_xmu) per channel, float64; see `bnkit.functional.backward_reduce`."""
    if not _fast(x, axis) or not L.same_layout(x, dy):
        return reference.backward_reduce(dy, x, mean, axis)
    return _ops.backward_reduce(dy, x, mean, axis)


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis=1, mask=None,
                   training=True):
    """dx = a dy + k (x - mean_hi) + c with the core's `elemt_coeffs`; see
    `bnkit.functional.backward_elemt`."""
    if mask is not None or not _fast(x, axis) or not L.same_layout(x, dy):
        return reference.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                                        axis, mask, training)
    return _ops.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, float(count),
                               axis, training)


def act_backward(dy, x, mean, invstd, weight, bias, axis=1, act="identity"):
    """dz = dy * f'(z), z = BN(x) recomputed; see `bnkit.functional.act_backward`."""
    if act == "identity":
        return dy
    if act != "relu" or not _fast(x, axis) or not L.same_layout(x, dy):
        return reference.act_backward(dy, x, mean, invstd, weight, bias, axis, act)
    return _ops.relu_backward(dy, x, mean, invstd, weight, bias, axis)


def _blendable(running_mean, running_var) -> bool:
    """The kernel can blend these buffers in place: dense float32/64 CPU, one dtype, not
    inference tensors (the core's update explains why it cannot otherwise)."""
    return all(t.is_cpu and t.dtype in _DTYPES and t.is_contiguous() and not t.is_inference()
               for t in (running_mean, running_var)) and running_mean.dtype == running_var.dtype


def fused_forward(x, weight, bias, running_mean, running_var, mask, training, eps, axis=1,
                  act="identity", momentum=None):
    """The forward op in one C++ call -> (y, mean, var, count), the core's results (float64
    corrected two-pass statistics, `affine_coeffs`' coefficients). With a `momentum`
    (training with running buffers) the buffers are blended too, as `update_running`
    would: channels with non-finite batch statistics keep theirs (`warn_nonfinite`). None
    when the input needs the primitives (a mask, silu/gelu, a layout the kernels do not
    take, eval without buffers, buffers that cannot be blended in place)."""
    if mask is not None or act not in _FAST_ACTS or not _fast(x, axis):
        return None
    if not training and running_mean is None:
        return None
    update = training and momentum is not None and running_mean is not None
    if update and not _blendable(running_mean, running_var):
        return None
    if not training and not all(t.is_cpu for t in (running_mean, running_var)):
        return None
    y, mean, var, skipped = _ops.forward(x.detach(), weight, bias,
                                         running_mean if update or not training else None,
                                         running_var if update or not training else None,
                                         training, float(eps), axis, act == "relu",
                                         float(momentum) if update else None)
    if skipped:  # channels with non-finite statistics kept their running statistics
        warn_nonfinite(running_mean, mean, var)
    n = x.numel() // x.shape[axis] if training else 0
    return y, mean, var, torch.scalar_tensor(n, dtype=torch.float64)


def fused_backward_op(dy, x, weight, bias, mean, var, count, mask, training, eps, axis=1,
                      act="identity"):
    """The backward op in one C++ call -> (dx, dweight, dbias), or None when the input needs
    the primitives (a mask, silu/gelu, a layout the kernels do not take). dweight, dbias
    have the parameters' dtype (x's without a weight)."""
    if mask is not None or act not in _FAST_ACTS or not _fast(x, axis) or dy.shape != x.shape:
        return None
    return _ops.backward(dy, x, weight, bias if act == "relu" else None, mean, var, float(count),
                         bool(training), float(eps), axis, act == "relu")


def abn_forward(x, out, weight, bias, running_mean, running_var, stats, training, eps, axis=1,
                act="leaky_relu", act_param=0.01, momentum=None):
    """InPlaceABN's forward in one C++ call: the statistics (the batch's in training, the
    running buffers' in eval, or `stats` = (mean, var) given), y = act(BN(x)) written into
    `out` (x itself for the in-place call, else a tensor laid out as x) and, with a
    `momentum`, the running buffers blended as `update_running` would (given statistics are
    not blended here). -> (mean, var, invstd, blended), float64 (C,) each; None to decline
    (a layout the kernels do not take, buffers elsewhere)."""
    if not _fast(x, axis) or not L.same_layout(x, out):
        return None
    if not training and stats is None and not all(t.is_cpu for t in (running_mean, running_var)):
        return None
    blend = (momentum is not None and stats is None and training
             and _blendable(running_mean, running_var))
    read = blend or (not training and stats is None)  # the kernel reads the buffers
    mean_in, var_in = (None, None) if stats is None else stats
    mean, var, invstd, skipped = _ops.abn_forward(
        x, out, weight, bias, running_mean if read else None, running_var if read else None,
        mean_in, var_in, bool(training), float(eps), axis, act, float(act_param),
        float(momentum) if blend else None)
    if skipped:  # channels with non-finite statistics kept their running statistics
        warn_nonfinite(running_mean, mean, var)
    return mean, var, invstd, blend


def _abn_ready(dy, y, axis):
    """dy in y's layout (a copy when it is not, e.g. the expanded gradient of y.sum()), or
    None when the kernels do not take y."""
    if not _fast(y, axis):
        return None
    return dy if L.same_layout(y, dy) else torch.empty_like(y).copy_(dy)


def abn_backward_reduce(dy, y, weight, bias, invstd, axis=1, act="leaky_relu", act_param=0.01):
    """(sum dz, sum dz (x - mu)), float64 (C,) each, with dz = dy act'(z) and x - mu
    recovered from y alone (`bnkit.functional.inplace_abn`); None to decline."""
    dy = _abn_ready(dy, y, axis)
    if dy is None:
        return None
    return _ops.abn_backward_reduce(dy, y, weight, bias, invstd, axis, act, float(act_param))


def abn_backward_elemt(dy, y, weight, bias, invstd, sum_dz, sum_dz_xmu, count, axis=1,
                       act="leaky_relu", act_param=0.01, training=True):
    """dx of InPlaceABN from y and dy and the (all-reduced) sums: w s (dz - sum_dz / n -
    (x - mu) s^2 sum_dz_xmu / n) in training, w s dz in eval; None to decline."""
    dy = _abn_ready(dy, y, axis)
    if dy is None:
        return None
    return _ops.abn_backward_elemt(dy, y, weight, bias, invstd, sum_dz, sum_dz_xmu,
                                   float(count), bool(training), axis, act, float(act_param))
