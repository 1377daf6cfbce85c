"""BN backward split like PyTorch's: a per-channel reduce step, then an elementwise step.

Forward (per channel, n valid values, m_i = 1 for a valid position, 0 for padding):
    mu = sum(m x)/n,  var = sum(m (x - mu)^2)/n,  s = (var + eps)^-1/2,
    y_j = (x_j - mu) s w + b          for every position j, valid or not.
Backward (derived in docs/math.md):
    sum_dy = sum_j dy_j,   sum_dy_xmu = sum_j dy_j (x_j - mu)       (over all positions)
    dbias = sum_dy,        dweight = sum_dy_xmu * s
    dx_i  = w s [dy_i - m_i (sum_dy/n + (x_i - mu) s^2 sum_dy_xmu/n)]   (training)
    dx_i  = w s dy_i                                                 (eval: stats are constants)
Sync BN all-reduces (sum_dy, sum_dy_xmu) between the two steps; ghost BN reduces per chunk.
"""
from __future__ import annotations

import torch

from .activation import act_grad
from .normalize import normalize
from .stats import acc_dtype, channel_view, compute_dtype, reduce_dims


def backward_reduce(dy, x, mean, axis=1):
    """(sum_dy, sum_dy_xmu), each (C,) in the accumulation dtype, over all positions."""
    dims = reduce_dims(x.dim(), axis)
    adt = acc_dtype(x.dtype)
    dya = dy.to(adt)
    xmu = x.to(adt) - channel_view(mean.to(adt), x.dim(), axis)
    return dya.sum(dims), (dya * xmu).sum(dims)


def grad_affine(sum_dy, sum_dy_xmu, invstd):
    """(dweight, dbias) from the reduce step."""
    return sum_dy_xmu * invstd, sum_dy


def elemt_coeffs(mean, invstd, weight, sum_dy, sum_dy_xmu, count, cdtype, training=True):
    """Per-channel (mean_hi, a, k, c) of the elementwise step, each (C,) in `cdtype`.

    a = w s, k = -a s^2 sum_dy_xmu/n, c = -a sum_dy/n - k (mean - mean_hi); in eval k = c = 0.
    """
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    mean_hi = mean.to(cdtype)
    if not training:  # the statistics are constants: dx = a dy
        zero = torch.zeros_like(a, dtype=cdtype)
        return mean_hi, a.to(cdtype), zero, zero
    n = count.to(invstd.dtype)
    k = -a * invstd * invstd * sum_dy_xmu / n
    c = -a * sum_dy / n - k * (mean - mean_hi.to(mean.dtype))
    return mean_hi, a.to(cdtype), k.to(cdtype), c.to(cdtype)


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis=1,
                   mask=None, training=True):
    """dx = a dy + m (k (x - mean_hi) + c) with `elemt_coeffs`. Output has dy's dtype.
    In eval, dx = a dy."""
    cdtype = compute_dtype(x.dtype)
    nd = x.dim()
    mean_hi, a, k, c = elemt_coeffs(mean, invstd, weight, sum_dy, sum_dy_xmu, count, cdtype,
                                    training)
    dyc = dy.to(cdtype)
    if not training:
        return (dyc * channel_view(a, nd, axis)).to(dy.dtype)
    xc = x.to(cdtype) - channel_view(mean_hi, nd, axis)
    corr = torch.addcmul(channel_view(c, nd, axis), xc, channel_view(k, nd, axis))
    if mask is not None:  # selected, not multiplied: corr is NaN where padding holds NaN
        corr = torch.where(mask, corr, corr.new_zeros(()))
    return torch.addcmul(corr, dyc, channel_view(a.to(cdtype), nd, axis)).to(dy.dtype)


def padding_safe(x, dy, mean, mask, axis=1):
    """x for the masked backward: padded positions whose upstream gradient is 0 get the
    channel mean instead of their value, so they add exactly 0 to the sums and to dx
    whatever they hold (NaN, Inf: 0 * NaN would be NaN). Exact: with dy = 0 a finite
    padded value contributes 0 anyway, and a padded position with dy != 0 keeps its value
    (its output depends on the statistics, so its gradient reaches weight, bias and the
    valid inputs). x itself when there is no mask (given its channel axis by `mask_view`)."""
    if mask is None:
        return x
    keep = mask | (dy != 0)
    return torch.where(keep, x, channel_view(mean.to(x.dtype), x.dim(), axis))


def act_backward(dy, x, mean, invstd, weight, bias, axis=1, act="identity"):
    """dz = dy * f'(z) with z = BN(x) recomputed (not stored: one less tensor kept alive)."""
    if act == "identity":
        return dy
    z = normalize(x, mean, invstd, weight, bias, axis)
    return act_grad(dy, z, act)
