"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_idx_dir(tmp_path_factory):
    """A folder holding a tiny learnable Fashion-MNIST look-alike (official file names, .gz)."""
    from bnkit.data import make_fake_fashion_mnist

    return make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))
