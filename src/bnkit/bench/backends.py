"""The one place the benchmarks touch `bnkit.kernels`: which backends to time and how to
run a callable on one of them.

When the kernels change (a backend added or renamed, the native node's switch gone), this
file is what to adapt; the tables time whatever `cpu_backends()` lists, and the
Python-path variant only where `python_op` offers it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .. import kernels


def available() -> list[str]:
    """Every backend that can run here."""
    return kernels.available_backends()


def cpu_backends() -> list[str]:
    """The available backends that run CPU tensors, slowest first."""
    return [n for n in available() if n != "triton"]


def status() -> dict[str, str]:
    """{backend: one-line status}, recorded with every CPU table."""
    return kernels.backend_status()


def selected(x) -> str:
    """Name of the backend a BN call on `x` (channels at dim 1) runs on."""
    return kernels.select(x, 1).__name__.rsplit(".", 1)[-1]


def use(backend: str) -> None:
    """Select bnkit's `backend` for the calls that follow."""
    kernels.set_backend(backend)


def on(backend: str | None, fn: Callable) -> Callable:
    """fn run with bnkit's `backend` selected (the backward also asks for it), or as is."""
    if backend is None:
        return fn

    def run():
        kernels.set_backend(backend)
        return fn()
    return run


def python_op(fn: Callable) -> Callable | None:
    """fn on the 'cpu' backend through the Python autograd.Function (the native C++ node
    off), or None where there is no such choice to compare."""
    if "cpu" not in cpu_backends() or not hasattr(kernels, "use_native"):
        return None

    def run():
        kernels.set_backend("cpu")
        kernels.use_native(False)
        try:
            return fn()
        finally:
            kernels.use_native(True)
    return run


@contextmanager
def restored_backend() -> Iterator[None]:
    """The selected backend is put back on exit, whatever ran inside."""
    previous = kernels.get_backend()
    try:
        yield
    finally:
        kernels.set_backend(previous)
