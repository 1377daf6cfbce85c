"""Shared float64 oracles for the tests."""
import torch


def bn_train_oracle(x, axis=1, eps=1e-5):
    """Training-mode BN (no affine) in float64 of the very same input values."""
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != axis]
    mean = xd.mean(dims, keepdim=True)
    var = ((xd - mean) ** 2).mean(dims, keepdim=True)
    return (xd - mean) / torch.sqrt(var + eps)
