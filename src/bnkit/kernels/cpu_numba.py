"""Numba kernels of the 'cpu' backend, on flat views of contiguous buffers.

Two layouts (see `cpu_layout`):
  cf ("channels-first"): x viewed as (outer, C, inner), inner > 1; element (o, c, s) sits
     at (o*C + c)*inner + s. A channel is `outer` runs of `inner` contiguous values.
  cl ("channels-last"): x viewed as (M, C); element (m, c) sits at m*C + c.
Reductions run per (channel, chunk) task: a chunk is a cache-sized block, read once from
memory and a second time from cache (two-pass variance per chunk), then the chunks merge
with Chan's formula. Sums accumulate in float64; elementwise work runs in x's dtype.

Flags: every kernel uses fastmath=False (IEEE, no contraction: `(x - m)*a + b` rounds like
the reference), except the three helpers that sum one contiguous slice in float64 (`_sum`,
`_sqdev`, `_dy_sums`): they use fastmath={"reassoc"} only, which lets LLVM split the sum
into SIMD lanes (measured 1.0 -> 3.5 G values/s per core for the two variance passes),
changes nothing but the summation order and keeps NaN/Inf semantics. LLVM's fast-math flags
sit on each instruction, so inlining a helper does not spread them.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_ELEM = {"parallel": True, "cache": True, "fastmath": False, "error_model": "numpy"}
_SUM_SERIAL = {"cache": True, "fastmath": {"reassoc"}, "error_model": "numpy"}
_SERIAL = {"cache": True, "fastmath": False, "error_model": "numpy"}

# ---- cf chunking: chunk j of a channel is rows [o0, o1) x positions [s0, s1) ----


@njit(**_SERIAL)
def _cf_chunk(j, outer, inner, rows, pieces, width):
    """(o0, o1, s0, s1) of chunk j: `rows` whole rows, or 1/`pieces` of one row (rows of
    one channel for the reductions, of the whole (outer*C, inner) view elementwise)."""
    o0 = (j // pieces) * rows
    s0 = (j % pieces) * width
    return o0, min(outer, o0 + rows), s0, min(inner, s0 + width)


# Inner loops run over slices from index 0: LLVM vectorizes `for k in range(n): xs[k]`
# about twice as fast as `for k in range(i0, i1): x[k]` (measured, numba 0.68).


@njit(**_SUM_SERIAL)
def _sum(xs):
    s = 0.0
    for i in range(xs.size):
        s += np.float64(xs[i])
    return s


@njit(**_SUM_SERIAL)
def _sqdev(xs, m):
    """(sum (x - m)^2, sum (x - m)): the second corrects a rounded mean."""
    q = 0.0
    r = 0.0
    for i in range(xs.size):
        d = np.float64(xs[i]) - m
        q += d * d
        r += d
    return q, r


@njit(**_SUM_SERIAL)
def _dy_sums(dys, xs, m):
    """(sum dy, sum dy*(x - m)) in float64."""
    s = 0.0
    q = 0.0
    for i in range(xs.size):
        g = np.float64(dys[i])
        s += g
        q += g * (np.float64(xs[i]) - m)
    return s, q


@njit(**_ELEM)
def cf_stats(x, outer, C, inner, rows, pieces, width, mean, var):
    """Per-channel mean and biased var of (outer, C, inner) x into mean, var (C,) float64."""
    P = -(-outer // rows) * pieces  # chunks per channel
    pn = np.empty((C, P))
    pm = np.empty((C, P))
    pq = np.empty((C, P))
    for t in prange(C * P):
        c, j = t // P, t % P
        o0, o1, s0, s1 = _cf_chunk(j, outer, inner, rows, pieces, width)
        n = (o1 - o0) * (s1 - s0)
        s = 0.0
        for o in range(o0, o1):
            s += _sum(x[(o * C + c) * inner + s0:(o * C + c) * inner + s1])
        m = s / max(n, 1)
        q = 0.0
        r = 0.0
        for o in range(o0, o1):
            a, b = _sqdev(x[(o * C + c) * inner + s0:(o * C + c) * inner + s1], m)
            q += a
            r += b
        pn[c, j] = n
        pm[c, j], pq[c, j] = _corrected(m, q, r, n)
    _merge(pn, pm, pq, mean, var)


@njit(**_SERIAL)
def _corrected(m, q, r, n):
    """(mean, M2) of a chunk from its rounded mean m, q = sum (x - m)^2 and r = sum (x - m):
    mean = m + r/n, M2 = q - r^2/n (corrected two-pass; exact for constant data: x - m is
    then the same exact difference everywhere, so the mean comes out exactly x)."""
    if n == 0:
        return 0.0, 0.0
    return m + r / n, max(q - r * r / n, 0.0)


@njit(**_SERIAL)
def _merge(pn, pm, pq, mean, var):
    """Chan's P-way merge, per channel: deviations from the final mean (no cancellation).

    pn, pm, pq: (C, P) counts, means and sums of squared deviations of the chunks."""
    C, P = pm.shape
    for c in range(C):
        n = 0.0
        s = 0.0
        for j in range(P):  # shifted by chunk 0's mean: equal chunk means merge exactly
            n += pn[c, j]
            s += pn[c, j] * (pm[c, j] - pm[c, 0])
        mu = pm[c, 0] + s / max(n, 1.0)
        m2 = 0.0
        for j in range(P):
            d = pm[c, j] - mu
            m2 += pq[c, j] + pn[c, j] * d * d
        mean[c] = mu
        var[c] = m2 / max(n, 1.0)


@njit(**_ELEM)
def cf_dy_sums(dy, x, mean, outer, C, inner, rows, pieces, width, sum_dy, sum_dy_xmu):
    """sum(dy) and sum(dy * (x - mean)) per channel of (outer, C, inner) into (C,) float64."""
    P = -(-outer // rows) * pieces
    ps = np.empty((C, P))
    pq = np.empty((C, P))
    for t in prange(C * P):
        c, j = t // P, t % P
        o0, o1, s0, s1 = _cf_chunk(j, outer, inner, rows, pieces, width)
        s = 0.0
        q = 0.0
        for o in range(o0, o1):
            i0 = (o * C + c) * inner
            a, b = _dy_sums(dy[i0 + s0:i0 + s1], x[i0 + s0:i0 + s1], mean[c])
            s += a
            q += b
        ps[c, j], pq[c, j] = s, q
    for c in prange(C):
        sum_dy[c] = ps[c].sum()
        sum_dy_xmu[c] = pq[c].sum()


# ---- cl reductions: chunk j is rows [j*rows, (j+1)*rows); channels are SIMD lanes ----


@njit(**_ELEM)
def cl_stats(x, M, C, rows, mean, var):
    """Per-channel mean and biased var of (M, C) x into mean, var (C,) float64, per chunk
    of `rows` rows (cpu_layout.cl_rows: at most SHIFT_ROWS) merged with Chan's formula."""
    P = -(-M // rows)
    pn = np.empty((C, P))
    pm = np.zeros((P, C))
    pq = np.zeros((P, C))
    pr = np.zeros((P, C))
    for j in prange(P):
        m0, m1 = j * rows, min(M, (j + 1) * rows)
        if x.itemsize == 4:
            _cl_shifted(x, m0, m1, C, pm[j], pq[j], pr[j])
        else:
            _cl_two_pass(x, m0, m1, C, pm[j], pq[j], pr[j])
        pn[:, j] = m1 - m0
    _merge(pn, pm.T.copy(), pq.T.copy(), mean, var)


@njit(**_SERIAL)
def _cl_two_pass(x, m0, m1, C, acc, sq, sd):
    """(mean, M2) per channel of rows [m0, m1) into acc, sq: the corrected two-pass
    (the second pass reads the chunk from L2). sd is scratch."""
    for m in range(m0, m1):
        xr = x[m * C:(m + 1) * C]
        for c in range(C):
            acc[c] += np.float64(xr[c])
    for c in range(C):
        acc[c] /= m1 - m0
    for m in range(m0, m1):
        xr = x[m * C:(m + 1) * C]
        for c in range(C):
            d = np.float64(xr[c]) - acc[c]
            sq[c] += d * d
            sd[c] += d
    for c in range(C):
        acc[c], sq[c] = _corrected(acc[c], sq[c], sd[c], m1 - m0)


@njit(**_SERIAL)
def _cl_shifted(x, m0, m1, C, shift, q, s):
    """(mean, M2) per channel of rows [m0, m1) into shift, q in one pass: float64 sums of
    d = x - x[m0] (the chunk's first row), mean = x[m0] + s/n, M2 = q - s^2/n. The shift is
    a value of the chunk, so (shift - mean)^2 <= M2 and the cancellation in q - s^2/n costs
    at most ~n^2 float64 ulps of M2: below 2e-9 relative for n <= cpu_layout.SHIFT_ROWS
    (4096), far under float32's resolution (used for float32 input only). Constant data
    give d = 0: exact.
    ~30% faster than the two passes on 8192x256 (the second pass was compute-bound)."""
    x0 = x[m0 * C:(m0 + 1) * C]
    for c in range(C):
        shift[c] = x0[c]
    for m in range(m0 + 1, m1):
        xr = x[m * C:(m + 1) * C]
        for c in range(C):
            d = np.float64(xr[c]) - shift[c]
            s[c] += d
            q[c] += d * d
    for c in range(C):
        shift[c], q[c] = _corrected(shift[c], q[c], s[c], m1 - m0)


@njit(**_ELEM)
def cl_dy_sums(dy, x, mean, M, C, rows, sum_dy, sum_dy_xmu):
    """sum(dy) and sum(dy * (x - mean)) per channel of (M, C) into (C,) float64."""
    P = -(-M // rows)
    ps = np.zeros((P, C))
    pq = np.zeros((P, C))
    for j in prange(P):
        s, q = ps[j], pq[j]
        for m in range(j * rows, min(M, (j + 1) * rows)):
            dyr, xr = dy[m * C:(m + 1) * C], x[m * C:(m + 1) * C]
            for c in range(C):
                g = np.float64(dyr[c])
                s[c] += g
                q[c] += g * (np.float64(xr[c]) - mean[c])
    for c in range(C):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
    for j in range(P):
        for c in range(C):
            sum_dy[c] += ps[j, c]
            sum_dy_xmu[c] += pq[j, c]


# ---- elementwise: y = (x - mean_hi) * scale + shift, and dx = c + (x - mean_hi) k + a dy ----
# cf tasks are blocks of whole rows (or slices of one long row) of about `block` values,
# walked row by row with the channel counted up (no division per row); cl tasks are `rows`
# rows of the (M, C) view.


@njit(**_SERIAL)
def _row_split(nrows, inner, block):
    """(per, pieces, width, tasks): tasks of `per` whole rows, or of 1/`pieces` of a row
    (`width` values) when a row is longer than `block`."""
    per = max(1, block // inner)
    pieces = -(-inner // block) if per == 1 else 1
    width = -(-inner // pieces)
    return per, pieces, width, -(-nrows // per) * pieces


@njit(**_ELEM)
def cf_normalize(x, y, C, inner, block, mean_hi, scale, shift, relu):
    """y = (x - mean_hi[c]) * scale[c] + shift[c], then max(y, 0) if relu (NaN stays NaN)."""
    nrows = x.size // inner
    per, pieces, width, tasks = _row_split(nrows, inner, block)
    zero = x.dtype.type(0)
    for t in prange(tasks):
        r0, r1, s0, s1 = _cf_chunk(t, nrows, inner, per, pieces, width)
        c = r0 % C
        for r in range(r0, r1):
            m, a, h = mean_hi[c], scale[c], shift[c]
            xs, ys = x[r * inner + s0:r * inner + s1], y[r * inner + s0:r * inner + s1]
            if relu:
                for k in range(s1 - s0):
                    ys[k] = np.maximum((xs[k] - m) * a + h, zero)  # np.maximum keeps NaN
            else:
                for k in range(s1 - s0):
                    ys[k] = (xs[k] - m) * a + h
            c = c + 1 if c + 1 < C else 0


@njit(**_ELEM)
def cl_normalize(x, y, M, C, rows, mean_hi, scale, shift, relu):
    """(M, C) version of cf_normalize."""
    for b in prange(-(-M // rows)):
        cl_normalize_rows(x, y, b * rows, min(M, (b + 1) * rows), C, mean_hi, scale, shift,
                          relu)


@njit(**_ELEM)
def cf_elemt(dy, x, dx, C, inner, block, mean_hi, a, k, c0, training):
    """dx = (c0 + (x - mean_hi) k) + dy a per channel; dx = dy a when not training."""
    nrows = x.size // inner
    per, pieces, width, tasks = _row_split(nrows, inner, block)
    for t in prange(tasks):
        r0, r1, s0, s1 = _cf_chunk(t, nrows, inner, per, pieces, width)
        c = r0 % C
        for r in range(r0, r1):
            i0, i1 = r * inner + s0, r * inner + s1
            dys, xs, dxs = dy[i0:i1], x[i0:i1], dx[i0:i1]
            if training:
                m, ac, kc, cc = mean_hi[c], a[c], k[c], c0[c]
                for j in range(i1 - i0):
                    dxs[j] = (cc + (xs[j] - m) * kc) + dys[j] * ac
            else:
                ac = a[c]
                for j in range(i1 - i0):
                    dxs[j] = dys[j] * ac
            c = c + 1 if c + 1 < C else 0


@njit(**_ELEM)
def cl_elemt(dy, x, dx, M, C, rows, mean_hi, a, k, c0, training):
    """(M, C) version of cf_elemt."""
    for b in prange(-(-M // rows)):
        cl_elemt_rows(dy, x, dx, b * rows, min(M, (b + 1) * rows), C, mean_hi, a, k, c0,
                      training)


@njit(**_SERIAL)
def cl_elemt_rows(dy, x, dx, m0, m1, C, mean_hi, a, k, c0, training):
    """Rows [m0, m1) of cl_elemt."""
    for m in range(m0, m1):
        dyr, xr, dxr = dy[m * C:(m + 1) * C], x[m * C:(m + 1) * C], dx[m * C:(m + 1) * C]
        if training:
            for c in range(C):
                dxr[c] = (c0[c] + (xr[c] - mean_hi[c]) * k[c]) + dyr[c] * a[c]
        else:  # the statistics are constants: x does not enter
            for c in range(C):
                dxr[c] = dyr[c] * a[c]


# ---- fused training backward, one channel per task (cf layout) ------------------------------


@njit(**_SERIAL)
def _elemt_coeffs(mean, invstd, w, sum_dy, sum_dy_xmu, n, like):
    """Scalar (mean_hi, a, k, c) of one channel, in `like`'s dtype, from float64 math in the
    operation order of bnkit.functional.backward.elemt_coeffs: a = w s,
    k = -a s^2 sum_dy_xmu / n, c = -a sum_dy / n - k (mean - mean_hi)."""
    a = invstd * w
    k = -a * invstd * invstd * sum_dy_xmu / n
    mean_hi = like.dtype.type(mean)
    c = -a * sum_dy / n - k * (mean - np.float64(mean_hi))
    return mean_hi, like.dtype.type(a), like.dtype.type(k), like.dtype.type(c)


@njit(**_SERIAL)
def _relu_gate(xv, mean_hi, scale, shift, one, zero):
    """relu'(z) as `one` or `zero`, z = (xv - mean_hi) scale + shift (IEEE, no fastmath:
    inlined into a reassoc loop it keeps its own flags, so z rounds as in the forward)."""
    return one if (xv - mean_hi) * scale + shift > zero else zero


@njit(**_SUM_SERIAL)
def _dz_sums(dys, xs, m, mh, sc, sh):
    """_dy_sums of dz = dy relu'(z) (dz formed in x's dtype, as the relu backward does)."""
    one, zero = xs.dtype.type(1), xs.dtype.type(0)
    s = 0.0
    q = 0.0
    for i in range(xs.size):
        g = np.float64(dys[i] * _relu_gate(xs[i], mh, sc, sh, one, zero))
        s += g
        q += g * (np.float64(xs[i]) - m)
    return s, q


@njit(**_ELEM)
def cf_fused_bwd(dy, x, dx, outer, C, inner, mean, invstd, w, n, sum_dy, sum_dy_xmu, relu,
                 fmh, fsc, fsh):
    """Training backward of (outer, C, inner): per channel, the sums (dy and x read from
    memory), then dx = (c + (x - mean_hi) k) + dy a while the channel is still in cache.
    w: (C,) float64 weight (ones without one: a = s * 1 is exact). With relu, dy stands
    for dz = dy relu'(z), z recomputed from the forward's coefficients fmh, fsc, fsh (C,)
    in both passes: no dz tensor."""
    one, zero = x.dtype.type(1), x.dtype.type(0)
    for c in prange(C):
        s = 0.0
        q = 0.0
        for o in range(outer):
            i0 = (o * C + c) * inner
            if relu:
                a, b = _dz_sums(dy[i0:i0 + inner], x[i0:i0 + inner], mean[c], fmh[c], fsc[c],
                                fsh[c])
            else:
                a, b = _dy_sums(dy[i0:i0 + inner], x[i0:i0 + inner], mean[c])
            s += a
            q += b
        sum_dy[c], sum_dy_xmu[c] = s, q
        m, ac, kc, cc = _elemt_coeffs(mean[c], invstd[c], w[c], s, q, n, dx)
        for o in range(outer):
            i0 = (o * C + c) * inner
            dys, xs, dxs = dy[i0:i0 + inner], x[i0:i0 + inner], dx[i0:i0 + inner]
            if relu:
                mh, sc, sh = fmh[c], fsc[c], fsh[c]
                for j in range(inner):
                    g = dys[j] * _relu_gate(xs[j], mh, sc, sh, one, zero)
                    dxs[j] = (cc + (xs[j] - m) * kc) + g * ac
            else:
                for j in range(inner):
                    dxs[j] = (cc + (xs[j] - m) * kc) + dys[j] * ac


@njit(**_SERIAL)
def cl_normalize_rows(x, y, m0, m1, C, mean_hi, scale, shift, relu):
    """Rows [m0, m1) of cl_normalize."""
    zero = x.dtype.type(0)
    for m in range(m0, m1):
        xr, yr = x[m * C:(m + 1) * C], y[m * C:(m + 1) * C]
        if relu:
            for c in range(C):
                yr[c] = np.maximum((xr[c] - mean_hi[c]) * scale[c] + shift[c], zero)
        else:
            for c in range(C):
                yr[c] = (xr[c] - mean_hi[c]) * scale[c] + shift[c]
