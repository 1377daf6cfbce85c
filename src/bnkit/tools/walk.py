"""One module walker for every model tool: find BN layers, name them, replace them.

A model is a tree of modules; each non-root module is reached as `parent.<attr>` and named
by its qualified name ("layer1.0.bn1"). The tools walk the tree once, decide what to do per
layer, and only then replace layers by qualified name, so a failed check changes nothing.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> [name for name, _ in bn_layers(model)]
    ['1']
    >>> _ = replace_module(model, "1", torch.nn.Identity())
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.base import NormBase


class Site(NamedTuple):
    """Where a module lives: its qualified name, itself, its parent and the attribute name.

    The root has name "", parent None and attr "".
    """

    name: str
    module: nn.Module
    parent: nn.Module | None
    attr: str


def walk(model: nn.Module) -> Iterator[Site]:
    """Every module of `model` (root first, depth first), each once, with its parent."""
    seen: set[int] = set()

    def visit(module, name, parent, attr):
        if id(module) in seen:
            return
        seen.add(id(module))
        yield Site(name, module, parent, attr)
        for child_attr, child in module.named_children():
            child_name = f"{name}.{child_attr}" if name else child_attr
            yield from visit(child, child_name, module, child_attr)

    yield from visit(model, "", None, "")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at qualified `name` ("" is the model itself)."""
    return model.get_submodule(name) if name else model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at qualified `name` and return the (possibly new) root.

    Replacing "" (the model is itself the layer) returns `new` as the new root.
    """
    if not name:
        return new
    parent_name, _, attr = name.rpartition(".")
    setattr(get_module(model, parent_name), attr, new)
    return model


def is_frozen_bn(module: nn.Module) -> bool:
    """A frozen BN: statistics and affine held as fixed buffers (bnkit's FrozenBatchNorm, or
    torchvision/detectron2-style FrozenBatchNorm2d recognised by duck typing)."""
    if "FrozenBatchNorm" not in type(module).__name__:
        return False
    return all(isinstance(getattr(module, k, None), torch.Tensor)
               for k in ("weight", "bias", "running_mean", "running_var"))


def is_bn(module: nn.Module) -> bool:
    """A BN layer: torch's _BatchNorm (incl. SyncBatchNorm), any bnkit NormBase subclass,
    or a frozen BN (see `is_frozen_bn`)."""
    return isinstance(module, (_BatchNorm, NormBase)) or is_frozen_bn(module)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every BN layer, in walk order."""
    return [(s.name, s.module) for s in walk(model) if is_bn(s.module)]


def has_running_stats(bn: nn.Module) -> bool:
    """Whether the layer holds running_mean and running_var tensors."""
    return (isinstance(getattr(bn, "running_mean", None), torch.Tensor)
            and isinstance(getattr(bn, "running_var", None), torch.Tensor))


def bn_axis(bn: nn.Module) -> int:
    """The layer's channel axis (torch BN and frozen BN: 1)."""
    return int(getattr(bn, "axis", 1))


def bn_eps(bn: nn.Module) -> float:
    """The layer's eps (1e-5 when a duck-typed frozen BN does not store one)."""
    return float(getattr(bn, "eps", 1e-5))


def replace_all(model: nn.Module, build: Callable[[str, nn.Module], nn.Module | None],
                select: Callable[[nn.Module], bool] = is_bn) -> nn.Module:
    """Replace every selected module by `build(name, module)` (None keeps it); returns the root.

    All replacements are built first, then installed, so an error raised by `build` leaves
    the model untouched. A module reachable under several names is built once and installed
    under each of them (sharing is kept).
    """
    sites = [s for s in _all_sites(model) if select(s.module)]
    built: dict[int, nn.Module | None] = {}
    for s in sites:
        if id(s.module) not in built:
            built[id(s.module)] = build(s.name, s.module)
    for s in sites:
        new = built[id(s.module)]
        if new is not None:
            model = replace_module(model, s.name, new)
    return model


def _all_sites(model: nn.Module) -> list[Site]:
    """Like `walk`, but a module shared under several names is listed under each name."""
    sites = []
    for name, module in model.named_modules(remove_duplicate=False):
        parent_name, _, attr = name.rpartition(".")
        parent = get_module(model, parent_name) if name else None
        sites.append(Site(name, module, parent, attr))
    return sites


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name under which it is reachable."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def check_initialized(model: nn.Module, tool: str) -> None:
    """Raise, naming it, for a lazy module that has not run yet (its shapes are unknown:
    it can be neither copied nor measured nor converted)."""
    for s in walk(model):
        lazy = getattr(s.module, "has_uninitialized_params", None)
        if lazy is not None and lazy():
            where = f"layer '{s.name}'" if s.name else "the model"
            raise ValueError(f"{tool}: {where} ({type(s.module).__name__}) is a lazy layer before "
                             "its first forward (its shapes are unknown); run one batch through "
                             "the model first")


def check_module(model, tool: str) -> None:
    """Raise TypeError, naming `tool`, when `model` is not an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{tool} expects an nn.Module (got {type(model).__name__}); pass the "
                        f"model, e.g. bnkit.{tool}(model)")


def working_copy(model: nn.Module, tool: str, inplace: bool = False) -> nn.Module:
    """`model` itself if inplace, else a deep copy, after `check_initialized`."""
    check_initialized(model, tool)
    return model if inplace else copy.deepcopy(model)
