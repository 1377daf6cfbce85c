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


def stat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BN layers whose running statistics the tools may set: has buffers and is not frozen."""
    return {n: m for n, m in bn_layers(model) if has_running_stats(m) and not is_frozen_bn(m)}


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
                      f"running statistics: {', '.join(missed)}", stacklevel=3)
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
                inplace: bool = False) -> nn.Module:
    """Set every BN's running statistics to the population statistics of `data` (precise BN).

    Runs the model in training mode without gradients (each BN normalizes with its batch
    statistics, as in training) and records each BN's input. Afterwards
    running_mean = pooled mean and running_var = pooled biased variance * N/(N-1), with
    N the total number of values per channel (see the module docstring for the pooling).
    Nothing else changes: parameters, every other buffer (num_batches_tracked included),
    training flags and momentum are as before. Frozen BN layers and layers without running
    statistics are left alone; layers that receive no input keep their statistics (warning).

    Args:
        model: any nn.Module containing BN layers (torch.nn or bnkit.nn).
        data: iterable of batches: tensors, or (input, target) tuples (input used).
        num_batches: use only the first num_batches batches. Default None (all).
        forward: forward(model, batch) for other call conventions. Default None.
        progress: show a tqdm progress bar if tqdm is installed. Default True.
        inplace: change `model` itself instead of a copy. Default False.

    Returns: the recalibrated model (a deep copy unless inplace=True).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> data = [torch.randn(16, 4) for _ in range(4)]
        >>> net = recalibrate(net, data, progress=False)
    """
    check_run_args("recalibrate", model, data, num_batches, forward)
    work = working_copy(model, "recalibrate", inplace)
    layers = stat_layers(work)
    col = collect(work, data, layers, train=True, num_batches=num_batches, forward=forward,
                  progress=progress)
    write_population(layers, col, "recalibrate")
    return work
