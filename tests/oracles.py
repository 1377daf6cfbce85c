"""Shared float64 oracles for the tests."""
import torch


def bn_train_oracle(x, axis=1, eps=1e-5):
    """Training-mode BN (no affine) in float64 of the very same input values."""
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != axis]
    mean = xd.mean(dims, keepdim=True)
    var = ((xd - mean) ** 2).mean(dims, keepdim=True)
    return (xd - mean) / torch.sqrt(var + eps)


def bn_inputs(model, data):
    """Every BN layer's inputs over `data` as a (C, values) float64 matrix, keyed by name.

    Runs `model` as it is (its current train/eval mode) without gradients.
    """
    from bnkit.tools import is_bn

    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0]))
             for n, m in model.named_modules() if is_bn(m)]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs).double().transpose(0, 1).reshape(xs[0].shape[1], -1)
            for n, xs in seen.items()}


def assert_pairs_close(*pairs, tol=1e-10):
    """Each (got, want) pair equal within `tol`, relative and absolute (float64 oracles)."""
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
