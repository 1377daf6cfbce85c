"""Triton kernels of the GPU backend: one reduction for the statistics, one for the backward
reduce, and one elementwise kernel for normalize, the activation's derivative and dx; and
InPlaceABN's three (its forward write, and the backward's reduction and dx from y alone).

Every kernel walks tiles of the 2-D view described in `triton_layout` (rows x unit-stride
columns; CL: columns are channels, CF: one channel per program). Per-channel vectors come in
one (V, C) tensor in the compute dtype; its element type is the dtype the kernels compute in.
Importing this module needs Triton; with TRITON_INTERPRET=1 set before the import the kernels
run on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton import interpreting

INTERPRETED = interpreting()  # how the kernels below are defined: interpreted or compiled

# activation codes shared with the front module: identity, relu, silu, gelu
ACT_CODES = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3}
# elementwise ops: y = act(z); dz = dy * act'(z); dx = a dz + m (k (x - mean_hi) + c)
OP_NORMALIZE, OP_ACT_GRAD, OP_ELEMT = 0, 1, 2


@triton.jit
def _act(z, ACT: tl.constexpr):
    """f(z) for the fused activation."""
    if ACT == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        return z * tl.sigmoid(z)
    elif ACT == 3:  # exact GELU: z * Phi(z)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """f'(z), the factor dz = dy * f'(z)."""
    if ACT == 1:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:  # s + z s (1 - s)
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 3:  # Phi(z) + z phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        return z * 0.0 + 1.0


@triton.jit
def _chan(vec_ptr, row, C, a, k, CL: tl.constexpr):
    """Per-channel value row `row` of the (V, C) vectors: a scalar (CF) or a (1, BK) row (CL)."""
    if CL:
        return tl.load(vec_ptr + row * C + k, mask=k < C, other=0.0)[None, :]
    else:
        return tl.load(vec_ptr + row * C + a)


@triton.jit
def _tile(a, r0, k0, r_end, k_end, row_stride, chan_stride, mrow, mcol, m_ptr,
          CL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """(offsets, in-bounds, weight 0/1, column indices) of one (BLOCK_R, BLOCK_K) tile."""
    r = r0 + tl.arange(0, BLOCK_R)
    k = k0 + tl.arange(0, BLOCK_K)
    inb = (r < r_end)[:, None] & (k < k_end)[None, :]
    offs = r.to(tl.int64)[:, None] * row_stride + k[None, :]
    if not CL:
        offs += a.to(tl.int64) * chan_stride
    w = inb
    if HAS_MASK:  # the mask is flattened over the non-channel dims in logical order
        moffs = r.to(tl.int64)[:, None] * mrow + k[None, :] * mcol
        w = inb & (tl.load(m_ptr + moffs, mask=inb, other=0) != 0)
    return offs, inb, w, k


@triton.jit
def _ranges(a, p, rows, cols, rows_per, cols_per, splits_k, CL: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """Row and column range of reduction program (a, p)."""
    r_start = (p // splits_k) * rows_per
    if CL:
        k_start = a * BLOCK_K
        k_end = tl.minimum(k_start + BLOCK_K, cols)
    else:
        k_start = (p % splits_k) * cols_per
        k_end = tl.minimum(k_start + cols_per, cols)
    return r_start, tl.minimum(r_start + rows_per, rows), k_start, k_end


@triton.jit
def _store_part(part_ptr, plane, p, C, a, k, k_end, v, CL: tl.constexpr):
    """Store partial `plane` of part[(planes, P, C)]: a vector over channels k (CL) or the
    scalar of channel a (CF)."""
    if CL:
        tl.store(part_ptr + (plane * tl.num_programs(1) + p) * C + k, v, mask=k < k_end)
    else:
        tl.store(part_ptr + (plane * tl.num_programs(1) + p) * C + a, v)


@triton.jit
def _store_sums(part_ptr, p, C, a, k, k_end, s0, s1, CL: tl.constexpr):
    """Store a backward reduce's two partial sums (planes 0 and 1 of part[(2, P, C)]): the
    per-channel vectors (CL), or their totals for channel a (CF: the vectors are its
    columns)."""
    if not CL:
        s0 = tl.sum(s0, axis=0)
        s1 = tl.sum(s1, axis=0)
    _store_part(part_ptr, 0, p, C, a, k, k_end, s0, CL)
    _store_part(part_ptr, 1, p, C, a, k, k_end, s1, CL)


@triton.jit
def stats_kernel(x_ptr, m_ptr, pos_ptr, part_ptr, shift_ptr, rows, cols, C, row_stride,
                 chan_stride, mrow, mcol, rows_per, cols_per, splits_k,
                 CL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Partial (count, mean, M2) of program (a, p) into part[(3, P, C)], on shifted data.

    The shift K (one valid value per channel, at flat position pos) keeps float32 partial
    means small, so off-centre data loses no precision: stats of x - K, mean = K + mean'.
    Tiles: two-pass (count, mean, M2) in registers, then Chan's merge into per-column
    accumulators; CF merges the columns at the end (P-way Chan), CL stores them.
    """
    a = tl.program_id(0)
    p = tl.program_id(1)
    acc = part_ptr.dtype.element_ty
    r_start, r_end, k_start, k_end = _ranges(a, p, rows, cols, rows_per, cols_per, splits_k,
                                             CL, BLOCK_K)
    if HAS_MASK:  # flat index of the first valid position
        pos = tl.load(pos_ptr).to(tl.int64)
    else:
        pos = tl.full([], 0, tl.int64)
    if CL:
        kk = k_start + tl.arange(0, BLOCK_K)
        kvec = tl.load(x_ptr + pos * row_stride + kk, mask=kk < k_end, other=0.0).to(acc)
        shift = kvec[None, :]
    else:
        shift = tl.load(x_ptr + a.to(tl.int64) * chan_stride + (pos // cols) * row_stride
                        + pos % cols).to(acc)
    cnt = tl.zeros([BLOCK_K], dtype=acc)
    mean = tl.zeros([BLOCK_K], dtype=acc)
    m2 = tl.zeros([BLOCK_K], dtype=acc)
    for r0 in range(r_start, r_end, BLOCK_R):
        for k0 in range(k_start, k_end, BLOCK_K):
            offs, inb, w, k = _tile(a, r0, k0, r_end, k_end, row_stride, chan_stride, mrow,
                                    mcol, m_ptr, CL, HAS_MASK, BLOCK_R, BLOCK_K)
            # padding is selected away, not multiplied by 0: it may hold NaN or Inf
            x = tl.where(w, tl.load(x_ptr + offs, mask=inb, other=0.0).to(acc) - shift, 0.0)
            n_t = tl.sum(w.to(acc), axis=0)
            mean_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
            d = tl.where(w, x - mean_t[None, :], 0.0)
            frac = n_t / tl.maximum(cnt + n_t, 1.0)  # Chan: nb / (na + nb)
            delta = mean_t - mean
            m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * cnt * frac
            mean = mean + delta * frac
            cnt = cnt + n_t
    k = k_start + tl.arange(0, BLOCK_K)
    if CL:
        if p == 0:
            tl.store(shift_ptr + k, kvec, mask=k < k_end)
    else:  # P-way merge of the columns: deviations from the common mean, no cancellation
        if p == 0:
            tl.store(shift_ptr + a, shift)
        n_all = tl.sum(cnt, axis=0)
        mean_all = tl.sum(cnt * mean, axis=0) / tl.maximum(n_all, 1.0)
        dev = mean - mean_all
        m2 = tl.sum(m2 + cnt * dev * dev, axis=0)
        cnt, mean = n_all, mean_all
    _store_part(part_ptr, 0, p, C, a, k, k_end, cnt, CL)
    _store_part(part_ptr, 1, p, C, a, k, k_end, mean, CL)
    _store_part(part_ptr, 2, p, C, a, k, k_end, m2, CL)


@triton.jit
def reduce_kernel(x_ptr, dy_ptr, vec_ptr, part_ptr, rows, cols, C, row_stride, chan_stride,
                  rows_per, cols_per, splits_k, CL: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (sum dz, sum dz (x - mean_hi)) of program (a, p) into part[(2, P, C)].

    dz = dy * act'(z), z = (x - mean_hi) * scale + shift recomputed from x (ACT > 0), else dy.
    vec rows: mean_hi, scale, shift.
    """
    a = tl.program_id(0)
    p = tl.program_id(1)
    acc = part_ptr.dtype.element_ty
    r_start, r_end, k_start, k_end = _ranges(a, p, rows, cols, rows_per, cols_per, splits_k,
                                             CL, BLOCK_K)
    kk = k_start + tl.arange(0, BLOCK_K)
    mean_hi = _chan(vec_ptr, 0, C, a, kk, CL).to(acc)
    s_dy = tl.zeros([BLOCK_K], dtype=acc)
    s_dyx = tl.zeros([BLOCK_K], dtype=acc)
    for r0 in range(r_start, r_end, BLOCK_R):
        for k0 in range(k_start, k_end, BLOCK_K):
            offs, inb, _w, _k = _tile(a, r0, k0, r_end, k_end, row_stride, chan_stride, 0, 0,
                                    x_ptr, CL, False, BLOCK_R, BLOCK_K)
            xc = tl.load(x_ptr + offs, mask=inb, other=0.0).to(acc) - mean_hi
            dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(acc)
            if ACT != 0:
                z = xc * _chan(vec_ptr, 1, C, a, kk, CL) + _chan(vec_ptr, 2, C, a, kk, CL)
                dy = dy * _act_grad(z, ACT)
            dy = tl.where(inb, dy, 0.0)
            s_dy = s_dy + tl.sum(dy, axis=0)
            s_dyx = s_dyx + tl.sum(dy * xc, axis=0)
    _store_sums(part_ptr, p, C, a, kk, k_end, s_dy, s_dyx, CL)


@triton.jit
def elementwise_kernel(x_ptr, dy_ptr, m_ptr, vec_ptr, out_ptr, rows, cols, C, row_stride,
                       chan_stride, mrow, mcol, n_rb, n_kb, CL: tl.constexpr,
                       OP: tl.constexpr, ACT: tl.constexpr, CORR: tl.constexpr,
                       HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """One tile of: OP_NORMALIZE y = act(z); OP_ACT_GRAD dy * act'(z); OP_ELEMT dx.

    z = (x - mean_hi) * scale + shift. dx = a dz + m (k (x - mean_hi) + c) with the
    correction only when CORR (training), dz = dy * act'(z) when ACT > 0.
    vec rows: mean_hi, scale, shift, a, k, c (compute dtype = vec's element type).
    """
    pid = tl.program_id(0)
    a = pid // (n_rb * n_kb)
    rb = (pid // n_kb) % n_rb
    kb = pid % n_kb
    cdt = vec_ptr.dtype.element_ty
    offs, inb, w, k = _tile(a, rb * BLOCK_R, kb * BLOCK_K, rows, cols, row_stride,
                            chan_stride, mrow, mcol, m_ptr, CL, HAS_MASK, BLOCK_R, BLOCK_K)
    if OP == 2 and not CORR and ACT == 0:
        xc = 0.0  # eval without activation: dx = a dy, x is not read
    else:
        xc = tl.load(x_ptr + offs, mask=inb, other=0.0).to(cdt) - _chan(vec_ptr, 0, C, a, k, CL)
    if OP == 0:
        z = xc * _chan(vec_ptr, 1, C, a, k, CL) + _chan(vec_ptr, 2, C, a, k, CL)
        out = _act(z, ACT)
    else:
        out = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(cdt)
        if ACT != 0:
            z = xc * _chan(vec_ptr, 1, C, a, k, CL) + _chan(vec_ptr, 2, C, a, k, CL)
            out = out * _act_grad(z, ACT)
        if OP == 2:
            out = out * _chan(vec_ptr, 3, C, a, k, CL)
            if CORR:
                corr = xc * _chan(vec_ptr, 4, C, a, k, CL) + _chan(vec_ptr, 5, C, a, k, CL)
                out = out + tl.where(w, corr, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


# ---- InPlaceABN (bnkit.functional.inplace_abn): y = f(BN(x)) and its backward from y --------
# Activation codes: identity, leaky_relu (slope p), elu (alpha p). Per-channel vectors come in
# the compute dtype (so are p, 1/p and elu's clamp -1 + eps, one row each: a float argument
# would be float32).
ABN_ACT_CODES = {"identity": 0, "leaky_relu": 1, "elu": 2}


@triton.jit
def _expm1_neg(z):
    """e^z - 1 for z <= 0, accurate near 0 (Kahan: (u - 1) z / log u with u = e^z)."""
    u = tl.exp(z)
    ok = (u != 1.0) & (u > 1e-30)
    lu = tl.log(tl.where(ok, u, 2.0))
    return tl.where(ok, (u - 1.0) * z / lu, tl.where(u == 1.0, z, u - 1.0))


@triton.jit
def _log1p(u):
    """log(1 + u) for u > -1, accurate near 0 (Goldberg: log(w) u / (w - 1), w = 1 + u)."""
    w = 1.0 + u
    d = w - 1.0
    return tl.where(d == 0.0, u, tl.log(w) * u / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _abn_act(z, p, ACT: tl.constexpr):
    """f(z): leaky_relu (slope p), elu (alpha p) or identity."""
    if ACT == 1:
        return tl.where(z > 0, z, z * p)
    elif ACT == 2:
        return tl.where(z <= 0, _expm1_neg(tl.minimum(z, 0.0)) * p, z)
    else:
        return z


@triton.jit
def _abn_recover(y, g, r, h, p, inv_p, lo, ACT: tl.constexpr):
    """(dz, x - mu) from y and dy: z = f^-1(y), dz = dy f'(z) read from y, x - mu = z r + h."""
    if ACT == 1:
        z = tl.where(y > 0, y, y * inv_p)
        dz = tl.where(y > 0, g, g * p)
    elif ACT == 2:
        p_safe = tl.where(p == 0, 1.0, p)  # 0 only in a tile's padding (channels-last)
        z = tl.where(y > 0, y, _log1p(tl.maximum(y / p_safe, lo)))
        dz = tl.where(y <= 0, g * (y + p), g)
    else:
        z = y
        dz = g
    return dz, z * r + h


@triton.jit
def abn_forward_kernel(x_ptr, out_ptr, vec_ptr, rows, cols, C, row_stride, chan_stride, n_rb,
                       n_kb, CL: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """One tile of y = f((x - mean_hi) * scale + shift) into out (which may be x: each value
    is loaded before it is stored). vec rows: mean_hi, scale, shift, p."""
    pid = tl.program_id(0)
    a = pid // (n_rb * n_kb)
    rb = (pid // n_kb) % n_rb
    kb = pid % n_kb
    cdt = vec_ptr.dtype.element_ty
    offs, inb, _w, k = _tile(a, rb * BLOCK_R, kb * BLOCK_K, rows, cols, row_stride,
                             chan_stride, 0, 0, x_ptr, CL, False, BLOCK_R, BLOCK_K)
    xc = tl.load(x_ptr + offs, mask=inb, other=0.0).to(cdt) - _chan(vec_ptr, 0, C, a, k, CL)
    z = xc * _chan(vec_ptr, 1, C, a, k, CL) + _chan(vec_ptr, 2, C, a, k, CL)
    y = _abn_act(z, _chan(vec_ptr, 3, C, a, k, CL), ACT)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def abn_reduce_kernel(y_ptr, dy_ptr, vec_ptr, part_ptr, rows, cols, C, row_stride,
                      chan_stride, rows_per, cols_per, splits_k, CL: tl.constexpr,
                      ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (sum dz, sum dz (x - mu)) of program (a, p) into part[(2, P, C)], both
    recovered from y and dy. vec rows: r, h, p, 1/p, lo."""
    a = tl.program_id(0)
    p = tl.program_id(1)
    acc = part_ptr.dtype.element_ty
    cdt = vec_ptr.dtype.element_ty
    r_start, r_end, k_start, k_end = _ranges(a, p, rows, cols, rows_per, cols_per, splits_k,
                                             CL, BLOCK_K)
    kk = k_start + tl.arange(0, BLOCK_K)
    r = _chan(vec_ptr, 0, C, a, kk, CL)
    h = _chan(vec_ptr, 1, C, a, kk, CL)
    ap = _chan(vec_ptr, 2, C, a, kk, CL)
    inv_p = _chan(vec_ptr, 3, C, a, kk, CL)
    lo = _chan(vec_ptr, 4, C, a, kk, CL)
    s_dz = tl.zeros([BLOCK_K], dtype=acc)
    s_dzx = tl.zeros([BLOCK_K], dtype=acc)
    for r0 in range(r_start, r_end, BLOCK_R):
        for k0 in range(k_start, k_end, BLOCK_K):
            offs, inb, _w, _k = _tile(a, r0, k0, r_end, k_end, row_stride, chan_stride, 0, 0,
                                      y_ptr, CL, False, BLOCK_R, BLOCK_K)
            y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(cdt)
            g = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(cdt)
            dz, xmu = _abn_recover(y, g, r, h, ap, inv_p, lo, ACT)
            dz = tl.where(inb, dz, 0.0).to(acc)
            xmu = tl.where(inb, xmu, 0.0).to(acc)
            s_dz = s_dz + tl.sum(dz, axis=0)
            s_dzx = s_dzx + tl.sum(dz * xmu, axis=0)
    _store_sums(part_ptr, p, C, a, kk, k_end, s_dz, s_dzx, CL)


@triton.jit
def abn_dx_kernel(y_ptr, dy_ptr, vec_ptr, out_ptr, rows, cols, C, row_stride, chan_stride,
                  n_rb, n_kb, CL: tl.constexpr, ACT: tl.constexpr, CORR: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of dx = (c + (x - mu) k) + dz a (CORR: training) or dz a, with dz and x - mu
    recovered from y and dy. vec rows: r, h, p, 1/p, lo, a, k, c."""
    pid = tl.program_id(0)
    a = pid // (n_rb * n_kb)
    rb = (pid // n_kb) % n_rb
    kb = pid % n_kb
    cdt = vec_ptr.dtype.element_ty
    offs, inb, _w, k = _tile(a, rb * BLOCK_R, kb * BLOCK_K, rows, cols, row_stride,
                             chan_stride, 0, 0, y_ptr, CL, False, BLOCK_R, BLOCK_K)
    y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(cdt)
    g = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(cdt)
    dz, xmu = _abn_recover(y, g, _chan(vec_ptr, 0, C, a, k, CL), _chan(vec_ptr, 1, C, a, k, CL),
                           _chan(vec_ptr, 2, C, a, k, CL), _chan(vec_ptr, 3, C, a, k, CL),
                           _chan(vec_ptr, 4, C, a, k, CL), ACT)
    dx = dz * _chan(vec_ptr, 5, C, a, k, CL)
    if CORR:
        dx = (_chan(vec_ptr, 7, C, a, k, CL) + xmu * _chan(vec_ptr, 6, C, a, k, CL)) + dx
    tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=inb)
