"""get_norm: build any normalization layer of the family (and torch's GN/LN/IN) by name."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn


def default_num_groups(num_features: int, limit: int = 32) -> int:
    """32 groups when they divide C (the GroupNorm paper's default), else the largest
    divisor of C not above 32: 64 -> 32, 48 -> 24, 30 -> 30, 7 -> 7, 34 -> 17."""
    return max(g for g in range(1, min(limit, num_features) + 1) if num_features % g == 0)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of (N, C, *) input, at each position.

    y[n, :, p] = (x[n, :, p] - mean_c) / sqrt(var_c + eps) * weight + bias, mean and
    variance over the C channels of one position (the "LayerNorm2d" of ConvNeXt). For the
    other convention, over all of (C, *) per sample, use get_norm("groupnorm", C,
    num_groups=1). Same parameters and state dict as nn.LayerNorm(C).

    Example:
        >>> ln = ChannelLayerNorm(4)
        >>> y = ln(torch.randn(2, 4, 3, 3))
        >>> torch.allclose(y.mean(1), torch.zeros(2, 3, 3), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, axis: int = 1, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.axis = axis

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.movedim(self.axis, -1)  # channels last, where layer_norm normalizes
        y = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, self.axis)


def _groupnorm(num_features, num_groups=None, eps=1e-5, affine=True, device=None, dtype=None):
    g = default_num_groups(num_features) if num_groups is None else num_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or num_features % g:
        raise ValueError(f"num_groups must be a positive int dividing num_features="
                         f"{num_features} (got {num_groups!r}); leave it out for "
                         f"{default_num_groups(num_features)}")
    return nn.GroupNorm(g, num_features, eps, affine, device=device, dtype=dtype)


def _instancenorm(num_features, dim=2, eps=1e-5, momentum=0.1, affine=False,
                  track_running_stats=False, device=None, dtype=None):
    classes = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
    if dim not in classes:
        raise ValueError(f"dim must be 1, 2 or 3, the number of spatial dimensions (got "
                         f"{dim!r}); e.g. dim=2 for (N, C, H, W) input")
    return classes[dim](num_features, eps, momentum, affine, track_running_stats,
                        device=device, dtype=dtype)


def _sync(num_features, **kwargs):
    try:
        from .sync import SyncBatchNorm
    except ImportError as err:
        raise ValueError(f"norm 'sync' is not available in this installation ({err}); use "
                         "'batchnorm' on a single process") from err
    return SyncBatchNorm(num_features, **kwargs)


def _family() -> dict[str, Callable[..., nn.Module]]:
    from .act import BatchNormAct
    from .batchnorm import BatchNorm
    from .frozen import FrozenBatchNorm
    from .ghost import GhostBatchNorm
    from .recurrent import RecurrentBatchNorm
    from .renorm import BatchRenorm

    return {"batchnorm": BatchNorm, "renorm": BatchRenorm, "ghost": GhostBatchNorm,
            "sync": _sync, "frozen": FrozenBatchNorm, "recurrent": RecurrentBatchNorm,
            "batchnorm_act": BatchNormAct, "groupnorm": _groupnorm,
            "layernorm": ChannelLayerNorm, "instancenorm": _instancenorm}


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def _registry() -> dict[str, Callable[..., nn.Module]]:
    if not _REGISTRY:
        _REGISTRY.update(_family())
    return _REGISTRY


def available_norms() -> list[str]:
    """The names `get_norm` accepts, sorted."""
    return sorted(_registry())


def register_norm(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a layer to `get_norm`: factory(num_features, **kwargs) -> nn.Module."""
    if not isinstance(name, str) or not callable(factory):
        raise TypeError(f"register_norm expects a name and a callable factory (got "
                        f"{type(name).__name__}, {type(factory).__name__}); e.g. "
                        "register_norm('mine', MyNorm)")
    if name in _registry():
        raise ValueError(f"norm {name!r} is already registered (to {_registry()[name]!r}); "
                         "pick another name")
    _registry()[name] = factory


def get_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the normalization layer called `name` for `num_features` channels.

    Names: 'batchnorm', 'renorm', 'ghost' (needs virtual_batch_size), 'sync', 'frozen',
    'recurrent' (needs max_steps), 'batchnorm_act' (act='relu'), torch's 'groupnorm'
    (num_groups: 32 if it divides C, else the largest divisor of C below 32), 'layernorm'
    (over the channels of (N, C, *) input at each position, see `ChannelLayerNorm`) and
    'instancenorm' (torch's InstanceNorm{dim}d, dim=2 by default), plus any added with
    `register_norm`. Keyword arguments go to the layer's constructor.

    Example:
        >>> bn = get_norm("ghost", 16, virtual_batch_size=32)
        >>> type(bn).__name__, bn.virtual_batch_size
        ('GhostBatchNorm', 32)
        >>> get_norm("groupnorm", 48).num_groups
        24
    """
    factory = _registry().get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown norm {name!r}: expected one of {available_norms()}; "
                         "add your own with bnkit.nn.register_norm")
    _check_kwargs(name, factory, kwargs)
    return factory(num_features, **kwargs)


def _check_kwargs(name, factory, kwargs) -> None:
    """Name the accepted keywords when one is unknown (the factory's own TypeError does not)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = sorted(k for k in params if k != "num_features" and k != "self")
        raise TypeError(f"get_norm({name!r}) got unknown keyword(s) {unknown}; accepted: "
                        f"{accepted}")
