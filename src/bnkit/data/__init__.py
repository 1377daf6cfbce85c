"""Datasets for bnkit: an IDX reader/writer and an offline Fashion-MNIST loader.

Example:
    >>> from bnkit.data import load_fashion_mnist, FASHION_MNIST_CLASSES
    >>> images, labels = load_fashion_mnist("train")  # uint8 (60000, 28, 28), int64 (60000,)
"""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    ChecksumError,
    find_fashion_mnist,
    load_fashion_mnist,
    make_fake_fashion_mnist,
)
from .idx import IDXError, parse_idx, read_idx, write_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ChecksumError",
    "IDXError",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "make_fake_fashion_mnist",
    "parse_idx",
    "read_idx",
    "write_idx",
]
