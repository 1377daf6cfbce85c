"""The exceptions bnkit raises for a bad call, in one place (docs/errors.md).

Each class also derives from the built-in exception torch raises for the same mistake, so
code written against torch.nn.BatchNorm (`except RuntimeError`, `except ValueError`) keeps
catching bnkit's errors after a drop-in swap, and `except bnkit.errors.BatchNormError`
catches all of them:

    BatchNormError                     every error below
      BNTypeError(TypeError)           an argument of the wrong Python type
        BNDTypeError(ValueError, NotImplementedError)  a tensor of the wrong dtype (torch:
                                       NotImplementedError, RuntimeError or ValueError)
      BNValueError(ValueError)         a value out of range, a wrong rank, too few values
        BNShapeError(RuntimeError)     a per-channel tensor or mask that does not fit the input
        BNDeviceError(RuntimeError)    tensors on different devices
        BNStateError(RuntimeError)     running buffers missing in eval, or that cannot be
                                       updated in place (expanded, requiring grad,
                                       inference-mode tensors)

NotImplementedError is a subclass of RuntimeError, so every error torch raises as a
RuntimeError is caught by `except RuntimeError` here too.
"""
from __future__ import annotations

__all__ = ["BNDTypeError", "BNDeviceError", "BNShapeError", "BNStateError", "BNTypeError",
           "BNValueError", "BatchNormError"]


class BatchNormError(Exception):
    """Base class of every error bnkit raises for a bad call."""


class BNTypeError(BatchNormError, TypeError):
    """An argument of the wrong Python type (a list for a tensor, a str for a float)."""


class BNDTypeError(BNTypeError, ValueError, NotImplementedError):
    """A tensor of the wrong dtype (an integer input or running buffer, an input whose dtype
    differs from a recurrent layer's weights); torch raises NotImplementedError,
    RuntimeError or (recurrent layers) ValueError for these."""


class BNValueError(BatchNormError, ValueError):
    """A value out of range, an input of the wrong rank, too few values per channel."""


class BNShapeError(BNValueError, RuntimeError):
    """A per-channel tensor or a mask whose shape does not fit the input (torch raises
    RuntimeError for a running_mean or weight of the wrong size)."""


class BNDeviceError(BNValueError, RuntimeError):
    """Tensors of one call on different devices (torch: RuntimeError)."""


class BNStateError(BNValueError, RuntimeError):
    """Running buffers that are missing in eval mode or cannot be updated in place (torch:
    RuntimeError)."""
