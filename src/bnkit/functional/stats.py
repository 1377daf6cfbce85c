"""Batch statistics per channel: (count, mean, biased var), optionally masked, and their merge.

Every layer of the family gets its statistics here. The variance is always two-pass, from
the deviations d = x - mean0 of a first mean, never E[x^2] - E[x]^2, so inputs with
|mean|/std of 1e4 still normalize correctly; sums run in `acc_dtype(x)` (float64 for float32
input). The second pass also yields E[d], the rounding error of mean0 (the corrected
two-pass algorithm of Chan, Golub & LeVeque): mean = mean0 + E[d] is exact for a constant
input in any dtype, and var = E[d^2] - E[d]^2 (E[d] is rounding-sized: no cancellation).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Stats(NamedTuple):
    """Per-channel statistics of a batch. Shapes: count (), mean (C,), var (C,).

    `var` is the biased (population) variance, the one BN normalizes with.
    """

    count: torch.Tensor  # () number of values (valid positions) per channel
    mean: torch.Tensor
    var: torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float32/float64, float32 for half and bfloat16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Elementwise dtype: the input's own, except half/bfloat16 which compute in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def reduce_dims(ndim: int, axis: int) -> tuple[int, ...]:
    """All dimensions but the channel axis (axis already normalized to >= 0)."""
    return tuple(d for d in range(ndim) if d != axis)


def channel_view(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a (C,) vector so it broadcasts along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def mask_view(mask: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Insert the channel axis into a mask over the non-channel dims: (N, L) -> (N, 1, L)."""
    return mask.unsqueeze(axis) if mask.dim() == ndim - 1 else mask


def batch_stats(x: torch.Tensor, axis: int = 1, mask: torch.Tensor | None = None) -> Stats:
    """Two-pass statistics of `x` over every dim but `axis`, in `acc_dtype(x.dtype)`.

    With a boolean `mask` (broadcastable to x without its channel dim, already given the
    channel axis by `mask_view`), only the valid positions count, whatever the padding
    holds (NaN and Inf included: they are selected away, not multiplied by 0).
    Differentiable in x.
    """
    dims = reduce_dims(x.dim(), axis)
    xa = x.to(acc_dtype(x.dtype))
    if mask is None:
        count = torch.tensor(x.numel() // max(x.shape[axis], 1), dtype=xa.dtype, device=x.device)
        mean0 = xa.mean(dims)
        d = xa - channel_view(mean0, x.dim(), axis)
        return _corrected(count, mean0, d.mean(dims), (d * d).mean(dims))
    shape1 = list(x.shape)
    shape1[axis] = 1
    count = mask.to(xa.dtype).expand(shape1).sum()  # valid positions per channel, a scalar
    zero = xa.new_zeros(())
    # select, never multiply by the mask: padding may hold NaN or Inf (0 * NaN = NaN)
    mean0 = torch.where(mask, xa, zero).sum(dims) / count
    d = torch.where(mask, xa - channel_view(mean0, x.dim(), axis), zero)
    return _corrected(count, mean0, d.sum(dims) / count, (d * d).sum(dims) / count)


def _corrected(count, mean0, mean_d, mean_d2) -> Stats:
    """Stats from the first mean and the moments of d = x - mean0 (all (C,)).

    mean = mean0 + E[d]; var = E[d^2] - E[d]^2, clamped at 0 (a constant input gives
    d == 0 up to one rounding, and the difference may land a rounding below zero).
    """
    return Stats(count, mean0 + mean_d, (mean_d2 - mean_d * mean_d).clamp_min(0))


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Combine statistics of two disjoint sets (Chan et al. 1979), exact in exact arithmetic.

    n = na + nb; delta = mb - ma; mean = ma + delta * nb / n;
    M2 = M2a + M2b + delta^2 * na * nb / n, var = M2 / n. Empty parts (n = 0) are neutral.
    """
    n = a.count + b.count
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe_n)
    m2 = a.var * a.count + b.var * b.count + delta * delta * (a.count * b.count / safe_n)
    return Stats(n, mean, m2 / safe_n)


def merge_many(parts: torch.Tensor, counts: torch.Tensor) -> Stats:
    """Merge stacked per-part statistics in one shot.

    Args:
        parts: (P, 2, C) per-part mean and biased var.
        counts: (P,) or (P, C) per-part counts (zero for an empty part).
    Uses mean = sum(n_i m_i)/n and M2 = sum(n_i v_i) + sum(n_i (m_i - mean)^2), the
    P-way form of Chan's merge (the deviation is taken from the final mean, so no cancellation).
    """
    counts = counts.to(parts.dtype)
    if counts.dim() == 1:
        counts = counts[:, None].expand(-1, parts.shape[-1])
    n = counts.sum(0)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    mean = (counts * parts[:, 0]).sum(0) / safe_n
    dev = parts[:, 0] - mean
    m2 = (counts * parts[:, 1]).sum(0) + (counts * dev * dev).sum(0)
    return Stats(n, mean, m2 / safe_n)
