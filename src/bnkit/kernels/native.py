"""The native autograd op: a BN layer call as one C++ autograd node (`native.cpp`).

On small inputs a layer call is dominated by the machinery around the kernels, mostly
the autograd.Function's Python forward and backward frames (~90 us more per (60, 100)
layer call than torch's C++ node; docs/performance.md). This op moves the node to C++: the forward
and the backward call the numba one-call ops (`cpu_cfunc`) through C function pointers,
so backward runs with no Python at all. Results are the 'cpu' backend's, bit for bit:
the same compiled ops run.

It is optional. It needs a C++ compiler and ninja; torch builds it on first use (~1 min,
once: torch caches the build under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
and every failure leaves the Python path in charge. `BNKIT_NATIVE=0` turns it off,
`BNKIT_NATIVE=1` makes a failed build an error instead of a fallback. `status()` says
which applies; `bnkit info` prints it.

`plan(x, axis, training)` says whether x's layout qualifies (dense float32 or float64
below the huge-page size) and `call(...)` runs the op -> (y, stats). It returns
(None, None), touching nothing, for a call it does not take (parameters or buffers of
another dtype or device, inference-mode or expanded buffers, buffers that require grad, a
call the core rejects: the caller's Python path then validates it and explains the error).
`stats`, the (2C,) float64 mean | var, comes back only when the blend left some channels'
running statistics unchanged because their batch statistics were not finite (the caller
warns); else None. Identity or relu, no mask: the caller checks those.
"""
from __future__ import annotations

import functools
import os
import sys
import threading

import torch

from . import cpu
from . import cpu_layout as L

ENV = "BNKIT_NATIVE"
NAME = "bnkit_native"  # the extension's name: its build folder under TORCH_EXTENSIONS_DIR
_lock = threading.Lock()
_state: dict = {"op": None, "why": "not built yet: the first eligible layer call builds it "
                "(~1 min once, then cached)", "tried": False}
_DT = {torch.float32: 0, torch.float64: 1}
call = None  # op()'s C++ callable once built: call(x, weight, bias, running_mean,
#   running_var, counter, training, eps, momentum, update, relu, plan) -> (y, stats), or
#   (None, None) when the op declines the call


def _mode() -> str:
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw not in ("0", "1", "auto"):
        raise ValueError(f"{ENV} must be 0 (off), 1 (required) or auto (got {raw!r}); unset "
                         f"it for auto")
    return raw


def _graph_backward(dy, x, weight, bias, mv, training, eps, axis, relu):
    """Double backward (create_graph=True) through the native op: the core's differentiable
    formulas, statistics recomputed from x (as `_differentiable_bwd`). An absent weight or
    bias arrives as None; its gradient is computed and dropped by the node."""
    from ..functional.autograd import _differentiable_bwd
    c = x.shape[axis]
    count = torch.scalar_tensor(x.numel() // c, dtype=torch.float64)
    dx, dw, db = _differentiable_bwd(dy, x, weight, bias, mv[:c], mv[c:], count, None,
                                     training, eps, axis, "relu" if relu else "identity")
    return [dx, dw, db]


def _build():
    """Compile (or load) the extension and hand it the kernels; returns the op."""
    from torch.utils import cpp_extension

    from . import cpu_cfunc
    cpu._threads(1 << 30)  # start numba's threading layer: the cfuncs link against it
    addrs = cpu_cfunc.build()
    src = os.path.join(os.path.dirname(__file__), "native.cpp")
    if not os.path.exists(_built_path()):
        print("bnkit: building the native autograd op (once, ~1 min; BNKIT_NATIVE=0 skips "
              "it)", file=sys.stderr, flush=True)
    cpp_extension.load(NAME, [src], extra_cflags=["-O2"], is_python_module=False,
                       verbose=False)
    lib = torch.library.Library("bnkit", "FRAGMENT")
    lib.define("bn_backward_graph(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mv, "
               "bool training, float eps, int axis, bool relu) -> Tensor[]")
    lib.impl("bn_backward_graph", _graph_backward, "CompositeImplicitAutograd")
    _state["lib"] = lib  # the registration lives as long as this object
    torch.ops.bnkit_native.set_kernels(list(addrs["fwd"]), list(addrs["bwd"]))
    return torch.ops.bnkit_native.bn.default


def _built_path() -> str:
    """Where torch's cpp_extension keeps the built library (it may be stale: torch
    rebuilds it when the source changed)."""
    from torch.utils import cpp_extension
    return os.path.join(cpp_extension._get_build_directory(NAME, False), f"{NAME}.so")


def op():
    """The op, built on first call; None when off or the build failed (`status()`)."""
    if _state["op"] is not None or _state["tried"]:
        return _state["op"]
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            mode = _mode()
            if mode == "0":
                _state["why"] = f"off ({ENV}=0)"
            else:
                try:
                    _state["op"] = _build()
                    global call
                    call = _state["op"]._op  # the C++ callable, without OpOverload.__call__
                    _state["why"] = ""
                except Exception as err:
                    _state["why"] = f"build failed: {type(err).__name__}: {err}"[:300]
                    if mode == "1":
                        raise RuntimeError(f"{ENV}=1 but the native op could not be built "
                                           f"({_state['why']}); install a C++ compiler and "
                                           f"ninja, or unset {ENV}") from err
    return _state["op"]


def status() -> str:
    """One line for `bnkit info`."""
    if _state["op"] is not None:
        return "built (C++ autograd node over the cpu kernels)"
    try:
        mode = _mode()
    except ValueError as err:  # reported here; the first layer call raises it
        return str(err)
    if _state["tried"]:
        return _state["why"]
    if mode == "0":
        return f"off ({ENV}=0)"
    try:
        cached = os.path.exists(_built_path())
    except Exception:  # noqa: BLE001 - a diagnostic must not fail: unknown means not cached
        cached = False
    if cached:
        return f"not loaded yet; a build is cached ({os.path.dirname(_built_path())})"
    return _state["why"]


@functools.lru_cache(maxsize=256)
def _plan(shape, stride, axis, dtype, threads, training):
    lay = L._resolve(shape, stride, axis)
    if lay is None:
        return None
    kind, outer, c, inner = lay
    itemsize = 4 if dtype == 0 else 8
    if outer * c * inner * itemsize >= L.HUGE_MIN:
        return None  # large: per-call cost is noise there, and outputs want huge pages
    fuse = threads > 1 and training and cpu._fusable(lay, threads, itemsize)
    return [outer, c, inner, int(threads > 1), *cpu._split(kind, outer, c, inner, threads),
            int(fuse), dtype, axis]


def plan(x, axis, training):
    """The op's layout plan for x (a list of ints), or None when x is not a dense float32 or
    float64 CPU tensor below the huge-page size. `axis` is the channel axis, normalized.
    Everything else about the call (parameters, buffers, scalars) is checked by the op."""
    dt = _DT.get(x.dtype)
    if dt is None or not x.is_cpu:
        return None
    return _plan(x.shape, x.stride(), axis, dt, cpu._threads(x.numel()), training)
