"""bnkit: Batch Normalization done right for PyTorch.

    import bnkit
    bn = bnkit.nn.BatchNorm2d(64)                       # drop-in for torch.nn.BatchNorm2d
    y = bnkit.functional.batch_norm(x, training=True)   # the one functional core
"""
from . import functional, kernels, nn
from ._version import __version__
from .kernels import available_backends, get_backend, set_backend

__all__ = ["__version__", "functional", "kernels", "nn", "set_backend", "get_backend",
           "available_backends"]
