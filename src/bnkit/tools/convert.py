"""Swap every BN-like layer of a model for another kind, keeping what carries over.

Targets: "torch" (torch.nn only: BatchNorm1d/2d/3d, or an fx module around BatchNorm1d for
any rank or channel axis), "bnkit" (bnkit.nn.BatchNorm*, BatchNormAct for layers with an
activation), "sync" (bnkit.nn.SyncBatchNorm), "frozen" (bnkit.nn.FrozenBatchNorm), "renorm"
(BatchRenorm), "ghost" (GhostBatchNorm) and "group" (torch.nn.GroupNorm). weight, bias,
running_mean, running_var and num_batches_tracked are copied bit for bit where the target has
them (GroupNorm keeps only weight and bias), along with eps, momentum, affine,
track_running_stats, the channel axis, the training flag and requires_grad. A layer with an
activation (bnkit's BatchNormAct, timm's BatchNormAct2d: a BN with `act` and `drop` children)
keeps them: it becomes nn.Sequential(<new BN>, [drop,] act), or a BatchNormAct for "bnkit".
Like torch's `convert_sync_batchnorm`, layers are replaced in their parents in place.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn

from .. import nn as bnn
from ..nn.act import tail_modules
from ..nn.registry import default_num_groups
from .walk import (
    bn_axis,
    bn_eps,
    check_module,
    has_running_stats,
    is_bn,
    is_frozen_bn,
    replace_all,
    working_copy,
)

TARGETS = ("torch", "bnkit", "sync", "frozen", "renorm", "ghost", "group", "inplace_abn")
_KWARGS = {"torch": set(), "bnkit": set(), "sync": {"process_group"}, "frozen": set(),
           "renorm": {"r_max", "d_max"}, "ghost": {"virtual_batch_size"},
           "group": {"num_groups"}, "inplace_abn": set()}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
UNFROZEN = "_bnkit_unfrozen"  # attribute of a FrozenBatchNorm made by convert: its source layer
SOURCE_DIM = "_bnkit_source_dim"  # of an InPlaceABN made by convert: the source's 1/2/3 (d)


@dataclass
class Source:
    """What a BN-like layer is, as far as building another kind needs."""

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


def describe(bn: nn.Module) -> Source:
    """Read a BN-like layer's configuration (frozen layers count as affine, tracking)."""
    frozen = is_frozen_bn(bn)
    weight = getattr(bn, "weight", None)
    ref = next((t for t in (weight, getattr(bn, "running_mean", None))
                if isinstance(t, torch.Tensor)), None)  # where the new layer lives
    match = re.search(r"([123])d$", type(bn).__name__)
    return Source(
        num_features=int(getattr(bn, "num_features", 0) or _channels(bn)), eps=bn_eps(bn),
        momentum=getattr(bn, "momentum", 0.1),
        affine=frozen or bool(getattr(bn, "affine", weight is not None)),
        has_bias=getattr(bn, "bias", None) is not None,
        track_running_stats=frozen or bool(getattr(bn, "track_running_stats", True)),
        axis=bn_axis(bn), training=bn.training,
        dim=int(match.group(1)) if match else getattr(bn, SOURCE_DIM, None),
        device=ref.device if ref is not None else torch.device("cpu"),
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)


def _channels(bn) -> int:
    for key in ("running_mean", "weight"):
        t = getattr(bn, key, None)
        if isinstance(t, torch.Tensor):
            return int(t.shape[-1])
    return 0


def copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy weight, bias, running stats and step counter where both layers hold them, bit for
    bit, and carry requires_grad over between parameters."""
    with torch.no_grad():
        for key in _STATE:
            s, d = getattr(src, key, None), getattr(dst, key, None)
            if isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor) \
                    and s.shape == d.shape:
                d.copy_(s)
                if isinstance(s, nn.Parameter) and isinstance(d, nn.Parameter):
                    d.requires_grad_(s.requires_grad)


def _bn_args(s: Source) -> tuple:
    return s.num_features, s.eps, s.momentum, s.affine, s.track_running_stats


def _fk(s: Source) -> dict:
    return {"device": s.device, "dtype": s.dtype}


def _torch(s: Source, kw: dict) -> nn.Module:
    """torch's BatchNorm{dim}d; BatchNorm1d (over flattened positions) when the rank is not
    known or the channels are not at dim 1, for `torch_structure` to wrap."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(s.dim)
    if cls is None or s.axis != 1:
        cls = nn.BatchNorm1d
    return cls(*_bn_args(s), **_fk(s))


def torch_structure(bn: nn.Module, tail: list[nn.Module], s: Source) -> nn.Module:
    """The torch "torch" target: `bn` alone, nn.Sequential(bn, *tail), or, for any rank or a
    channel axis other than 1, a torch.fx.GraphModule (class name "ChannelsFirstBatchNorm")
    that moves the channels to dim 1, flattens the positions for BatchNorm1d at child "0",
    restores the shape and axis, then runs the tail at "1", "2". Only torch classes: the
    model pickles, scripts and exports without bnkit."""
    if s.dim is not None and s.axis == 1:
        return nn.Sequential(bn, *tail) if tail else bn
    g = fx.Graph()
    x = g.placeholder("input")
    h = x if s.axis == 1 else g.call_method("movedim", (x, s.axis, 1))
    flat = g.call_method("flatten", (g.call_method("unsqueeze", (h, -1)), 2))  # (N, C, L)
    y = g.call_method("reshape_as", (g.call_module("0", (flat,)), h))
    if s.axis != 1:
        y = g.call_method("movedim", (y, 1, s.axis))
    for i in range(1, len(tail) + 1):
        y = g.call_module(str(i), (y,))
    g.output(y)
    root = nn.Module()
    for i, m in enumerate([bn, *tail]):
        root.add_module(str(i), m)
    return fx.GraphModule(root, g, class_name="ChannelsFirstBatchNorm").train(s.training)


def _bnkit(s: Source, kw: dict) -> nn.Module:
    cls = {1: bnn.BatchNorm1d, 2: bnn.BatchNorm2d, 3: bnn.BatchNorm3d}.get(s.dim)
    if cls is not None and s.axis == 1:
        return cls(*_bn_args(s), **_fk(s))
    return bnn.BatchNorm(*_bn_args(s), axis=s.axis, **_fk(s))


def _sync(s: Source, kw: dict) -> nn.Module:
    from ..nn.sync import SyncBatchNorm

    return SyncBatchNorm(*_bn_args(s), kw.get("process_group"), axis=s.axis, **_fk(s))


def _frozen(s: Source, kw: dict) -> nn.Module:
    frozen = bnn.FrozenBatchNorm(s.num_features, s.eps, axis=s.axis, **_fk(s))
    frozen.momentum = s.momentum  # what unfreezing gives back
    return frozen


def _renorm(s: Source, kw: dict) -> nn.Module:
    from ..nn.renorm import BatchRenorm

    return BatchRenorm(*_bn_args(s), axis=s.axis, **kw, **_fk(s))


def _ghost(s: Source, kw: dict) -> nn.Module:
    from ..nn.ghost import GhostBatchNorm

    return GhostBatchNorm(s.num_features, kw["virtual_batch_size"], *_bn_args(s)[1:],
                          axis=s.axis, **_fk(s))


def _group(s: Source, kw: dict) -> nn.Module:
    return nn.GroupNorm(kw["num_groups"], s.num_features, s.eps, s.affine, **_fk(s))


_FACTORIES = {"torch": _torch, "bnkit": _bnkit, "sync": _sync, "frozen": _frozen,
              "renorm": _renorm, "ghost": _ghost, "group": _group}


def _already(to: str, bn: nn.Module, kw: dict) -> bool:
    """The layer is already of the target kind (and no option asks for a change)."""
    if kw:
        return False
    from ..nn.ghost import GhostBatchNorm
    from ..nn.renorm import BatchRenorm

    kinds = {"torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
             "bnkit": (bnn.BatchNorm, bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d,
                       bnn.BatchNormAct),
             "frozen": (bnn.FrozenBatchNorm,), "renorm": (BatchRenorm,),
             "ghost": (GhostBatchNorm,), "sync": (getattr(bnn, "SyncBatchNorm", None),),
             "inplace_abn": (bnn.InPlaceABN, bnn.InPlaceABNSync)}
    return type(bn) in kinds.get(to, ())


def _check_layer(to: str, name: str, bn: nn.Module, s: Source, kw: dict) -> None:
    """Raise, naming the layer, when it cannot become a `to` layer."""
    where = f"layer '{name}' ({type(bn).__name__})" if name else f"the model ({type(bn).__name__})"
    if s.num_features < 1:
        raise ValueError(f"convert(to={to!r}): {where} has no num_features, weight or running "
                         "statistics to tell its number of channels; give it num_features")
    if to == "frozen" and not has_running_stats(bn):
        raise ValueError(f"convert(to='frozen'): {where} has no running statistics "
                         "(track_running_stats=False), so there is nothing to freeze; build it "
                         "with track_running_stats=True and run training batches first")
    if to == "group" and s.axis != 1:
        raise ValueError(f"convert(to='group'): {where} normalizes channels on axis {s.axis}, "
                         "but GroupNorm needs channels on axis 1; permute the input to "
                         "(N, C, *) first, or convert to 'bnkit'")
    if to == "group":
        g = kw["num_groups"]
        if s.num_features % g:
            raise ValueError(f"convert(to='group'): {where} has {s.num_features} channels, not "
                             f"divisible by num_groups={g}; pass a num_groups that divides "
                             f"{s.num_features} (e.g. {default_num_groups(s.num_features)}), or "
                             "leave it out to pick one per layer")


def _check_kwargs(to: str, kw: dict) -> None:
    if to not in TARGETS:
        raise ValueError(f"convert: unknown target {to!r}; expected one of "
                         f"{', '.join(repr(t) for t in TARGETS)}")
    unknown = sorted(set(kw) - _KWARGS[to])
    if unknown:
        accepted = sorted(_KWARGS[to]) or "none"
        raise TypeError(f"convert(to={to!r}) got unknown keyword(s) {unknown}; accepted: "
                        f"{accepted}")
    if to == "ghost" and "virtual_batch_size" not in kw:
        raise ValueError("convert(to='ghost') needs virtual_batch_size, the samples per ghost "
                         "batch (got none); pass e.g. virtual_batch_size=32")
    g = kw.get("num_groups")
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise ValueError(f"convert(to='group'): num_groups must be a positive int (got {g!r}); "
                         "pass e.g. num_groups=32, or leave it out")


def convertible(module: nn.Module) -> bool:
    """BN-like layers `convert` swaps: all but those with per-step statistics (recurrent BN,
    whose forward takes a time step)."""
    rm = getattr(module, "running_mean", None)
    return is_bn(module) and not (isinstance(rm, torch.Tensor) and rm.dim() == 2)


def build(to: str, name: str, bn: nn.Module, kw: dict) -> nn.Module | None:
    """The `to` layer equivalent to `bn` (None if `bn` already is one); a layer with an
    activation becomes the new layer followed by its drop and act modules."""
    if _already(to, bn, kw):
        return None
    s = describe(bn)
    kw = dict(kw)
    if to == "group" and kw.get("num_groups") is None:
        kw["num_groups"] = default_num_groups(max(s.num_features, 1))
    _check_layer(to, name, bn, s, kw)
    tail = dict(tail_modules(bn))
    if to == "inplace_abn":
        return _inplace_abn(bn, s, tail)
    if to == "bnkit" and tail:
        new = bnn.BatchNormAct(*_bn_args(s)[:1], tail.get("act", "identity"), *_bn_args(s)[1:],
                               axis=s.axis, drop=tail.get("drop"), **_fk(s))
    else:
        new = _FACTORIES[to](s, kw)
    copy_state(bn, new)
    if not s.has_bias and isinstance(getattr(new, "bias", None), nn.Parameter):
        new.register_parameter("bias", None)  # bias=False source: forward treats None as 0
    new.train(s.training)
    if to == "torch":
        new = torch_structure(new, list(tail.values()), s)
    elif tail and to != "bnkit":
        new = nn.Sequential(new, *tail.values()).train(s.training)
    if to == "frozen":
        object.__setattr__(new, UNFROZEN, bn)  # plain attribute: not a submodule, not saved
    return new


def invertible_act(act) -> tuple[str, float] | None:
    """(name, parameter) of an activation module InPlaceABN can take in: nn.LeakyReLU with a
    slope > 0 or nn.ELU with alpha > 0, by exact type (a subclass may compute otherwise)."""
    if type(act) is nn.LeakyReLU and act.negative_slope > 0:
        return "leaky_relu", float(act.negative_slope)
    if type(act) is nn.ELU and act.alpha > 0:
        return "elu", float(act.alpha)
    return None


def _inplace_abn(bn: nn.Module, s: Source, tail: dict, act: nn.Module | None = None):
    """An InPlaceABN (InPlaceABNSync for a SyncBatchNorm) for a BN whose activation (its
    `act` child, or `act`) is invertible and not preceded by a dropout; None (keep the
    layer) otherwise."""
    found = invertible_act(act if act is not None else tail.get("act"))
    if found is None or "drop" in tail:
        return None
    sync = {}  # a synchronized source stays synchronized, over the same group
    if isinstance(bn, nn.SyncBatchNorm) or type(bn).__name__ == "SyncBatchNorm":
        sync["process_group"] = getattr(bn, "process_group", None)
    cls = bnn.InPlaceABNSync if sync else bnn.InPlaceABN
    new = cls(s.num_features, found[0], found[1], *_bn_args(s)[1:], axis=s.axis, **sync,
              **_fk(s))
    copy_state(bn, new)
    if not s.has_bias:
        new.register_parameter("bias", None)
    if s.dim is not None:  # so that "torch" gives BatchNorm{dim}d back
        setattr(new, SOURCE_DIM, s.dim)
    return new.train(s.training)


def _neighbours(model: nn.Module, to: str) -> list[tuple[nn.Sequential, int, nn.Module, nn.Module]]:
    """(sequential, i, new i, new i + 1) for BN + activation neighbours in an nn.Sequential:
    for "inplace_abn", a plain BN followed by an invertible activation becomes
    (InPlaceABN, nn.Identity), keeping the indices (and so the state-dict keys) of the other
    children; for "torch" and "bnkit", an InPlaceABN followed by nn.Identity (that form)
    becomes (<BN>, activation) again."""
    out = []
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        kids = list(seq)
        for i in range(len(kids) - 1):
            bn, nxt = kids[i], kids[i + 1]
            if to == "inplace_abn" and convertible(bn) and not tail_modules(bn) and \
                    not isinstance(bn, bnn.InPlaceABN):
                new = _inplace_abn(bn, describe(bn), {}, nxt)
                if new is not None:
                    out.append((seq, i, new, nn.Identity()))
            elif to in ("torch", "bnkit") and isinstance(bn, bnn.InPlaceABN) and \
                    type(nxt) is nn.Identity and not isinstance(bn.act, nn.Identity):
                src = describe(bn)
                plain = _bnkit(src, {})
                copy_state(bn, plain)
                if bn.bias is None:
                    plain.register_parameter("bias", None)
                plain.train(src.training)
                if to == "torch":
                    plain = build(to, "", plain, {})
                out.append((seq, i, plain, bn.act))
    return out


def convert(model: nn.Module, to: str, *, inplace: bool = True, **kwargs) -> nn.Module:
    """Swap every BN-like layer of `model` for a `to` layer, keeping what carries over.

    Works in place, like torch's `SyncBatchNorm.convert_sync_batchnorm`: each layer is
    replaced in its parent, and the model is returned (a new object only when `model` is
    itself a BN layer: use the returned value). Pass inplace=False to convert a deep copy
    and leave `model` alone.

    Layers already of the target kind are kept as they are. Running statistics, affine
    parameters and the step counter are copied exactly, so torch -> bnkit -> torch is
    bit-exact (same classes, same state dict). A layer with an activation (bnkit's
    BatchNormAct, or timm's BatchNormAct2d recognised as a BN with `act` and `drop`
    children) keeps it: "bnkit" gives a BatchNormAct (activation and dropout modules
    included, applied drop then act as timm does), every other target
    nn.Sequential(<layer>, [drop,] act). "torch" gives only torch classes (no bnkit module
    is left, the model runs and pickles without bnkit): BatchNorm1d/2d/3d, and for a layer of
    any rank or with channels on another axis a torch.fx.GraphModule around a BatchNorm1d
    (see `torch_structure`); the bnkit layer loads that form's state dict back. Layers with
    per-step statistics (recurrent BN) are left alone. The new layers are new objects: build
    optimizers after converting.

    "inplace_abn" replaces each BN whose activation is an nn.LeakyReLU (slope > 0) or nn.ELU
    (alpha > 0) by an InPlaceABN with that activation: a BN-with-activation layer as above
    (without a dropout between them), or a BN followed by the activation in an
    nn.Sequential, whose activation entry becomes nn.Identity (the other children keep their
    indices and state-dict keys); a SyncBatchNorm becomes an InPlaceABNSync over the same
    process group. Other BN layers (plain, or with ReLU, which cannot be
    inverted) stay as they are. "torch" and "bnkit" turn an InPlaceABN back into BN +
    activation (in an nn.Sequential, an InPlaceABN followed by nn.Identity becomes the BN
    and the activation at those two indices again).

    Args:
        model: any nn.Module (a BN layer itself too).
        to: "torch", "bnkit", "sync" (process_group=None), "frozen", "renorm" (r_max=3.0,
            d_max=5.0), "ghost" (virtual_batch_size, required) or "group" (num_groups: default
            32 if it divides C, else the largest divisor of C below 32; GroupNorm gets only
            weight and bias) or "inplace_abn".
        inplace: replace the layers of `model` itself (default True); False works on a deep
            copy.
        **kwargs: the target's options above.

    Returns: the converted model (`model` itself unless it is a BN layer or inplace=False).

    Raises: ValueError naming the layer when it cannot be converted (channels not
    divisible by num_groups, no running statistics to freeze, a channel axis other than 1
    for 'group', a lazy layer before its first forward), TypeError for an unknown option;
    the model is unchanged then.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> type(convert(net, "bnkit")[1]).__name__
        'BatchNorm2d'
        >>> convert(net, "group", num_groups=4, inplace=False)[1].num_groups
        4
    """
    check_module(model, "convert")
    _check_kwargs(to, kwargs)
    work = working_copy(model, "convert", inplace)
    pairs = _neighbours(work, to)  # built first: a failure below leaves the model unchanged
    done = {id(seq[i]) for seq, i, _, _ in pairs}
    work = replace_all(work, lambda name, bn: None if id(bn) in done else build(to, name, bn,
                                                                                 kwargs),
                       select=convertible)
    for seq, i, first, second in pairs:
        seq[i], seq[i + 1] = first, second
    return work
