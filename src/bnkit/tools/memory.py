"""What a training step keeps for the backward: bytes saved by autograd, counted exactly.

`saved_tensor_bytes(fn, *args)` runs `fn` under `torch.autograd.graph.saved_tensors_hooks` and
adds up the storages of every tensor autograd saves for the backward, each storage once
(two saved views of one tensor, or a layer's output saved both by itself and by the next
convolution, count once). `bnkit.bench.memory` uses it to compare BN + activation
variants (`bnkit bench --memory`, docs/layers/inplace_abn.md).

Example:
    >>> w = torch.randn(4, 4, requires_grad=True)
    >>> x = torch.randn(8, 4)
    >>> saved_tensor_bytes(lambda: (x @ w).sum())   # matmul keeps x for dw
    128
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["saved_tensor_bytes"]


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


def saved_tensor_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = (),
                       **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `fn(*args,
    **kwargs)` runs (its result is dropped, so they are freed after the count).

    Each storage counts once, whole (a saved view counts the storage it views). Storages of
    `exclude` (e.g. `model.parameters()`, which live anyway) are left out. Tensors a custom
    autograd.Function keeps as plain `ctx` attributes instead of `save_for_backward` are not
    seen by the hooks (bnkit's own Functions save their full-size tensors with
    `save_for_backward`).
    """
    skip = {_storage_key(t)[0] for t in exclude}
    seen: dict[tuple, int] = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in skip:
            seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    del out
    return sum(seen.values())
