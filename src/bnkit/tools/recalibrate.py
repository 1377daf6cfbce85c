"""Precise BN: set running statistics to the exact population statistics of some data.

The running buffers of a BN layer are a momentum (EMA) average of batch statistics taken
while the weights moved. `recalibrate` replaces them with the statistics of the layer's
inputs pooled over whole batches of data with the weights fixed (Wu & Johnson 2021):

    N = sum_b n_b,   mean = sum_b n_b m_b / N,
    var_pop = (sum_b n_b v_b + sum_b n_b (m_b - mean)^2) / N   (within + between batches),
    running_mean = mean,  running_var = var_pop * N / (N - 1)  (unbiased, as torch stores it)

where (n_b, m_b, v_b) are the per-channel count, mean and biased variance of batch b,
measured in float64 by `bnkit.functional.batch_stats` and pooled with `merge_stats`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..functional.checks import normalize_axis
from ..functional.stats import Stats, batch_stats, mask_view, merge_stats
from ._run import batches, call_model, check_run_args, preserved
from .walk import bn_axis, bn_layers, has_running_stats, is_frozen_bn, working_copy


def input_stats(x: torch.Tensor, axis: int, mask: torch.Tensor | None = None) -> Stats:
    """Per-channel (count, mean, biased var) of a BN input in float64, honouring a mask."""
    x = x.detach().to(torch.float64)
    axis = normalize_axis(axis, x.dim())
    if mask is not None:
        mask = mask_view(mask.detach(), x.dim(), axis)
    return batch_stats(x, axis, mask)


class Call(NamedTuple):
    """One BN call seen by a hook. key is the layer name, or "name[t=row]" for the per-step
    statistics row `row` of a layer such as RecurrentBatchNorm (row None otherwise)."""

    name: str
    key: str
    module: nn.Module
    row: int | None
    x: torch.Tensor
    mask: torch.Tensor | None
    stats: Stats


def parse_call(module: nn.Module, args: tuple, kwargs: dict):
    """(x, mask, row) of a BN call: forward(x, mask=None), or forward(x, t, mask=None) for a
    layer with per-step statistics (running_mean of shape (steps, C))."""
    x = args[0] if args else kwargs["input"]
    rest, row = list(args[1:]), None
    rm = getattr(module, "running_mean", None)
    if isinstance(rm, torch.Tensor) and rm.dim() == 2:
        t = rest.pop(0) if rest else kwargs["t"]
        row = min(int(t), rm.shape[0] - 1)
    mask = rest[0] if rest else kwargs.get("mask")
    return x, mask, row


def running_views(bn: nn.Module, row: int | None):
    """(running_mean, running_var) of the layer, or of its statistics row `row`: views."""
    if row is None:
        return bn.running_mean, bn.running_var
    return bn.running_mean[row], bn.running_var[row]


class StatsCollector:
    """Forward pre-hooks that pool each layer's input statistics over batches.

    `stats[key]` is the merged Stats of every input seen under that key (see `Call`),
    `where[key]` its (layer name, row), `batch_size[key]` the leading size of its first input.
    `on_input(call)`, if given, runs in the hook before the layer's forward (adapt uses it
    to set mixed statistics). Use as a context manager: hooks are removed on exit.
    """

    def __init__(self, layers: dict[str, nn.Module],
                 on_input: Callable[[Call], None] | None = None):
        self.layers, self.on_input = layers, on_input
        self.stats: dict[str, Stats] = {}
        self.where: dict[str, tuple[str, int | None]] = {}
        self.batch_size: dict[str, int] = {}
        self.batches = 0  # batches run through the model (counted by `collect`)
        self._hooks: list = []

    def __enter__(self):
        self._hooks = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                       for name, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            x, mask, row = parse_call(module, args, kwargs)
            s = input_stats(x, bn_axis(module), mask)
            key = name if row is None else f"{name}[t={row}]"
            old = self.stats.get(key)
            self.stats[key] = s if old is None else merge_stats(old, s)
            self.where.setdefault(key, (name, row))
            self.batch_size.setdefault(key, int(x.shape[0]))
            if self.on_input is not None:
                self.on_input(Call(name, key, module, row, x, mask, s))
        return hook


def unbiased(s: Stats) -> torch.Tensor:
    """Variance with Bessel's correction, var * n / (n - 1), as torch's running_var holds it."""
    return s.var * (s.count / (s.count - 1))


def stat_layers(model: nn.Module, tool: str = "recalibrate", *,
                required: bool = True) -> dict[str, nn.Module]:
    """BN layers whose running statistics the tools may set: has buffers and is not frozen.

    When there is none, raises ValueError naming what the model holds (the call would change
    nothing) if `required`, else returns {}. Warns, naming them, when frozen BN layers are
    left alone beside others.
    """
    found = bn_layers(model)
    layers = {n: m for n, m in found if has_running_stats(m) and not is_frozen_bn(m)}
    frozen = [(n, m) for n, m in found if is_frozen_bn(m)]
    if not layers and not required:
        return layers
    if not layers:
        raise ValueError(f"{tool}: {_nothing_to_set(model, found, frozen)}")
    if frozen:
        names = ", ".join(repr(n) for n, _ in frozen)
        warnings.warn(f"{tool}: left {count_layers(frozen, 'frozen BN layer')} alone, with fixed "
                      f"statistics: {names}; to set frozen layers too, unfreeze first: "
                      "model = bnkit.unfreeze(model) (bnkit.freeze freezes again after)",
                      stacklevel=4)
    return layers


def count_layers(layers: list, what: str) -> str:
    """'3 frozen BN layers (FrozenBatchNorm)': how many, and their classes."""
    kinds = sorted({type(m).__name__ for _, m in layers})
    return f"{len(layers)} {what}{'s' * (len(layers) != 1)} ({', '.join(kinds)})"


def _nothing_to_set(model: nn.Module, found: list, frozen: list) -> str:
    """Why no layer can be recalibrated, and what to do instead."""
    untracked = [(n, m) for n, m in found if not is_frozen_bn(m) and not has_running_stats(m)]
    if frozen:
        also = f" and {count_layers(untracked, 'BN layer')} without running statistics" \
            if untracked else ""
        return (f"found {count_layers(frozen, 'frozen BN layer')}{also} and no trainable BN layer whose "
                "running statistics can be set, so nothing would change: frozen layers keep "
                "fixed statistics by design. Unfreeze them first: model = bnkit.unfreeze(model), "
                "then recalibrate/adapt (and model = bnkit.freeze(model) to freeze them again)")
    if untracked:
        return (f"found {count_layers(untracked, 'BN layer')} without running statistics "
                "(track_running_stats=False) and none with them, so nothing would change: such "
                "layers normalize with batch statistics in eval mode too. Build them with "
                "track_running_stats=True to use population statistics")
    return (f"found no BN layer in the model ({type(model).__name__}), so nothing would change; "
            "pass a model with torch.nn or bnkit.nn BatchNorm layers")


def collect(model: nn.Module, data, layers: dict[str, nn.Module], *, train: bool,
            num_batches=None, forward=None, progress=False,
            on_input: Callable[[Call], None] | None = None,
            tool: str = "recalibrate") -> StatsCollector:
    """Run `model` without gradients over the batches (all modules in train mode if `train`,
    else eval) and pool the inputs of `layers`. Modes, flags and all buffers are restored."""
    with preserved(model), StatsCollector(layers, on_input) as col, torch.no_grad():
        model.train(train)
        for batch in batches(data, num_batches, progress, tool):
            call_model(model, batch, forward, tool)
            col.batches += 1
    if col.batches == 0:
        raise ValueError(f"{tool}: data yielded no batches; pass a non-empty iterable of batches")
    return col


def write_population(layers: dict[str, nn.Module], col: StatsCollector, tool: str,
                     blend: Callable | None = None) -> None:
    """Set running_mean / running_var of every layer that saw at least two values to the
    pooled mean and unbiased variance, or to blend(key, mean, var) -> (mean, var) (float64)."""
    reached = {name for name, _ in col.where.values()}
    missed = [n for n in layers if n not in reached]
    if missed:
        warnings.warn(f"{tool}: {len(missed)} BN layer(s) received no input and keep their "
                      f"running statistics: {', '.join(missed)}", stacklevel=4)
    for key, s in col.stats.items():
        if float(s.count) < 2:
            raise ValueError(f"{tool}: BN layer '{key}' saw {int(s.count)} value per channel; "
                             "the unbiased variance needs at least 2: pass more or larger batches")
    with torch.no_grad():
        for key, s in col.stats.items():
            name, row = col.where[key]
            rm, rv = running_views(layers[name], row)
            mean, var = s.mean, unbiased(s)
            if blend is not None:
                mean, var = blend(key, mean, var)
            rm.copy_(mean.to(rm.dtype))
            rv.copy_(var.to(rv.dtype))


def recalibrate(model: nn.Module, data, *, num_batches: int | None = None,
                forward: Callable | None = None, progress: bool = True,
                inplace: bool = True) -> nn.Module:
    """Set every BN's running statistics to the population statistics of `data` (precise BN).

    Updates `model` in place and returns it, as torch.optim.swa_utils.update_bn does; pass
    inplace=False to get a recalibrated deep copy and leave `model` as it is.

    Runs the model in training mode without gradients (each BN normalizes with its batch
    statistics, as in training) and records each BN's input. Afterwards
    running_mean = pooled mean and running_var = pooled biased variance * N/(N-1), with
    N the total number of values per channel (see the module docstring for the pooling).
    Nothing else changes: parameters, every other buffer (num_batches_tracked included),
    training flags and momentum are as before. Frozen BN layers and layers without running
    statistics are left alone (frozen ones named in a warning); layers that receive no input
    keep their statistics (warning). A failed call leaves the model as it was.

    Args:
        model: any nn.Module containing BN layers (torch.nn or bnkit.nn).
        data: iterable of batches: tensors, or (input, target) tuples (input used).
        num_batches: use only the first num_batches batches. Default None (all).
        forward: forward(model, batch) for other call conventions. Default None.
        progress: show a tqdm progress bar if tqdm is installed. Default True.
        inplace: update `model` itself (True, default) or a deep copy of it (False).

    Returns: the recalibrated model: `model` itself, or the copy when inplace=False.

    Raises: ValueError, naming what the model holds, when it has no BN layer whose
    statistics can be set (e.g. only frozen layers: unfreeze them with bnkit.unfreeze first).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> data = [torch.randn(16, 4) for _ in range(4)]
        >>> recalibrate(net, data, progress=False) is net
        True
    """
    check_run_args("recalibrate", model, data, num_batches, forward)
    work = working_copy(model, "recalibrate", inplace)
    return set_population(work, data, tool="recalibrate", num_batches=num_batches,
                          forward=forward, progress=progress)


def set_population(model: nn.Module, data, *, tool: str, num_batches=None, forward=None,
                   progress=True, layers: dict[str, nn.Module] | None = None) -> nn.Module:
    """The recalibration itself, on `model` in place (arguments already checked), of
    `layers` (default: `stat_layers(model, tool)`); `tool` names the caller in messages.
    Returns `model`."""
    layers = stat_layers(model, tool) if layers is None else layers
    col = collect(model, data, layers, train=True, num_batches=num_batches, forward=forward,
                  progress=progress, tool=tool)
    write_population(layers, col, tool)
    return model
