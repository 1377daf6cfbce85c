"""The GPU backend: Triton kernels for every primitive of the core.

Statistics: per-channel partial (count, mean, M2) over blocks of rows (float32 for float16,
bfloat16 and float32 input, float64 for float64), on data shifted by one sample value per
channel, then Chan's merge of the partials in float64 (`merge_many`); mean and var come back
in `acc_dtype(x.dtype)` like the reference's. Normalize, the activation's derivative and the
elementwise backward share one kernel; the backward reduce is a second reduction.
InPlaceABN's forward (`abn_forward`: statistics, then y = f(BN(x)) written into x's storage
or a new tensor) and backward from y alone (`abn_backward_reduce`, `abn_backward_elemt`)
have kernels of their own. Layouts: NCHW-contiguous (seen as (N, C, S)) and channels-last
(seen as (M, C)), see `triton_layout`. Masks are supported. docs/gpu.md gives the design and the accuracy.

The backend runs CUDA tensors. With TRITON_INTERPRET=1 set before Triton is imported, and
BNKIT_TRITON_ON_CPU=1, it also runs CPU tensors through Triton's interpreter (for tests:
slow); without the second flag the interpreter never takes over ordinary CPU runs.

Example:
    >>> import bnkit, torch
    >>> x = torch.randn(8, 4, 5, 5, device="cuda")           # doctest: +SKIP
    >>> bnkit.set_backend("triton")                          # doctest: +SKIP
    >>> y = bnkit.functional.batch_norm(x, training=True)    # doctest: +SKIP
"""
from __future__ import annotations

import os

import torch

from ..functional.activation import check_act
from ..functional.backward import elemt_coeffs
from ..functional.inplace_abn import inverse_coeffs
from ..functional.normalize import affine_coeffs, inv_std
from ..functional.stats import Stats, acc_dtype, compute_dtype, merge_many
from . import triton_layout as layout

try:
    import triton as _triton
except ImportError:  # the optional `gpu` extra is not installed
    _triton = None

NAME = "triton"
ON_CPU_ENV = "BNKIT_TRITON_ON_CPU"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
__all__ = ["NAME", "abn_backward_elemt", "abn_backward_reduce", "abn_forward", "act_backward",
           "available", "backward_elemt", "backward_reduce", "batch_stats", "fused_backward",
           "interpreting", "normalize", "status", "supports"]


def interpreting() -> bool:
    """Triton's interpreter is on now (TRITON_INTERPRET, read the way Triton reads it)."""
    if _triton is None:
        return False
    knobs = getattr(_triton, "knobs", None)  # Triton >= 3.3; older ones read the env var
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    """The jit kernels, imported on first use (the interpreter flag is read at that time)."""
    from . import triton_kernels
    return triton_kernels


def available() -> bool:
    """Triton imports and there is a device to run it: CUDA, or the interpreter."""
    return _triton is not None and (torch.cuda.is_available() or interpreting())


def _device_ok(x) -> bool:
    if x.device.type == "cuda":
        return torch.cuda.is_available() and not _kernels().INTERPRETED
    return (x.device.type == "cpu" and os.environ.get(ON_CPU_ENV) == "1" and interpreting()
            and _kernels().INTERPRETED)


def supports(x, axis, mask) -> bool:
    """CUDA tensors (and CPU ones under the interpreter with BNKIT_TRITON_ON_CPU=1) of
    float16/bfloat16/float32/float64, NCHW-contiguous or channels-last, any bool mask."""
    if not available() or x.dtype not in _DTYPES or x.numel() == 0 or x.dim() < 2:
        return False
    if mask is not None and mask.dtype != torch.bool:
        return False
    return _device_ok(x) and _geometry(x, axis) is not None


def status() -> str:
    """One line: why the backend is or is not used here."""
    if _triton is None:
        return "triton: not installed (pip install 'bnkit[gpu]')"
    where = f"triton {_triton.__version__}: "
    if torch.cuda.is_available() and not interpreting():
        return where + f"CUDA ({torch.cuda.get_device_name()})"
    if interpreting():
        cpu = ("on" if os.environ.get(ON_CPU_ENV) == "1" else
               f"off (set {ON_CPU_ENV}=1 to run CPU tensors)")
        return where + f"interpreter (TRITON_INTERPRET=1), CPU tensors {cpu}"
    return where + "unavailable (no CUDA device; TRITON_INTERPRET=1 runs the interpreter)"


def _geometry(x, axis):
    """The CF/CL view of x, or None (not a dense NCHW-like or channels-last tensor)."""
    if not layout.is_dense(x.shape, x.stride()):
        return None
    return layout.geometry(x.shape, x.stride(), axis % x.dim())


def _view(x, axis):
    g = _geometry(x, axis)
    if g is None:
        raise ValueError(f"the triton backend needs a dense NCHW-contiguous or channels-last "
                         f"tensor (got shape {tuple(x.shape)}, strides {x.stride()}, channel "
                         f"axis {axis}); call x.contiguous() first or use the reference backend")
    return g


def _like(t, x, axis):
    """t in x's memory layout: t itself when the kernels can share x's strides, else a copy
    (e.g. an expanded or differently laid out gradient)."""
    if _geometry(t, axis) == _geometry(x, axis):
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def _plan(g, x):
    """Tiles: large on a GPU; tiny under the interpreter so that small test tensors cross
    every tile, split and channel-block boundary."""
    if x.device.type != "cuda" or interpreting():
        return layout.plan(g, max_block_k=4, tile=8, target_programs=2 * g.channels)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return layout.plan(g, max_block_k=64 if g.channels_last else 1024, tile=4096,
                       target_programs=4 * sms)


def _flat_mask(mask, x, axis):
    """(numel / C,) uint8 mask in logical order over the non-channel dims."""
    if mask is None:
        return None
    if mask.dim() == x.dim() - 1:
        mask = mask.unsqueeze(axis)
    shape1 = list(x.shape)
    shape1[axis] = 1
    return mask.expand(shape1).reshape(-1).contiguous().view(torch.uint8)


def _elementwise(op, x, dy, mask, vec, out, axis, act, corr):
    """Launch the elementwise kernel over every tile of x (dy, out share x's strides)."""
    k = _kernels()
    g = _view(x, axis)
    p = _plan(g, x)
    n_rb, n_kb = -(-g.rows // p.block_r), -(-g.cols // p.block_k)
    lanes = 1 if g.channels_last else g.channels
    mrow, mcol = g.mask_strides
    k.elementwise_kernel[(lanes * n_rb * n_kb,)](
        x, dy, x if mask is None else mask, vec.contiguous(), out, g.rows, g.cols, g.channels,
        g.row_stride, g.chan_stride, mrow, mcol, n_rb, n_kb, CL=g.channels_last, OP=op,
        ACT=k.ACT_CODES[check_act(act)], CORR=corr, HAS_MASK=mask is not None,
        BLOCK_R=p.block_r, BLOCK_K=p.block_k, num_warps=p.num_warps)
    return out


def _part_dtype(x):
    """Dtype of the per-block partials: float32, float64 for float64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_stats(x, axis=1, mask=None) -> Stats:
    """Per-channel (count, mean, biased var) like `bnkit.functional.batch_stats`.

    Partials per block in float32 of x - K (K: the first valid value of each channel), then
    float64 merge: mean = K + sum(n_i m_i)/n, M2 = sum(M2_i) + sum(n_i (m_i - mean')^2).
    """
    k = _kernels()
    g = _view(x, axis)
    p = _plan(g, x)
    m = _flat_mask(mask, x, axis)
    pos = x if m is None else m.argmax().reshape(1)  # the first valid position, no sync
    part = torch.empty((3, p.parts, g.channels), dtype=_part_dtype(x), device=x.device)
    shift = torch.empty(g.channels, dtype=part.dtype, device=x.device)
    mrow, mcol = g.mask_strides
    k.stats_kernel[(p.lanes, p.parts)](
        x, x if m is None else m, pos, part, shift, g.rows, g.cols, g.channels, g.row_stride,
        g.chan_stride, mrow, mcol, p.rows_per, p.cols_per, p.splits_k, CL=g.channels_last,
        HAS_MASK=m is not None, BLOCK_R=p.block_r, BLOCK_K=p.block_k, num_warps=p.num_warps)
    part = part.double()
    counts = part[0]
    merged = merge_many(torch.stack([part[1], part[2] / counts.clamp_min(1)], 1), counts)
    adt = acc_dtype(x.dtype)
    return Stats(merged.count[0].to(adt), (shift.double() + merged.mean).to(adt),
                 merged.var.to(adt))


def _sums(dy, x, mean, vec, axis, act):
    """(sum dz, sum dz (x - mean)) in acc_dtype; dz = dy * act'(z) (z from vec's rows
    mean_hi, scale, shift). Block partials in float32, summed in float64, then
    sum dz (x - mean) = sum dz (x - mean_hi) - (mean - mean_hi) sum dz."""
    k = _kernels()
    g = _view(x, axis)
    p = _plan(g, x)
    part = torch.empty((2, p.parts, g.channels), dtype=_part_dtype(x), device=x.device)
    k.reduce_kernel[(p.lanes, p.parts)](
        x, dy, vec.contiguous(), part, g.rows, g.cols, g.channels, g.row_stride, g.chan_stride,
        p.rows_per, p.cols_per, p.splits_k, CL=g.channels_last,
        ACT=k.ACT_CODES[check_act(act)], BLOCK_R=p.block_r, BLOCK_K=p.block_k,
        num_warps=p.num_warps)
    s_dy, s_dyx = part.double().sum(1)
    s_dyx = s_dyx - (mean.double() - vec[0].double()) * s_dy
    adt = acc_dtype(x.dtype)
    return s_dy.to(adt), s_dyx.to(adt)


def backward_reduce(dy, x, mean, axis=1):
    """(sum_dy, sum_dy_xmu), each (C,) in acc_dtype, like the reference's."""
    mean_hi = mean.to(compute_dtype(x.dtype))
    return _sums(_like(dy, x, axis), x, mean, mean_hi[None], axis, "identity")


def normalize(x, mean, invstd, weight=None, bias=None, axis=1, act="identity"):
    """y = act((x - mean_hi) * scale + shift) with `affine_coeffs`; x's dtype and layout."""
    vec = torch.stack(affine_coeffs(mean, invstd, weight, bias, compute_dtype(x.dtype)))
    return _elementwise(_kernels().OP_NORMALIZE, x, x, None, vec, torch.empty_like(x), axis,
                        act, False)


def act_backward(dy, x, mean, invstd, weight, bias, axis=1, act="identity"):
    """dz = dy * f'(z), z = BN(x) recomputed in the kernel (in float32, not rounded to x's
    dtype as the reference does)."""
    if act == "identity":
        return dy
    dy = _like(dy, x, axis)
    vec = torch.stack(affine_coeffs(mean, invstd, weight, bias, compute_dtype(x.dtype)))
    return _elementwise(_kernels().OP_ACT_GRAD, x, dy, None, vec, torch.empty_like(dy), axis,
                        act, False)


def _elemt_vec(mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, cdt, training):
    """(6, C) rows mean_hi, scale, shift (for the activation), a, k, c (for dx)."""
    _, scale, shift = affine_coeffs(mean, invstd, weight, bias, cdt)
    mean_hi, a, k, c = elemt_coeffs(mean, invstd, weight, sum_dy, sum_dy_xmu, count, cdt,
                                    training)
    return torch.stack([mean_hi, scale, shift, a, k, c])


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis=1,
                   mask=None, training=True):
    """dx = a dy + m (k (x - mean_hi) + c) with `elemt_coeffs`; dy's dtype, x's layout."""
    dy = _like(dy, x, axis)
    vec = _elemt_vec(mean, invstd, weight, None, sum_dy, sum_dy_xmu, count,
                     compute_dtype(x.dtype), training)
    m = _flat_mask(mask, x, axis) if training else None
    return _elementwise(_kernels().OP_ELEMT, x, dy, m, vec, torch.empty_like(dy), axis,
                        "identity", training)


def fused_backward(dy, x, mean, invstd, weight, bias, count, axis=1, mask=None,
                   training=True, act="identity"):
    """act_backward + backward_reduce + backward_elemt in two passes -> (dx, sum_dy,
    sum_dy_xmu); dz = dy * act'(z) is recomputed in both kernels, never stored.

    Reads dy and x twice and writes dx once (the unfused path also writes and re-reads dz).
    """
    dy = _like(dy, x, axis)
    cdt = compute_dtype(x.dtype)
    vec3 = torch.stack(affine_coeffs(mean, invstd, weight, bias, cdt))
    sum_dy, sum_dy_xmu = _sums(dy, x, mean, vec3, axis, act)
    vec = _elemt_vec(mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, cdt, training)
    m = _flat_mask(mask, x, axis) if training else None
    dx = _elementwise(_kernels().OP_ELEMT, x, dy, m, vec, torch.empty_like(dy), axis, act,
                      training)
    return dx, sum_dy, sum_dy_xmu


def _abn_consts(act_param, cdt, c, device):
    """(3, C) rows p, 1/p and elu's clamp -1 + eps in the compute dtype, rounded as the
    torch operations of bnkit.functional.inplace_abn round them."""
    p = float(act_param)
    vals = torch.tensor([p, 1.0 / p, -1.0 + torch.finfo(cdt).eps], dtype=cdt, device=device)
    return vals[:, None].expand(3, c)


def _abn_launch(kernel, y, dy, vec, out, axis, act, **flags):
    """Launch an elementwise InPlaceABN kernel over every tile of y (dy, out share its
    strides)."""
    k = _kernels()
    g = _view(y, axis)
    p = _plan(g, y)
    n_rb, n_kb = -(-g.rows // p.block_r), -(-g.cols // p.block_k)
    lanes = 1 if g.channels_last else g.channels
    args = (y, out, vec.contiguous()) if dy is None else (y, dy, vec.contiguous(), out)
    kernel[(lanes * n_rb * n_kb,)](
        *args, g.rows, g.cols, g.channels, g.row_stride, g.chan_stride, n_rb, n_kb,
        CL=g.channels_last, ACT=k.ABN_ACT_CODES[act], **flags, BLOCK_R=p.block_r,
        BLOCK_K=p.block_k, num_warps=p.num_warps)
    return out


def abn_forward(x, out, weight, bias, running_mean, running_var, stats, training, eps, axis=1,
                act="leaky_relu", act_param=0.01, momentum=None):
    """InPlaceABN's forward: the statistics (`batch_stats` in training, the running buffers'
    in eval, or `stats` = (mean, var) given), then y = f(BN(x)) written into `out` (x itself
    for the in-place call) by one kernel. The running buffers are left to the caller
    (blended: False). -> (mean, var, invstd, False); None to decline."""
    if not supports(x, axis, None) or _geometry(out, axis) != _geometry(x, axis):
        return None
    adt = acc_dtype(x.dtype)
    if stats is not None:
        mean, var = stats
    elif training:
        _, mean, var = batch_stats(x, axis)
    else:
        mean, var = running_mean.to(adt, copy=True), running_var.to(adt, copy=True)
    invstd = inv_std(var, eps)
    cdt = compute_dtype(x.dtype)
    coeffs = affine_coeffs(mean, invstd, weight, bias, cdt)
    vec = torch.cat([torch.stack(coeffs), _abn_consts(act_param, cdt, x.shape[axis],
                                                      x.device)[:1]])
    _abn_launch(_kernels().abn_forward_kernel, x, None, vec, out, axis, act)
    return mean, var, invstd, False


def abn_backward_reduce(dy, y, weight, bias, invstd, axis=1, act="leaky_relu", act_param=0.01):
    """(sum dz, sum dz (x - mu)) in acc_dtype from y and dy alone: block partials (float32,
    float64 for float64 input) summed in float64. None to decline."""
    if not supports(y, axis, None):
        return None
    k = _kernels()
    dy = _like(dy, y, axis)
    cdt = compute_dtype(y.dtype)
    vec = torch.cat([torch.stack(inverse_coeffs(invstd, weight, bias, cdt)),
                     _abn_consts(act_param, cdt, y.shape[axis], y.device)])
    g = _view(y, axis)
    p = _plan(g, y)
    part = torch.empty((2, p.parts, g.channels), dtype=_part_dtype(y), device=y.device)
    k.abn_reduce_kernel[(p.lanes, p.parts)](
        y, dy, vec.contiguous(), part, g.rows, g.cols, g.channels, g.row_stride, g.chan_stride,
        p.rows_per, p.cols_per, p.splits_k, CL=g.channels_last, ACT=k.ABN_ACT_CODES[act],
        BLOCK_R=p.block_r, BLOCK_K=p.block_k, num_warps=p.num_warps)
    s_dz, s_dzx = part.double().sum(1)
    adt = acc_dtype(y.dtype)
    return s_dz.to(adt), s_dzx.to(adt)


def abn_backward_elemt(dy, y, weight, bias, invstd, sum_dz, sum_dz_xmu, count, axis=1,
                       act="leaky_relu", act_param=0.01, training=True):
    """InPlaceABN's dx from y, dy and the (all-reduced) sums, in dy's dtype; None to
    decline."""
    if not supports(y, axis, None):
        return None
    dy = _like(dy, y, axis)
    cdt = compute_dtype(y.dtype)
    zero = torch.zeros_like(invstd)  # x - mu is recovered centred
    _, a, kc, c = elemt_coeffs(zero, invstd, weight, sum_dz, sum_dz_xmu, count, cdt, training)
    vec = torch.cat([torch.stack(inverse_coeffs(invstd, weight, bias, cdt)),
                     _abn_consts(act_param, cdt, y.shape[axis], y.device),
                     torch.stack([a.to(cdt), kc, c])])
    return _abn_launch(_kernels().abn_dx_kernel, y, dy, vec, torch.empty_like(dy), axis, act,
                       CORR=bool(training))
