"""The elementwise step: y = (x - mean) * (invstd * weight) + bias.

Written as `(x - mean_hi) * scale + shift` with per-channel vectors computed in the
accumulation dtype. `mean_hi` is the mean rounded to the compute dtype; the rounding error
`mean - mean_hi` is folded into `shift`. For float32 input with float64 statistics this keeps
off-centre data exact to well under one float32 ulp of the mean (torch's `x * invstd + shift`
loses up to ~1 ulp at mean 1e4 on (N, C, H, W) input and ~17 ulps on (N, C) input, see
tests/test_numerics.py), and a constant input gives exactly `bias` (x - mean_hi == 0).
"""
from __future__ import annotations

import torch

from .activation import apply_act
from .stats import channel_view, compute_dtype


def inv_std(var, eps):
    """1 / sqrt(var + eps), with 0 where var + eps == 0: a zero-variance channel with eps=0
    has centred values exactly 0, so x_hat = 0 there and the output is exactly the bias
    (not 0/0). NaN stays NaN; differentiable (the rsqrt never sees the 0)."""
    if eps != 0:  # var >= 0, so var + eps > 0
        return torch.rsqrt(var + eps)
    zero = var == 0
    return torch.where(zero, 0.0, torch.rsqrt(torch.where(zero, 1.0, var)))


def affine_coeffs(mean, invstd, weight, bias, cdtype):
    """Per-channel (mean_hi, scale, shift), each (C,) in `cdtype`.

    scale = invstd * weight;  shift = bias - (mean - mean_hi) * scale.
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    mean_hi = mean.to(cdtype)
    shift = -(mean - mean_hi.to(mean.dtype)) * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return mean_hi, scale.to(cdtype), shift.to(cdtype)


def normalize(x, mean, invstd, weight=None, bias=None, axis=1, act="identity"):
    """Apply BN's elementwise step along channel `axis`; returns a tensor of x's dtype.

    Args:
        x: input (..., C, ...) with C at `axis` (>= 0).
        mean, invstd: (C,) statistics in the accumulation dtype.
        weight, bias: optional (C,) affine parameters.
        act: activation applied to the result ('identity', 'relu', 'silu', 'gelu').
    """
    cdtype = compute_dtype(x.dtype)
    mean_hi, scale, shift = affine_coeffs(mean, invstd, weight, bias, cdtype)
    nd = x.dim()
    xc = x.to(cdtype) - channel_view(mean_hi, nd, axis)
    y = torch.addcmul(channel_view(shift, nd, axis), xc, channel_view(scale, nd, axis))
    return apply_act(y, act).to(x.dtype)
