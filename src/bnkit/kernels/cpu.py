"""The 'cpu' backend: numba kernels for dense float32/float64 CPU tensors.

Same primitives and results as the reference backend (statistics in float64, two-pass per
cache-sized chunk merged with Chan's formula; y = (x - mean_hi) * scale + shift with the
core's `affine_coeffs`), running in parallel over channels and chunks of the batch on
torch.get_num_threads() threads. Inputs it does not accelerate (masks in the statistics and
the elementwise backward, activations other than identity/relu, non-dense layouts, a dy laid
out unlike x) run on the reference primitives inside the same call, so any input gets the
right answer. `fused_backward` runs the whole backward in one call (the core's backward op
uses it when a backend has one): per channel, the sums and then dx while the channel is
still in cache. On one thread (small inputs, or torch.set_num_threads(1)) `fused_forward`
and `fused_backward_op` run the whole forward / backward op (statistics, coefficients,
output; sums, dx, dweight, dbias) in one serial call each: at (60, 100) the torch ops
around the kernels, not the arithmetic, are the cost. The first call of each kernel compiles it (or loads numba's on-disk cache);
`warmup()` does all of them at once and `status()` says which applies.

Example:
    >>> import torch, bnkit
    >>> from bnkit.kernels import cpu
    >>> x = torch.randn(8, 4, 5, 5)
    >>> count, mean, var = cpu.batch_stats(x, 1)
    >>> torch.allclose(mean, x.double().mean((0, 2, 3)))
    True
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch

from ..functional.backward import elemt_coeffs
from ..functional.normalize import affine_coeffs
from ..functional.stats import Stats
from . import cpu_layout as L
from . import cpu_numba as K
from . import reference
from .cpu_cache import cache_report

NAME = "cpu"
__all__ = ["NAME", "act_backward", "available", "backward_elemt", "backward_reduce",
           "batch_stats", "fused_backward", "fused_backward_op", "fused_forward", "normalize", "status", "supports",
           "warmup"]

MIN_NUMEL = 4096  # below this `supports()` says no: both paths cost the same (bench)
PARALLEL_MIN = 32768  # below this the kernels run on one thread (no wake-up cost)
FUSE_BYTES = 8 << 20  # a channel's dy + x up to this stays cached for fused_backward
_DTYPES = (torch.float32, torch.float64)
_FAST_ACTS = ("identity", "relu")
_local = threading.local()
_NO_PARAM = {dt: torch.empty(1, dtype=dt).numpy() for dt in _DTYPES}  # stands in for None


def available() -> bool:
    """True: importing this module needs numba, so reaching here means it is installed."""
    return True


def supports(x, axis, mask) -> bool:
    """Dense float32/float64 CPU input with at least MIN_NUMEL values (any mask, any act)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() >= MIN_NUMEL
            and L.resolve(x, axis) is not None)


def status() -> str:
    """One line: numba version, threads, and whether the first call will compile."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    return f"numba {numba.__version__}, {threads} threads, {cache_report(_KERNELS)}"


def _fast(x, axis):
    """x's layout when the kernels take it, else None (the caller uses the reference)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() == 0:
        return None
    return L.resolve(x, axis)


def _threads(numel: int) -> int:
    """Use torch's thread count (one thread for small inputs); returns it. numba's setting
    is per calling thread, so the last value set is remembered per thread."""
    want = torch.get_num_threads()
    n = 1 if numel < PARALLEL_MIN else min(want, numba.config.NUMBA_NUM_THREADS)
    if getattr(_local, "threads", None) != n:
        numba.set_num_threads(n)
        _local.threads = n
        if torch.get_num_threads() != want:  # numba's OpenMP layer, starting, resets the
            torch.set_num_threads(want)  # process-wide count torch reads: put it back
    return n


def _vec(t, dtype):
    """(C,) tensor as a contiguous numpy array of `dtype` (no copy when already so)."""
    t = t.detach() if t.dtype == dtype else t.detach().to(dtype)
    return t.numpy() if t.is_contiguous() else t.contiguous().numpy()


def batch_stats(x, axis=1, mask=None) -> Stats:
    """Stats(count, mean, var) per channel, float64; see `bnkit.functional.batch_stats`."""
    lay = _fast(x, axis)
    if lay is None or mask is not None:
        return reference.batch_stats(x, axis, mask)
    kind, outer, c, inner = lay
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    t = _threads(x.numel())
    if kind == "cf":
        split = L.cf_split(outer, c, inner, t)
        K.cf_stats(L.flat(x), outer, c, inner, *split, mean.numpy(), var.numpy())
    else:
        K.cl_stats(L.flat(x), outer, c, L.cl_rows(outer, c, t), mean.numpy(), var.numpy())
    return Stats(torch.scalar_tensor(x.numel() // c, dtype=torch.float64), mean, var)


def normalize(x, mean, invstd, weight=None, bias=None, axis=1, act="identity"):
    """y = act((x - mean_hi) * scale + shift); see `bnkit.functional.normalize`."""
    lay = _fast(x, axis)
    if lay is None or act not in _FAST_ACTS:
        return reference.normalize(x, mean, invstd, weight, bias, axis, act)
    coeffs = [_vec(v, x.dtype) for v in affine_coeffs(mean, invstd, weight, bias, x.dtype)]
    y = L.empty_like(x)
    kind, outer, c, inner = lay
    t = _threads(x.numel())
    if kind == "cf":
        K.cf_normalize(L.flat(x), L.flat(y), c, inner, L.BLOCK, *coeffs, act == "relu")
    else:
        rows = max(1, L.BLOCK // c) if t > 1 else outer
        K.cl_normalize(L.flat(x), L.flat(y), outer, c, rows, *coeffs, act == "relu")
    return y


def backward_reduce(dy, x, mean, axis=1):
    """(sum_dy, sum_dy_xmu) per channel, float64; see `bnkit.functional.backward_reduce`."""
    lay = _fast(x, axis)
    if lay is None or not L.same_layout(x, dy):
        return reference.backward_reduce(dy, x, mean, axis)
    kind, outer, c, inner = lay
    sums = torch.empty(2, c, dtype=torch.float64)
    s_dy, s_dyx = sums.numpy()
    m = _vec(mean, torch.float64)
    t = _threads(x.numel())
    if kind == "cf":
        split = L.cf_split(outer, c, inner, t)
        K.cf_dy_sums(L.flat(dy), L.flat(x), m, outer, c, inner, *split, s_dy, s_dyx)
    else:
        K.cl_dy_sums(L.flat(dy), L.flat(x), m, outer, c, L.cl_rows(outer, c, t), s_dy, s_dyx)
    return sums[0], sums[1]


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis=1, mask=None,
                   training=True):
    """dx = a dy + k (x - mean_hi) + c with the core's `elemt_coeffs`; see
    `bnkit.functional.backward_elemt`."""
    lay = _fast(x, axis)
    if lay is None or mask is not None or not L.same_layout(x, dy):
        return reference.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                                        axis, mask, training)
    coeffs = [_vec(v, x.dtype) for v in elemt_coeffs(mean, invstd, weight, sum_dy, sum_dy_xmu,
                                                      count, x.dtype, training)]
    dx = L.empty_like(dy)
    kind, outer, c, inner = lay
    t = _threads(x.numel())
    if kind == "cf":
        K.cf_elemt(L.flat(dy), L.flat(x), L.flat(dx), c, inner, L.BLOCK, *coeffs, training)
    else:
        rows = max(1, L.BLOCK // c) if t > 1 else outer
        K.cl_elemt(L.flat(dy), L.flat(x), L.flat(dx), outer, c, rows, *coeffs, training)
    return dx


def _param(t, x):
    """(numpy view, present) of an optional (C,) weight or bias, float32/float64 kept as is
    (the kernels widen it to float64 exactly as `affine_coeffs` does)."""
    if t is None:
        return _NO_PARAM[x.dtype], False
    return _vec(t, t.dtype if t.dtype in _DTYPES else torch.float64), True


def _small(lay, x) -> bool:
    """One serial call covers the input: a fast layout on one thread."""
    return lay is not None and _threads(x.numel()) == 1


def fused_forward(x, weight, bias, running_mean, running_var, mask, training, eps, axis=1,
                  act="identity"):
    """The forward op in one serial kernel -> (y, mean, var, count), the core's results
    (float64 two-pass corrected statistics, `affine_coeffs`' coefficients), or None when the
    input needs the primitives (a mask, an activation, many threads, a layout the kernels do
    not take; activations keep the primitives' path, as the backward does)."""
    lay = _fast(x, axis)
    if mask is not None or act != "identity" or not _small(lay, x):
        return None
    _, outer, c, inner = lay
    f64 = torch.float64
    if training:  # numpy allocates ~5x faster than torch at this size
        m, v, n = np.empty(c), np.empty(c), float(outer * inner)
    else:  # copies: the outputs must not alias the buffers
        m, v, n = _vec(running_mean, f64).copy(), _vec(running_var, f64).copy(), 0.0
    y = L.empty_like(x)
    (w, has_w), (b, has_b) = _param(weight, x), _param(bias, x)
    K.small_fwd(L.flat(x), L.flat(y), outer, c, inner, w, b, has_w, has_b, float(eps),
                bool(training), False, m, v)
    return y, torch.from_numpy(m), torch.from_numpy(v), torch.from_numpy(np.array(n))


def _small_backward(lay, dy, x, mean, invstd, weight, count, training, dw=None, db=None,
                    eps=None):
    """-> (dx, sum_dy, sum_dy_xmu) from one serial kernel (identity activation, no mask),
    also filling the numpy arrays dw, db with dweight, dbias when given. With an eps,
    `invstd` holds var instead (the kernel takes 1/sqrt(var + eps))."""
    _, outer, c, inner = lay
    f64 = torch.float64
    s_dy, s_dyx = np.empty(c), np.empty(c)
    dx = L.empty_like(dy)
    w, has_w = _param(weight, x)
    none = _NO_PARAM[torch.float64][:0]
    K.small_bwd(L.flat(dy), L.flat(x), L.flat(dx), outer, c, inner, _vec(mean, f64),
                _vec(invstd, f64), eps is not None, float(eps or 0.0), w, has_w, float(count), bool(training), s_dy, s_dyx,
                none if dw is None else dw, none if db is None else db)
    return dx, torch.from_numpy(s_dy), torch.from_numpy(s_dyx)


def fused_backward_op(dy, x, weight, bias, mean, var, count, mask, training, eps, axis=1,
                      act="identity"):
    """The backward op in one serial kernel -> (dx, dweight, dbias), or None when the input
    needs `fused_backward` (a mask, an activation, many threads, a layout the kernels do
    not take). dweight, dbias have the parameters' dtype (x's without weight)."""
    lay = _fast(x, axis)
    if mask is not None or act != "identity" or not _small(lay, x) or dy.shape != x.shape:
        return None
    pdt = weight.dtype if weight is not None else x.dtype
    if pdt not in _DTYPES:
        return None
    if not L.same_layout(x, dy):  # e.g. the expanded dy of y.sum(): a small copy
        dy = torch.empty_like(x).copy_(dy)
    dw, db = (np.empty(lay[2], dtype=_NO_PARAM[pdt].dtype) for _ in range(2))
    dx, _, _ = _small_backward(lay, dy, x, mean, var, weight, count, training, dw, db, eps)
    return dx, torch.from_numpy(dw), torch.from_numpy(db)


def fused_backward(dy, x, mean, invstd, weight, bias, count, axis=1, mask=None, training=True,
                   act="identity"):
    """act_backward, backward_reduce and backward_elemt in one call -> (dx, sum_dy, sum_dy_xmu).

    Training with the identity activation on an (outer, C, inner) layout with enough channels
    for the threads: one task per channel reads dy and x from memory for the sums and again
    from cache for dx (3 x-sized passes over memory instead of 5). Anything else: this
    backend's three primitives in turn, as the core's backward op runs them.
    """
    lay = _fast(x, axis)
    if mask is None and act == "identity" and _small(lay, x) and dy.shape == x.shape:
        if not L.same_layout(x, dy):  # e.g. the expanded dy of y.sum(): a small copy
            dy = torch.empty_like(x).copy_(dy)
        return _small_backward(lay, dy, x, mean, invstd, weight, count, training)
    if not _fusable(lay, dy, x, mask, training, act):
        if act != "identity":
            dy = act_backward(dy, x, mean, invstd, weight, bias, axis, act)
        sum_dy, sum_dy_xmu = backward_reduce(dy, x, mean, axis)
        return (backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis,
                               mask, training), sum_dy, sum_dy_xmu)
    return _cf_fused_backward(lay, dy, x, mean, invstd, weight, count)


def _cf_fused_backward(lay, dy, x, mean, invstd, weight, count):
    """-> (dx, sum_dy, sum_dy_xmu) from cf_fused_bwd, one task per channel (training)."""
    _, outer, c, inner = lay
    f64 = torch.float64
    w = _vec(weight, f64) if weight is not None else torch.ones(c, dtype=f64).numpy()
    sums = torch.empty(2, c, dtype=f64)
    dx = L.empty_like(dy)
    K.cf_fused_bwd(L.flat(dy), L.flat(x), L.flat(dx), outer, c, inner, _vec(mean, f64),
                   _vec(invstd, f64), w, float(count), *sums.numpy())
    return dx, sums[0], sums[1]


def _fusable(lay, dy, x, mask, training, act) -> bool:
    """One task per channel pays when the channels balance over the threads and a channel's
    dy and x (FUSE_BYTES at most) stay in the last-level cache between the two passes."""
    if (lay is None or lay[0] != "cf" or mask is not None or not training
            or act != "identity" or not L.same_layout(x, dy)):
        return False
    _, outer, c, inner = lay
    t = _threads(x.numel())
    return (c % t == 0 or c >= 8 * t) and 2 * outer * inner * x.element_size() <= FUSE_BYTES


def act_backward(dy, x, mean, invstd, weight, bias, axis=1, act="identity"):
    """dz = dy * f'(z), z = BN(x) recomputed; see `bnkit.functional.act_backward`."""
    if act == "identity":
        return dy
    if act != "relu" or _fast(x, axis) is None or not L.same_layout(x, dy):
        return reference.act_backward(dy, x, mean, invstd, weight, bias, axis, act)
    z = normalize(x, mean, invstd, weight, bias, axis)
    return z.gt_(0).mul_(dy)  # dy * relu'(z), relu'(z) = (z > 0) as 1.0 / 0.0


def warmup() -> str:
    """Compile (or load from numba's cache) every kernel for float32 and float64, both
    layouts; returns `status()`. Takes ~1 min cold, well under a second warm."""
    for dtype in _DTYPES:
        for x, axis in ((torch.randn(3, 2, 5, dtype=dtype), 1),
                        (torch.randn(5, 3, dtype=dtype), 1)):
            count, mean, var = batch_stats(x, axis)
            invstd = torch.rsqrt(var + 1e-5)
            w = torch.ones(x.shape[axis], dtype=dtype)
            normalize(x, mean, invstd, w, w, axis)
            sums = backward_reduce(x, x, mean, axis)
            backward_elemt(x, x, mean, invstd, w, *sums, count, axis)
            fused_backward(x, x, mean, invstd, w, w, count, axis)
            fused_forward(x, w, w, None, None, None, True, 1e-5, axis)
            if x.dim() == 3:  # small inputs take small_bwd inside fused_backward
                _cf_fused_backward(L.resolve(x, axis), x, x, mean, invstd, w, count)
    return status()


_KERNELS = (K.cf_stats, K.cl_stats, K.cf_dy_sums, K.cl_dy_sums, K.cf_normalize,
            K.cl_normalize, K.cf_elemt, K.cl_elemt, K.cf_fused_bwd, K.small_fwd, K.small_bwd)
