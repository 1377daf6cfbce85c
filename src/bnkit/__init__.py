"""bnkit: Batch Normalization done right for PyTorch.

    import bnkit
    bn = bnkit.nn.BatchNorm2d(64)                       # drop-in for torch.nn.BatchNorm2d
    y = bnkit.functional.batch_norm(x, training=True)   # the one functional core
    fast = bnkit.fold(model)                            # model tools: fold, recalibrate, ...
"""
from . import errors, functional, kernels, nn, tools
from ._version import __version__
from .kernels import available_backends, get_backend, set_backend
from .tools import adapt, convert, fold, freeze, recalibrate, unfreeze
from .tools import inspect as inspect  # re-exported, kept out of __all__ (below)

# `inspect` stays out of __all__: `from bnkit import *` must not shadow the standard library's
# inspect module (use bnkit.inspect or bnkit.tools.inspect).
__all__ = ["__version__", "adapt", "available_backends", "convert", "errors", "fold", "freeze",
           "functional", "get_backend", "kernels", "nn", "recalibrate", "set_backend", "tools",
           "unfreeze"]

# Imported on first access, so `import bnkit` stays light: bnkit.data, bnkit.demo, ...
_LAZY = ("bench", "data", "demo", "lab")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
