"""Backends behind one dispatch.

A backend is a module that meets `contract.Backend`: `NAME`, `available()`,
`supports(x, axis, mask)`, `status()` and the primitives of the core with the reference
signatures (`batch_stats`, `normalize`, `backward_reduce`, `backward_elemt`,
`act_backward`), optionally the one-call `fused_forward` / `fused_backward_op` and
InPlaceABN's `abn_forward` / `abn_backward_reduce` / `abn_backward_elemt`. Every
backend is listed once, in `BACKENDS` below. The custom ops in
`bnkit.functional.autograd` ask `select(x, axis, mask)` for the module, once per call.

Choosing: `bnkit.set_backend(name)` or the `BNKIT_BACKEND` environment variable (read on
first use; `set_backend` overrides it). 'auto' (the default) takes, per call, the first
available backend in `_AUTO_ORDER` (fastest first) whose `supports()` accepts the input,
else 'reference'. A named backend runs every input it supports; the rest runs on
'reference', so no input is refused. See docs/backends.md.

Example:
    >>> import bnkit
    >>> bnkit.set_backend("reference"); bnkit.get_backend()
    'reference'
    >>> bnkit.set_backend("auto")
"""
from __future__ import annotations

import importlib
import os

from . import reference

# The registration table: name -> (what to install when it is unavailable, its place in
# 'auto''s order, fastest first; None: never picked by 'auto'). Module: bnkit.kernels.<name>.
BACKENDS = {
    "reference": ("nothing (always available)", None),
    "cpu": ("bnkit built with its C++ extension bnkit._C (a C++ compiler at install time)", 1),
    "triton": ("bnkit[gpu] (triton and a CUDA GPU)", 0),
}
_KNOWN = tuple(BACKENDS)
_AUTO_ORDER = tuple(sorted((n for n in BACKENDS if BACKENDS[n][1] is not None),
                           key=lambda n: BACKENDS[n][1]))
_EXTRAS = {n: hint for n, (hint, _) in BACKENDS.items()}
_loaded: dict[str, object] = {"reference": reference}
_why: dict[str, str] = {}  # why a backend is unavailable
_current: str | None = None  # None until BNKIT_BACKEND is read (first use)
_auto: tuple | None = None  # the available modules of _AUTO_ORDER, loaded once


def _load(name: str):
    """Import a backend module lazily; None when its optional dependency is missing."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
            ok = mod.available()
            _why[name] = "" if ok else "available() is False on this machine"
        except ImportError as err:
            mod, ok = None, False
            _why[name] = f"import failed: {err}"
        _loaded[name] = mod if ok else None
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n in _KNOWN if _load(n) is not None]


def _validated(name, source: str) -> str:
    """`name` checked against the known and available backends; `source` names the setting."""
    if not isinstance(name, str) or name not in ("auto",) + _KNOWN:
        raise ValueError(f"unknown backend {name!r} from {source}: expected one of 'auto', "
                         f"{', '.join(repr(k) for k in _KNOWN)}")
    if name != "auto" and _load(name) is None:
        raise ValueError(f"backend {name!r} from {source} is not available here "
                         f"({_why[name]}; available: {available_backends()}); install "
                         f"{_EXTRAS.get(name, 'its dependency')} or use 'auto'")
    return name


def set_backend(name: str) -> None:
    """Select the backend: 'auto', 'reference', 'cpu' or 'triton' (overrides BNKIT_BACKEND)."""
    global _current
    _current = _validated(name, "set_backend()")


def get_backend() -> str:
    """The selected backend name ('auto' unless set or given by BNKIT_BACKEND)."""
    global _current
    if _current is None:
        raw = os.environ.get("BNKIT_BACKEND", "").strip().lower() or "auto"
        _current = _validated(raw, "the BNKIT_BACKEND environment variable")
    return _current


def _auto_modules() -> tuple:
    global _auto
    if _auto is None:
        _auto = tuple(m for m in map(_load, _AUTO_ORDER) if m is not None)
    return _auto


def select(x, axis: int, mask=None):
    """The backend module that will run this input (device, dtype, layout, mask)."""
    name = _current or get_backend()
    if name == "auto":
        for mod in _auto or _auto_modules():
            if mod.supports(x, axis, mask):
                return mod
        return reference
    mod = _loaded[name]
    return mod if mod.supports(x, axis, mask) else reference


def backend_status() -> dict[str, str]:
    """{name: one-line status} for every known backend, e.g. for `bnkit info`."""
    out = {}
    for name in _KNOWN:
        mod = _load(name)
        if mod is None:
            out[name] = f"unavailable: {_why[name]}"
        else:
            out[name] = getattr(mod, "status", lambda: "available")()
    return out


_native = False  # the `native` module when the node is on; None: off; False: not looked up yet


def use_native(flag: bool) -> None:
    """Turn the C++ autograd node on (looked up again at the next call) or off for this
    process, e.g. to compare it with the Python autograd.Function path."""
    global _native
    _native = False if flag else None


def native_module():
    """The `native` module (`native.call`) when the selected backend is 'auto' or 'cpu'
    and the 'cpu' backend (bnkit._C, which holds the C++ autograd node) is available and
    the node is not turned off (`use_native`), else None. See bnkit.kernels.native."""
    global _native
    if (_current or get_backend()) not in ("auto", "cpu"):
        return None
    if _native is False:
        _native = None
        if _load("cpu") is not None:
            from . import native
            _native = native
    return _native
