"""BatchNorm1d/2d/3d, drop-ins for torch.nn's, and BatchNorm for any rank and channel axis."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BNTypeError, BNValueError
from .base import NormBase


class BatchNorm(NormBase, _BatchNorm):
    """Batch normalization over every dimension but the channel `axis`, for any rank >= 2.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, per channel. In training the batch
    statistics (biased variance) are used and the running buffers move towards them
    (unbiased variance) by `momentum`; in eval the running statistics are used.

    Args:
        num_features: C, the size of the channel dimension.
        axis: the channel dimension (default 1; -1 for channels-last data). Keyword-only.
        eps: added to the variance (default 1e-5).
        momentum: weight of the new batch in the running average (default 0.1, PyTorch's
            convention); None for a cumulative average.
        affine: learn weight and bias (default True).
        bias: with affine, also learn the bias (default True; False keeps only the scale,
            as torch's keyword of the same name). Keyword-only.
        track_running_stats: keep running statistics (default True); if False, batch
            statistics are used in eval too.

    Shape: input (N, C, *) for axis=1; output the same shape and dtype.

    Example:
        >>> bn = BatchNorm(16, axis=-1)          # channels-last (N, L, C)
        >>> bn(torch.randn(4, 10, 16)).shape
        torch.Size([4, 10, 16])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         bias=bias, device=device, dtype=dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        _check_tensor(self, x)
        if x.dim() < 2:
            raise BNValueError(f"expected at least 2D input (got {x.dim()}D input of shape "
                             f"{tuple(x.shape)}); BatchNorm needs a batch and a channel "
                             "dimension")

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return self._scripted(input)
        self._check_input_dim(input)
        return self._batch_norm(input, mask)


class _FixedRank(BatchNorm):
    """Channels at dim 1 and a fixed set of ranks, as torch.nn.BatchNorm{1,2,3}d."""

    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=1,
                         bias=bias, device=device, dtype=dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        _check_tensor(self, x)
        if x.dim() not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            raise BNValueError(f"{type(self).__name__} expected {want} input (got {x.dim()}D "
                             f"input of shape {tuple(x.shape)}); use the BatchNorm class "
                             "matching your input's rank, or bnkit.nn.BatchNorm for any rank")


def _check_tensor(module, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise BNTypeError(f"{type(module).__name__} expects a torch.Tensor input (got "
                        f"{type(x).__name__}); convert it with torch.as_tensor(x, "
                        "dtype=torch.float32)")


class BatchNorm1d(_FixedRank, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d (and an instance of it): input (N, C) or (N, C, L).
    See `BatchNorm`."""

    _ranks = (2, 3)


class BatchNorm2d(_FixedRank, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d (and an instance of it): input (N, C, H, W).
    See `BatchNorm`."""

    _ranks = (4,)


class BatchNorm3d(_FixedRank, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d (and an instance of it): input (N, C, D, H, W).
    See `BatchNorm`."""

    _ranks = (5,)
