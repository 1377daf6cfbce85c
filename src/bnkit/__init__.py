"""bnkit: Batch Normalization done right for PyTorch.

    import bnkit
    bn = bnkit.nn.BatchNorm2d(64)                       # drop-in for torch.nn.BatchNorm2d
    y = bnkit.functional.batch_norm(x, training=True)   # the one functional core
    fast = bnkit.fold(model)                            # model tools: fold, recalibrate, ...
"""
from . import errors, functional, kernels, nn, tools
from ._version import __version__
from .kernels import available_backends, get_backend, set_backend
from .tools import adapt, convert, fold, freeze, inspect, recalibrate, unfreeze

__all__ = ["__version__", "adapt", "available_backends", "convert", "errors", "fold", "freeze",
           "functional", "get_backend", "inspect", "kernels", "nn", "recalibrate", "set_backend",
           "tools", "unfreeze"]
