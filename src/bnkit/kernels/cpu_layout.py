"""Memory layouts the 'cpu' backend runs on, flat numpy views, work splits and outputs.

A dense input maps to one of two views of its buffer (no copy):
  ("cf", outer, C, inner): contiguous with inner = prod(shape[axis+1:]) > 1, e.g. NCHW;
  ("cl", M, C, 1): channels innermost: contiguous with axis the last dim (N, C) / (N, L, C),
      or an NHWC / NDHWC tensor (torch.channels_last / channels_last_3d) with axis=1.
Anything else (transposed, sliced, expanded) gets None and runs on the reference backend.
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys

import torch

CHUNK = 65536  # values per reduction chunk: 256 KiB of float32, stays in L2 between passes
BLOCK = 65536  # values per elementwise task
SHIFT_ROWS = 4096  # rows per (M, C) statistics chunk: bounds cpu_numba._cl_shifted's error
_HUGE = 1 << 21  # 2 MiB transparent huge page
HUGE_MIN = 8 << 20  # outputs from this size get the huge-page advice (Linux)
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


def flat(t: torch.Tensor):
    """1-D numpy view of a dense tensor's values in memory order (never a copy: outputs are
    written through it). Axes sorted by stride make a channels-last array C-ordered."""
    a = t.detach().numpy()
    if not a.flags.c_contiguous:
        a = a.transpose(sorted(range(a.ndim), key=lambda d: -a.strides[d]))
    if a.flags.c_contiguous:
        return a.reshape(-1)
    return t.detach().as_strided((t.numel(),), (1,)).numpy()  # size-1 dims tie: exact route


def cf_split(outer: int, c: int, inner: int, threads: int) -> tuple[int, int, int]:
    """(rows, pieces, width): a chunk is `rows` whole rows of `inner` values, or, for rows
    longer than CHUNK, one of `pieces` slices of `width` values. Enough chunks to feed
    every thread even for a single channel (Chan merge joins them)."""
    per_channel = outer * inner
    target = min(CHUNK, max(1024, -(-c * per_channel // (4 * threads))))
    if inner >= target:
        pieces = -(-inner // target)
        return 1, pieces, -(-inner // pieces)
    return max(1, target // inner), 1, inner


def cl_rows(m: int, c: int, threads: int) -> int:
    """Rows per reduction chunk of an (M, C) view: about CHUNK values, >= 4 chunks/thread,
    at most SHIFT_ROWS (the one-pass float32 statistics' error bound)."""
    return max(1, min(CHUNK // max(c, 1), SHIFT_ROWS, -(-m // (4 * threads))))


_libc = None


def _advise_huge(t: torch.Tensor) -> None:
    """Ask Linux to back a large fresh buffer with 2 MiB pages: first-touch page faults cost
    more than the kernel itself otherwise (measured: filling a new 51 MB tensor 55 ms with
    4 KiB pages, 17 ms with huge pages, 8 ms reused). A hint only; harmless if refused."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + t.nbytes) & ~(_HUGE - 1)
    if end > start:
        _libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (keeps the memory format), huge-page backed when large on Linux."""
    out = torch.empty_like(x)
    if out.nbytes >= HUGE_MIN and sys.platform.startswith("linux"):
        _advise_huge(out)
    return out
