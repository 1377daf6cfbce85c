"""Datasets for bnkit: an IDX reader/writer and an offline Fashion-MNIST loader.

Example:
    >>> from bnkit.data import load_fashion_mnist, FASHION_MNIST_CLASSES
    >>> images, labels = load_fashion_mnist("train")  # uint8 (60000, 28, 28), int64 (60000,)

Where the files are found: ``root=``, else ``$BNKIT_DATA``, each the only folder searched
when given; else ``~/.cache/bnkit/fashion-mnist``, then ``/usr/share/datasets/fashion-mnist``
(see ``bnkit.data.fashion_mnist``).
"""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    ChecksumError,
    find_fashion_mnist,
    load_fashion_mnist,
    locate_fashion_mnist,
    make_fake_fashion_mnist,
)
from .idx import IDXError, parse_idx, read_idx, write_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ChecksumError",
    "IDXError",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "make_fake_fashion_mnist",
    "parse_idx",
    "read_idx",
    "write_idx",
]
