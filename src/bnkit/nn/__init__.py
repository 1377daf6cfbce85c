"""bnkit layers: drop-in BatchNorm and the BN family, all over one functional core."""
from .base import NormBase
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["NormBase", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
