"""C-callable forms of the one-call ops (`cpu_ops.forward_op`, `cpu_ops.backward_op`).

The native autograd op (`native.py`, `native.cpp`) calls these through plain function
pointers, so a layer's backward runs with no Python frame at all. Arguments are addresses
(int64), sizes (int64), flags (int64, 0 or 1) and the two float64 scalars; the dtype is
fixed per function: x, weight, bias and the running buffers all float32, or all float64
(other mixes keep the Python path). Built on first use, not on import: the parallel
kernels nested inside need numba's threading layer started first (`cpu._threads` does it),
and a cached cfunc that refers to it fails to link otherwise.

Signatures (C):
  int64 fwd(x, y, outer, C, inner, par, rows, pieces, width, w, b, has_w, has_b,
      eps: double, training, relu, mean, var, running_mean, running_var, update,
      momentum: double): the channels whose running statistics were left unchanged
  bwd(dy, x, dx, dz, outer, C, inner, par, fuse, rows, pieces, width, mean, var,
      eps: double, w, b, has_w, has_b, relu, count: double, training, sum_dy, sum_dy_xmu,
      dweight, dbias)
"""
from __future__ import annotations

import numpy as np
from numba import cfunc, njit, types

from . import cpu_ops as O

_I, _F = types.int64, types.float64
FWD_SIG = types.int64(*[_I] * 13, _F, *[_I] * 7, _F)
BWD_SIG = types.void(*[_I] * 14, _F, *[_I] * 5, _F, *[_I] * 5)
_W32 = np.empty(0, np.float32)  # dtype witnesses, frozen into the compiled code
_W64 = np.empty(0, np.float64)
_built: dict | None = None
_keep: list = []


@njit(**O._SERIAL)
def _fwd_body(lx, xa, ya, outer, C, inner, par, rows, pieces, width, wa, ba, has_w, has_b, eps,
              training, relu, ma, va, rma, rva, update, momentum):
    mean, var = O._view(ma, C, _W64), O._view(va, C, _W64)
    return O.forward_op(xa, ya, outer, C, inner, lx, par != 0, rows, pieces, width, wa, ba, lx,
                 has_w != 0, has_b != 0, eps, training != 0, relu != 0, mean, var, rma, rva, lx,
                 update != 0, momentum)


@njit(**O._SERIAL)
def _bwd_body(lx, dya, xa, dxa, za, outer, C, inner, par, fuse, rows, pieces, width, ma, va,
              eps, wa, ba, has_w, has_b, relu, cnt, training, sa, sxa, dwa, dba):
    s_dy, s_dyx = O._view(sa, C, _W64), O._view(sxa, C, _W64)
    dw, db = O._view(dwa, C, lx), O._view(dba, C, lx)
    O.backward_op(dya, xa, dxa, za, outer, C, inner, lx, par != 0, fuse != 0, rows, pieces,
                  width, ma, va, eps, wa, ba, lx, has_w != 0, has_b != 0, relu != 0, cnt,
                  training != 0, s_dy, s_dyx, dw, db)


# The C entry points, one per dtype; numba compiles them in `build()`, not at import.
def fwd32(xa, ya, outer, C, inner, par, rows, pieces, width, wa, ba, has_w, has_b, eps,
          training, relu, ma, va, rma, rva, update, momentum):
    return _fwd_body(_W32, xa, ya, outer, C, inner, par, rows, pieces, width, wa, ba, has_w,
                     has_b, eps, training, relu, ma, va, rma, rva, update, momentum)


def fwd64(xa, ya, outer, C, inner, par, rows, pieces, width, wa, ba, has_w, has_b, eps,
          training, relu, ma, va, rma, rva, update, momentum):
    return _fwd_body(_W64, xa, ya, outer, C, inner, par, rows, pieces, width, wa, ba, has_w,
                     has_b, eps, training, relu, ma, va, rma, rva, update, momentum)


def bwd32(dya, xa, dxa, za, outer, C, inner, par, fuse, rows, pieces, width, ma, va, eps,
          wa, ba, has_w, has_b, relu, cnt, training, sa, sxa, dwa, dba):
    _bwd_body(_W32, dya, xa, dxa, za, outer, C, inner, par, fuse, rows, pieces, width, ma, va, eps,
              wa, ba, has_w, has_b, relu, cnt, training, sa, sxa, dwa, dba)


def bwd64(dya, xa, dxa, za, outer, C, inner, par, fuse, rows, pieces, width, ma, va, eps,
          wa, ba, has_w, has_b, relu, cnt, training, sa, sxa, dwa, dba):
    _bwd_body(_W64, dya, xa, dxa, za, outer, C, inner, par, fuse, rows, pieces, width, ma, va, eps,
              wa, ba, has_w, has_b, relu, cnt, training, sa, sxa, dwa, dba)


def build() -> dict[str, tuple[int, int]]:
    """{'fwd': (float32 address, float64 address), 'bwd': (...)}: compiled, or loaded from
    numba's disk cache, once per process. Call after numba's threading layer is up."""
    global _built
    if _built is None:
        fns = {"fwd": [cfunc(FWD_SIG, cache=True)(f) for f in (fwd32, fwd64)],
               "bwd": [cfunc(BWD_SIG, cache=True)(f) for f in (bwd32, bwd64)]}
        _built = {k: tuple(f.address for f in v) for k, v in fns.items()}
        _keep.append(fns)  # the compiled code lives as long as these objects
    return _built
