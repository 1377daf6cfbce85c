"""The one registry of normalization layers: each kind's name and aliases, how to build it
by name (`get_norm`), which classes already are that kind, and how to build it from an
existing BN-like layer (what `bnkit.convert`, `freeze` and `unfreeze` use, including the way
back to torch's own classes).

Adding a layer: write it in its own file under `nn/`, then add one `NormKind` to `_BUILTIN`
below (or call `register_norm` from outside the package). `tests/test_registry.py` checks
every kind: built by name and by alias, and converted from a BN layer and back.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .act import BatchNormAct
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm
from .ghost import GhostBatchNorm
from .inplace_abn import InPlaceABN, InPlaceABNSync
from .layernorm import ChannelLayerNorm
from .recurrent import RecurrentBatchNorm
from .renorm import BatchRenorm

__all__ = ["ChannelLayerNorm", "NormKind", "SourceLayer", "available_norms",
           "convert_targets", "default_num_groups", "get_norm", "norm_kind", "register_norm",
           "unregister_norm"]


@dataclass
class SourceLayer:
    """What a BN-like layer is, as far as building another kind from it needs (read by
    `bnkit.tools.convert.describe`)."""

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    has_bias: bool
    track_running_stats: bool
    axis: int
    dim: int | None  # 1, 2 or 3 from a class name ending in 1d/2d/3d, else None (any rank)
    training: bool
    device: torch.device
    dtype: torch.dtype

    def bn_args(self) -> tuple:
        """(num_features, eps, momentum, affine, track_running_stats): torch's BN order."""
        return self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats

    def factory_kwargs(self) -> dict:
        return {"device": self.device, "dtype": self.dtype}


@dataclass(frozen=True)
class NormKind:
    """One kind of normalization layer.

    Attributes:
        name: the name `get_norm` and `convert` take.
        build: build(num_features, **kwargs) -> nn.Module, for `get_norm`.
        aliases: other names for the same kind (e.g. 'bn', 'gn').
        classes: layer classes that already are this kind (`convert` leaves them alone).
        from_bn: from_bn(source: SourceLayer, options: dict) -> nn.Module, the layer of this
            kind equivalent to an existing BN-like layer; None when `convert` cannot target
            this kind.
        options: the keyword options `convert(model, name, **options)` accepts.
    """

    name: str
    build: Callable[..., nn.Module]
    aliases: tuple[str, ...] = ()
    classes: tuple[type, ...] = ()
    from_bn: Callable[[SourceLayer, dict], nn.Module] | None = None
    options: frozenset[str] = field(default_factory=frozenset)


def default_num_groups(num_features: int, limit: int = 32) -> int:
    """32 groups when they divide C (the GroupNorm paper's default), else the largest
    divisor of C not above 32: 64 -> 32, 48 -> 24, 30 -> 30, 7 -> 7, 34 -> 17."""
    return max(g for g in range(1, min(limit, num_features) + 1) if num_features % g == 0)


# ----------------------------------------------------------------------------- builders by name

def _groupnorm(num_features, num_groups=None, eps=1e-5, affine=True, device=None, dtype=None):
    g = default_num_groups(num_features) if num_groups is None else num_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or num_features % g:
        raise ValueError(f"num_groups must be a positive int dividing num_features="
                         f"{num_features} (got {num_groups!r}); leave it out for "
                         f"{default_num_groups(num_features)}")
    return nn.GroupNorm(g, num_features, eps, affine, device=device, dtype=dtype)


def _check_dim(dim) -> None:
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3, the number of spatial dimensions (got "
                         f"{dim!r}); e.g. dim=2 for (N, C, H, W) input")


def _torch_per_dim(classes, affine: bool, track_running_stats: bool):
    """A factory of torch's {1, 2, 3}-d layer family `classes` (InstanceNorm, BatchNorm) taking
    dim= (default 2) and torch's own defaults for affine and track_running_stats."""
    def build(num_features, dim=2, eps=1e-5, momentum=0.1, affine=affine,
              track_running_stats=track_running_stats, device=None, dtype=None):
        _check_dim(dim)
        return classes[dim - 1](num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype)
    return build


_instancenorm = _torch_per_dim((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
                               affine=False, track_running_stats=False)
_torch_batchnorm = _torch_per_dim((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
                                  affine=True, track_running_stats=True)


def _sync_class():
    try:
        from .sync import SyncBatchNorm
    except ImportError as err:
        raise ValueError(f"norm 'sync' is not available in this installation ({err}); use "
                         "'batchnorm' on a single process") from err
    return SyncBatchNorm


def _sync(num_features, **kwargs):
    return _sync_class()(num_features, **kwargs)


def _identity(num_features: int) -> nn.Module:
    """No normalization (nn.Identity), so 'none' is a name like the others."""
    return nn.Identity()


# ----------------------------------------------------------------------------- from a BN layer

def _to_torch(s: SourceLayer, options: dict) -> nn.Module:
    """torch's BatchNorm{dim}d; BatchNorm1d (over flattened positions) when the rank is not
    known or the channels are not at dim 1, for `bnkit.tools.convert.torch_structure` to
    wrap."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(s.dim)
    if cls is None or s.axis != 1:
        cls = nn.BatchNorm1d
    return cls(*s.bn_args(), **s.factory_kwargs())


def _to_batchnorm(s: SourceLayer, options: dict) -> nn.Module:
    cls = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}.get(s.dim)
    if cls is not None and s.axis == 1:
        return cls(*s.bn_args(), **s.factory_kwargs())
    return BatchNorm(*s.bn_args(), axis=s.axis, **s.factory_kwargs())


def _to_sync(s: SourceLayer, options: dict) -> nn.Module:
    return _sync_class()(*s.bn_args(), options.get("process_group"), axis=s.axis,
                         **s.factory_kwargs())


def _to_frozen(s: SourceLayer, options: dict) -> nn.Module:
    frozen = FrozenBatchNorm(s.num_features, s.eps, axis=s.axis, **s.factory_kwargs())
    frozen.momentum = s.momentum  # what unfreezing gives back
    return frozen


def _to_renorm(s: SourceLayer, options: dict) -> nn.Module:
    return BatchRenorm(*s.bn_args(), axis=s.axis, **options, **s.factory_kwargs())


def _to_ghost(s: SourceLayer, options: dict) -> nn.Module:
    return GhostBatchNorm(s.num_features, options["virtual_batch_size"], *s.bn_args()[1:],
                          axis=s.axis, **s.factory_kwargs())


def _to_groupnorm(s: SourceLayer, options: dict) -> nn.Module:
    return nn.GroupNorm(options["num_groups"], s.num_features, s.eps, s.affine,
                        **s.factory_kwargs())


def _to_inplace_abn(s: SourceLayer, options: dict) -> nn.Module:
    """An InPlaceABN with the activation `convert` found after the BN (options "act",
    "act_param"); InPlaceABNSync over options["process_group"] when that key is given."""
    act = (options.get("act", "leaky_relu"), options.get("act_param", 0.01))
    if "process_group" in options:
        return InPlaceABNSync(s.num_features, *act, *s.bn_args()[1:], axis=s.axis,
                              process_group=options["process_group"], **s.factory_kwargs())
    return InPlaceABN(s.num_features, *act, *s.bn_args()[1:], axis=s.axis,
                      **s.factory_kwargs())


def _sync_classes() -> tuple[type, ...]:
    try:
        return (_sync_class(),)
    except ValueError:
        return ()


_BUILTIN = (
    NormKind("batchnorm", BatchNorm, ("bnkit",),
             (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct), _to_batchnorm),
    NormKind("batchnorm1d", BatchNorm1d, ("bn1d",), (BatchNorm1d,)),
    NormKind("batchnorm2d", BatchNorm2d, ("bn", "bn2d"), (BatchNorm2d,)),
    NormKind("batchnorm3d", BatchNorm3d, ("bn3d",), (BatchNorm3d,)),
    NormKind("torch", _torch_batchnorm, ("torch_batchnorm",),
             (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _to_torch),
    NormKind("renorm", BatchRenorm, ("batchrenorm",), (BatchRenorm,), _to_renorm,
             frozenset({"r_max", "d_max"})),
    NormKind("ghost", GhostBatchNorm, ("ghostbatchnorm",), (GhostBatchNorm,), _to_ghost,
             frozenset({"virtual_batch_size"})),
    NormKind("sync", _sync, ("syncbatchnorm",), _sync_classes(), _to_sync,
             frozenset({"process_group"})),
    NormKind("frozen", FrozenBatchNorm, ("frozenbatchnorm",), (FrozenBatchNorm,), _to_frozen),
    NormKind("recurrent", RecurrentBatchNorm, (), (RecurrentBatchNorm,)),
    NormKind("batchnorm_act", BatchNormAct, ("bnact",), (BatchNormAct,)),
    NormKind("inplace_abn", InPlaceABN, ("iabn", "inplaceabn"), (InPlaceABN, InPlaceABNSync),
             _to_inplace_abn),
    NormKind("groupnorm", _groupnorm, ("group", "gn"), (nn.GroupNorm,), _to_groupnorm,
             frozenset({"num_groups"})),
    NormKind("layernorm", ChannelLayerNorm, ("ln",), (ChannelLayerNorm,)),
    NormKind("instancenorm", _instancenorm, ("in",),
             (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)),
    NormKind("identity", _identity, ("none",), (nn.Identity,)),
)

_KINDS: dict[str, NormKind] = {kind.name: kind for kind in _BUILTIN}
_ALIASES: dict[str, str] = {alias: kind.name for kind in _BUILTIN for alias in kind.aliases}


def available_norms() -> list[str]:
    """The names `get_norm` accepts (aliases not included), sorted."""
    return sorted(_KINDS)


def convert_targets() -> list[str]:
    """The names `bnkit.convert` accepts as `to` (kinds with a `from_bn`), in registration
    order."""
    return [name for name, kind in _KINDS.items() if kind.from_bn is not None]


def norm_kind(name: str, *, purpose: str = "get_norm") -> NormKind:
    """The registered kind called `name` or one of its aliases.

    Raises ValueError naming the valid names (for purpose 'convert', the convert targets).
    """
    kind = _KINDS.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
    if purpose == "convert":
        if kind is None or kind.from_bn is None:
            raise ValueError(f"convert: unknown target {name!r}; expected one of "
                             f"{', '.join(repr(t) for t in convert_targets())} (or an alias); "
                             "add your own with bnkit.nn.register_norm(..., from_bn=...)")
    elif kind is None:
        raise ValueError(f"unknown norm {name!r}: expected one of {available_norms()} (or an "
                         f"alias: {sorted(_ALIASES)}); add your own with "
                         "bnkit.nn.register_norm")
    return kind


def register_norm(name: str, factory: Callable[..., nn.Module], *, aliases=(), classes=(),
                  from_bn: Callable[[SourceLayer, dict], nn.Module] | None = None,
                  options=()) -> None:
    """Add a layer kind: factory(num_features, **kwargs) -> nn.Module for `get_norm`; with
    `from_bn(source, options)` it is also a `bnkit.convert` target (see `NormKind`)."""
    if not isinstance(name, str) or not callable(factory):
        raise TypeError(f"register_norm expects a name and a callable factory (got "
                        f"{type(name).__name__}, {type(factory).__name__}); e.g. "
                        "register_norm('mine', MyNorm)")
    aliases = tuple(aliases)
    taken = [n for n in (name, *aliases) if n in _KINDS or n in _ALIASES]
    if taken:
        owner = _KINDS.get(_ALIASES.get(taken[0], taken[0]))
        raise ValueError(f"norm {taken[0]!r} is already registered (to {owner.build!r}); "
                         "pick another name")
    _KINDS[name] = NormKind(name, factory, aliases, tuple(classes), from_bn, frozenset(options))
    _ALIASES.update(dict.fromkeys(aliases, name))


def unregister_norm(name: str) -> None:
    """Remove a kind added with `register_norm` (and its aliases); unknown names are ignored."""
    kind = _KINDS.pop(name, None)
    for alias in kind.aliases if kind is not None else ():
        _ALIASES.pop(alias, None)


def get_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the normalization layer called `name` for `num_features` channels.

    Names (aliases in brackets): 'batchnorm' ('bnkit'; any rank, `axis=`), 'batchnorm1d'
    ('bn1d'), 'batchnorm2d' ('bn', 'bn2d'), 'batchnorm3d' ('bn3d'), 'torch' (torch's own
    BatchNorm{dim}d, dim=2 by default), 'renorm', 'ghost' (needs virtual_batch_size),
    'sync', 'frozen', 'recurrent' (needs max_steps), 'batchnorm_act' (act='relu'), torch's
    'groupnorm' ('group', 'gn'; num_groups: 32 if it divides C, else the largest divisor of
    C below 32), 'layernorm' ('ln'; over the channels of (N, C, *) input at each position,
    see `ChannelLayerNorm`), 'instancenorm' ('in'; torch's InstanceNorm{dim}d, dim=2 by
    default) and 'identity' ('none'), plus any added with `register_norm`. Keyword
    arguments go to the layer's constructor.

    Example:
        >>> bn = get_norm("ghost", 16, virtual_batch_size=32)
        >>> type(bn).__name__, bn.virtual_batch_size
        ('GhostBatchNorm', 32)
        >>> get_norm("gn", 48).num_groups
        24
    """
    kind = norm_kind(name)
    _check_kwargs(name, kind.build, kwargs)
    return kind.build(num_features, **kwargs)


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
