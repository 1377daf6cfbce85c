"""Backends behind one dispatch.

A backend is a module with `NAME`, `available()`, `supports(x, axis, mask)` and the four
primitives of the core: `batch_stats`, `normalize`, `backward_reduce`, `backward_elemt`
(same signatures as in `bnkit.functional`). `auto` (the default) picks, per call, the first
available backend in `_AUTO_ORDER` that supports the input, and `reference` otherwise.
Choose with `bnkit.set_backend(name)` or the `BNKIT_BACKEND` environment variable.
"""
from __future__ import annotations

import importlib
import os

from . import reference

_KNOWN = ("reference", "cpu", "triton")
_AUTO_ORDER = ("triton", "cpu")
_loaded: dict[str, object] = {"reference": reference}
_current = os.environ.get("BNKIT_BACKEND", "auto")


def _load(name: str):
    """Import a backend module lazily; None when its optional dependency is missing."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            mod = None
        _loaded[name] = mod if mod is not None and mod.available() else None
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n in _KNOWN if _load(n) is not None]


def set_backend(name: str) -> None:
    """Select the backend: 'auto', 'reference', 'cpu' or 'triton'."""
    if name != "auto" and name not in _KNOWN:
        raise ValueError(f"unknown backend {name!r}: expected one of 'auto', "
                         f"{', '.join(repr(k) for k in _KNOWN)}")
    if name != "auto" and _load(name) is None:
        raise ValueError(f"backend {name!r} is not available here (available: "
                         f"{available_backends()}); install it with `pip install bnkit[fast]` "
                         "for 'cpu' or `bnkit[gpu]` for 'triton', or use 'auto'")
    global _current
    _current = name


def get_backend() -> str:
    """The selected backend name ('auto' unless set)."""
    return _current


def select(x, axis: int, mask=None):
    """The backend module that will run this input."""
    if _current != "auto":
        mod = _load(_current)
        return mod if mod is not None and mod.supports(x, axis, mask) else reference
    for name in _AUTO_ORDER:
        mod = _load(name)
        if mod is not None and mod.supports(x, axis, mask):
            return mod
    return reference
