"""Memory layouts the 'cpu' backend runs on (the C++ kernels' `View`, csrc/layout.h).

A dense input maps to one of two views of its buffer (no copy):
  ("cf", outer, C, inner): contiguous with inner = prod(shape[axis+1:]) > 1, e.g. NCHW;
  ("cl", M, C, 1): channels innermost: contiguous with axis the last dim (N, C) / (N, L, C),
      or an NHWC / NDHWC tensor (torch.channels_last / channels_last_3d) with axis=1.
Anything else (transposed, sliced, expanded) gets None and runs on the reference backend.
"""
from __future__ import annotations

import functools
import math

import torch

CHUNK = 65536  # values per reduction chunk (csrc/layout.h)
SHIFT_ROWS = 4096  # rows per (M, C) one-pass float32 statistics chunk: bounds its error
_CL_RANKS = (4, 5)  # NHWC (torch.channels_last) and NDHWC (torch.channels_last_3d)


def resolve(x: torch.Tensor, axis: int):
    """(kind, outer, C, inner) of x's buffer seen along `axis`, or None if not dense."""
    return _resolve(x.shape, x.stride(), axis)


@functools.lru_cache(maxsize=1024)
def _resolve(shape, stride, axis):
    """resolve() from sizes and strides alone (cached: a layer sees a few shapes)."""
    c = shape[axis]
    if _dense_in(shape, stride, range(len(shape))):
        outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        return ("cf", outer, c, inner) if inner > 1 else ("cl", outer, c, 1)
    nhwc_order = (0, *range(2, len(shape)), 1)  # channels innermost (NHWC / NDHWC)
    if axis == 1 and len(shape) in _CL_RANKS and _dense_in(shape, stride, nhwc_order):
        return ("cl", math.prod(shape) // max(c, 1), c, 1)
    return None


def _dense_in(shape, stride, order) -> bool:
    """The dims, taken in `order` (outermost first), tile memory without gaps: torch's
    is_contiguous rule (strides of size-1 dims do not matter) for that dim order."""
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return False
        expected *= shape[d]
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when b can share a's flat indexing (same shape, strides and dtype)."""
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def cl_rows(m: int, c: int, threads: int) -> int:
    """Rows per reduction chunk of an (M, C) view (csrc/layout.h cl_rows): about CHUNK
    values, >= 4 chunks per thread, at most SHIFT_ROWS."""
    return max(1, min(CHUNK // max(c, 1), SHIFT_ROWS, -(-m // (4 * threads))))
