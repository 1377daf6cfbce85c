"""The whole BN forward op and backward op of the 'cpu' backend, each in one numba call.

A BN layer call is a handful of tiny per-channel vector steps (rsqrt, the affine
coefficients, the running-stat blend, dweight/dbias) around two or three passes over x.
As torch ops each tiny step costs 3-10 us of dispatch, more than the passes themselves on
inputs up to a few MB, so here they run inside the same compiled call as the passes:

  forward_op:  statistics (training) -> coefficients -> y -> running-stat blend
  backward_op: sums -> dweight, dbias -> coefficients -> dx

`par` picks the kernels: False runs serial loops (one thread, no parallel-region start-up,
the right choice below ~32K values); True calls the parallel kernels of `cpu_numba`
(chunked two-pass statistics merged with Chan's formula, blocked elementwise passes,
the one-task-per-channel fused backward when `fuse`). Layouts as in `cpu_numba`: inner > 1
is (outer, C, inner) channels-first, inner == 1 is (M, C) channels-last.

Tensors come in as addresses (`Tensor.data_ptr()`) with a zero-size array of their dtype
(`like`): turning a tensor into a numpy array costs ~1.5 us and, inside an
autograd.Function's forward, a dispatched `detach`; an address costs 0.1 us. The caller
guarantees each address starts a dense buffer of the stated size and dtype.

Every result equals the core's: float64 corrected two-pass statistics, coefficients in the
operation order of `bnkit.functional.normalize.affine_coeffs` and
`bnkit.functional.backward.elemt_coeffs`, invstd = 1 / sqrt(var + eps).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu_numba as K
from .cpu_layout import BLOCK

_SERIAL = {"cache": True, "fastmath": False, "error_model": "numpy"}


@intrinsic
def _void_ptr(typingctx, addr):
    """The integer address as a void pointer (for numba.carray)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(addr), codegen


@njit(**_SERIAL)
def _view(addr, n, like):
    """1-D array of n values of like's dtype over the buffer at `addr` (no copy)."""
    return numba.carray(_void_ptr(addr), n, like.dtype)


# ---- per-channel steps --------------------------------------------------------------------


@njit(**_SERIAL)
def _channel_sums(x, outer, C, inner, shift, out_s, out_q):
    """Per channel: out_s = sum (x - shift), out_q = sum (x - shift)^2, in float64."""
    out_s[:] = 0.0
    out_q[:] = 0.0
    for o in range(outer):
        if inner == 1:
            xr = x[o * C:(o + 1) * C]
            for c in range(C):
                d = np.float64(xr[c]) - shift[c]
                out_s[c] += d
                out_q[c] += d * d
        else:
            for c in range(C):
                i0 = (o * C + c) * inner
                a, b = K._sqdev(x[i0:i0 + inner], shift[c])
                out_s[c] += b
                out_q[c] += a


@njit(**_SERIAL)
def _serial_stats(x, outer, C, inner, mean, var):
    """Single-chunk cf_stats / cl_stats: sums, then deviations from the rounded mean."""
    n = outer * inner
    s = np.empty(C)
    q = np.empty(C)
    _channel_sums(x, outer, C, inner, np.zeros(C), s, q)
    m0 = s / n
    _channel_sums(x, outer, C, inner, m0, s, q)
    for c in range(C):
        mu, m2 = K._corrected(m0[c], q[c], s[c], n)
        mean[c], var[c] = mu, m2 / n


@njit(**_SERIAL)
def _affine(mean, var, eps, w, b, has_w, has_b, like):
    """Scalar (mean_hi, scale, shift) of one channel in `like`'s dtype, float64 math in the
    operation order of affine_coeffs (invstd = 1/sqrt(var + eps))."""
    scale = _invstd(var, eps)
    if has_w:
        scale = scale * np.float64(w)
    mean_hi = like.dtype.type(mean)
    shift = -(mean - np.float64(mean_hi)) * scale
    if has_b:
        shift = shift + np.float64(b)
    return mean_hi, like.dtype.type(scale), like.dtype.type(shift)


@njit(**_SERIAL)
def _invstd(var, eps):
    """1 / sqrt(var + eps); 0 for a zero-variance channel with eps = 0, whose centred values
    are exactly 0 (x_hat = 0: the output is the bias). NaN stays NaN."""
    v = var + eps
    return 0.0 if v == 0.0 else 1.0 / np.sqrt(v)


@njit(**_SERIAL)
def _fwd_coeffs(mean, var, eps, w, b, has_w, has_b, like):
    """(mean_hi, scale, shift) arrays (C,) in `like`'s dtype."""
    C = mean.size
    mh, sc, sh = np.empty(C, like.dtype), np.empty(C, like.dtype), np.empty(C, like.dtype)
    for c in range(C):
        mh[c], sc[c], sh[c] = _affine(mean[c], var[c], eps, w[c] if has_w else 1.0,
                                      b[c] if has_b else 0.0, has_w, has_b, like)
    return mh, sc, sh


@njit(**_SERIAL)
def _bwd_coeffs(mean, invstd, w, has_w, n, training, sum_dy, sum_dy_xmu, like):
    """(mean_hi, a, k, c) arrays (C,) of dx = (c + (x - mean_hi) k) + dy a; in eval the
    statistics are constants, so k = c = 0 and a = invstd * w."""
    C = mean.size
    mh, ac = np.empty(C, like.dtype), np.empty(C, like.dtype)
    kc, cc = np.zeros(C, like.dtype), np.zeros(C, like.dtype)
    for c in range(C):
        wc = np.float64(w[c]) if has_w else 1.0
        if training:
            mh[c], ac[c], kc[c], cc[c] = K._elemt_coeffs(mean[c], invstd[c], wc, sum_dy[c],
                                                         sum_dy_xmu[c], n, like)
        else:
            mh[c], ac[c] = like.dtype.type(mean[c]), like.dtype.type(invstd[c] * wc)
    return mh, ac, kc, cc


@njit(**_SERIAL)
def _blend(rm, rv, mean, var, n, momentum):
    """Running stats move towards the batch mean and the unbiased variance, in float64
    (as update_running: one rounding into the buffers' dtype). A channel whose batch
    statistics are not finite keeps its running statistics; returns how many did."""
    keep = 1.0 - momentum
    unbias = n / (n - 1.0)
    skipped = 0
    for c in range(mean.size):
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            skipped += 1
            continue
        rm[c] = np.float64(rm[c]) * keep + mean[c] * momentum
        rv[c] = np.float64(rv[c]) * keep + var[c] * (momentum * unbias)
    return skipped


# ---- serial passes --------------------------------------------------------------------------


@njit(**_SERIAL)
def _apply(x, y, outer, C, inner, mh, sc, sh, relu):
    """y = (x - mh[c]) sc[c] + sh[c], then max(y, 0) if relu (NaN stays NaN)."""
    if inner == 1:  # cl: the same loops as cl_normalize, one task
        K.cl_normalize_rows(x, y, 0, outer, C, mh, sc, sh, relu)
        return
    zero = x.dtype.type(0)
    for o in range(outer):
        for c in range(C):
            i0 = (o * C + c) * inner
            m, a, h = mh[c], sc[c], sh[c]
            xs, ys = x[i0:i0 + inner], y[i0:i0 + inner]
            if relu:
                for k in range(inner):
                    ys[k] = np.maximum((xs[k] - m) * a + h, zero)
            else:
                for k in range(inner):
                    ys[k] = (xs[k] - m) * a + h


@njit(**_SERIAL)
def _serial_dy_sums(dy, x, outer, C, inner, mean, sum_dy, sum_dy_xmu):
    """sum dy and sum dy (x - mean) per channel, float64."""
    sum_dy[:] = 0.0
    sum_dy_xmu[:] = 0.0
    for o in range(outer):
        if inner == 1:  # cl: channels are the lanes
            for c in range(C):
                g = np.float64(dy[o * C + c])
                sum_dy[c] += g
                sum_dy_xmu[c] += g * (np.float64(x[o * C + c]) - mean[c])
        else:
            for c in range(C):
                i0 = (o * C + c) * inner
                a, b = K._dy_sums(dy[i0:i0 + inner], x[i0:i0 + inner], mean[c])
                sum_dy[c] += a
                sum_dy_xmu[c] += b


@njit(**_SERIAL)
def _serial_elemt(dy, x, dx, outer, C, inner, mh, ac, kc, cc, training):
    """dx = (c + (x - mean_hi) k) + dy a (training) or dy a (eval: x does not enter)."""
    if inner == 1:  # cl: the same loops as cl_elemt, one task
        K.cl_elemt_rows(dy, x, dx, 0, outer, C, mh, ac, kc, cc, training)
        return
    for o in range(outer):
        for c in range(C):
            i0 = (o * C + c) * inner
            m, a, k, h = mh[c], ac[c], kc[c], cc[c]
            dys, xs, dxs = dy[i0:i0 + inner], x[i0:i0 + inner], dx[i0:i0 + inner]
            if training:
                for j in range(inner):
                    dxs[j] = (h + (xs[j] - m) * k) + dys[j] * a
            else:
                for j in range(inner):
                    dxs[j] = dys[j] * a


# ---- the two ops ----------------------------------------------------------------------------


@njit(**_SERIAL)
def forward_op(xa, ya, outer, C, inner, lx, par, rows, pieces, width, wa, ba, lp, has_w,
               has_b, eps, training, relu, mean, var, rma, rva, lr, update, momentum):
    """y = act((x - mean_hi) scale + shift) into the buffer at ya (x's layout and dtype lx).
    Training: mean, var (C,) float64 receive the batch statistics and, with `update`, the
    running buffers at rma, rva (dtype lr) blend towards them by `momentum`. Eval: mean,
    var receive the running buffers. wa, ba: weight and bias (dtype lp) when has_w, has_b.
    rows/pieces/width: the parallel statistics' chunks (cpu_layout.cf_split, or
    rows = cpu_layout.cl_rows for inner == 1). Returns the number of channels whose
    running statistics the blend left unchanged (batch statistics not finite)."""
    n = outer * C * inner
    x, y = _view(xa, n, lx), _view(ya, n, lx)
    w = _view(wa, C if has_w else 0, lp)
    b = _view(ba, C if has_b else 0, lp)
    has_r = update or not training
    rm, rv = _view(rma, C if has_r else 0, lr), _view(rva, C if has_r else 0, lr)
    if not training:
        for c in range(C):
            mean[c], var[c] = rm[c], rv[c]
    elif not par:
        _serial_stats(x, outer, C, inner, mean, var)
    elif inner > 1:
        K.cf_stats(x, outer, C, inner, rows, pieces, width, mean, var)
    else:
        K.cl_stats(x, outer, C, rows, mean, var)
    mh, sc, sh = _fwd_coeffs(mean, var, eps, w, b, has_w, has_b, x)
    if not par:
        _apply(x, y, outer, C, inner, mh, sc, sh, relu)
    elif inner > 1:
        K.cf_normalize(x, y, C, inner, BLOCK, mh, sc, sh, relu)
    else:
        K.cl_normalize(x, y, outer, C, max(1, BLOCK // C), mh, sc, sh, relu)
    if training and update:
        return _blend(rm, rv, mean, var, np.float64(outer * inner), momentum)
    return 0


@njit(**_SERIAL)
def _relu_grad_rows(dy, x, dz, r0, r1, C, inner, mh, sc, sh):
    """dz = dy * relu'(z), z = (x - mean_hi) scale + shift recomputed, over rows [r0, r1)
    of the (rows, inner) view (inner == 1: rows of C channels). relu'(z) is 1.0 or 0.0 as
    in the primitives' `act_backward` (dy * 0.0 keeps the sign of zero and NaN)."""
    one, zero = x.dtype.type(1), x.dtype.type(0)
    if inner == 1:
        for m in range(r0, r1):
            for c in range(C):
                i = m * C + c
                dz[i] = dy[i] * K._relu_gate(x[i], mh[c], sc[c], sh[c], one, zero)
        return
    for r in range(r0, r1):
        c = r % C
        m, a, h = mh[c], sc[c], sh[c]
        for i in range(r * inner, (r + 1) * inner):
            dz[i] = dy[i] * K._relu_gate(x[i], m, a, h, one, zero)


@njit(**K._ELEM)
def _relu_grad_par(dy, x, dz, nrows, C, inner, per, mh, sc, sh):
    """_relu_grad_rows in tasks of `per` rows."""
    for t in prange(-(-nrows // per)):
        _relu_grad_rows(dy, x, dz, t * per, min(nrows, (t + 1) * per), C, inner, mh, sc, sh)


@njit(**_SERIAL)
def _relu_grad(dy, x, dz, outer, C, inner, par, mean, var, eps, w, b, has_w, has_b):
    """dz = dy * relu'(z) for the relu activation's backward, into dz; returns dz."""
    mh, sc, sh = _fwd_coeffs(mean, var, eps, w, b, has_w, has_b, x)
    nrows = outer if inner == 1 else outer * C
    if par:
        _relu_grad_par(dy, x, dz, nrows, C, inner, max(1, BLOCK // (C if inner == 1 else inner)),
                       mh, sc, sh)
    else:
        _relu_grad_rows(dy, x, dz, 0, nrows, C, inner, mh, sc, sh)
    return dz


@njit(**_SERIAL)
def backward_op(dya, xa, dxa, za, outer, C, inner, lx, par, fuse, rows, pieces, width, ma,
                va, eps, wa, ba, lp, has_w, has_b, relu, cnt, training, sum_dy, sum_dy_xmu, dw,
                db):
    """Backward of the identity or relu activation into dx at dxa (dy at dya laid out as x,
    dtype lx): with relu, dy becomes dz = dy relu'(z) first (z recomputed from the weight
    and bias at wa, ba; into the scratch buffer at za, unless `fuse` recomputes it on the
    fly). Then sum_dy, sum_dy_xmu (C,) float64, dweight = sum_dy_xmu invstd
    and dbias = sum_dy into dw, db (the parameters' dtype), and dx. ma, va: the forward's
    float64 statistics (C,); cnt the count. `fuse` (training, inner > 1, par): one task per
    channel, sums then dx from cache."""
    n = outer * C * inner
    dy, x, dx = _view(dya, n, lx), _view(xa, n, lx), _view(dxa, n, lx)
    w, b = _view(wa, C if has_w else 0, lp), _view(ba, C if has_b else 0, lp)
    mean, var = _view(ma, C, sum_dy), _view(va, C, sum_dy)
    if relu and not fuse:  # the per-channel kernel recomputes relu'(z) itself
        dy = _relu_grad(dy, x, _view(za, n, lx), outer, C, inner, par, mean, var, eps, w, b,
                        has_w, has_b)
    invstd = np.empty(C)
    for c in range(C):
        invstd[c] = _invstd(var[c], eps)
    if fuse:
        wf = np.ones(C)
        if has_w:
            for c in range(C):
                wf[c] = w[c]
        fmh, fsc, fsh = _fwd_coeffs(mean, var, eps, w, b, has_w, has_b, x)
        K.cf_fused_bwd(dy, x, dx, outer, C, inner, mean, invstd, wf, cnt, sum_dy, sum_dy_xmu,
                       relu, fmh, fsc, fsh)
    elif not par:
        _serial_dy_sums(dy, x, outer, C, inner, mean, sum_dy, sum_dy_xmu)
    elif inner > 1:
        K.cf_dy_sums(dy, x, mean, outer, C, inner, rows, pieces, width, sum_dy, sum_dy_xmu)
    else:
        K.cl_dy_sums(dy, x, mean, outer, C, rows, sum_dy, sum_dy_xmu)
    for c in range(C):
        dw[c] = sum_dy_xmu[c] * invstd[c]
        db[c] = sum_dy[c]
    if fuse:
        return
    mh, ac, kc, cc = _bwd_coeffs(mean, invstd, w, has_w, cnt, training, sum_dy, sum_dy_xmu, x)
    if not par:
        _serial_elemt(dy, x, dx, outer, C, inner, mh, ac, kc, cc, training)
    elif inner > 1:
        K.cf_elemt(dy, x, dx, C, inner, BLOCK, mh, ac, kc, cc, training)
    else:
        K.cl_elemt(dy, x, dx, outer, C, max(1, BLOCK // C), mh, ac, kc, cc, training)
