"""Running a model over data for the tools: argument checks, call convention, progress bar,
and a context that puts every mode, momentum and buffer back afterwards.

Call convention: a batch that is a tensor is passed as model(batch); a tuple or list as
model(batch[0]) (an (input, target) pair); anything else needs forward(model, batch).
Tensors are moved to the device of the model's first parameter or buffer.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

_FLAGS = ("momentum", "track_running_stats")  # module attributes the tools may flip


def check_run_args(tool: str, model, data, num_batches, forward) -> None:
    """Validate the arguments shared by recalibrate / adapt / inspect before anything runs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{tool} expects an nn.Module (got {type(model).__name__}); pass the model")
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"{tool}: data must be an iterable of batches, such as a DataLoader or a "
                        f"list of tensors (got {type(data).__name__}); wrap a single batch as "
                        "[x]")
    if num_batches is not None and (isinstance(num_batches, bool)
                                    or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"{tool}: num_batches must be None (all batches) or a positive int "
                         f"(got {num_batches!r}); pass e.g. num_batches=100")
    if forward is not None and not callable(forward):
        raise TypeError(f"{tool}: forward must be a callable forward(model, batch) -> output "
                        f"(got {type(forward).__name__}); e.g. forward=lambda m, b: m(**b)")


def batches(data, num_batches: int | None, progress: bool, desc: str) -> Iterator:
    """The first `num_batches` batches of `data` (all if None), with a tqdm bar if asked and
    tqdm is installed."""
    it: Iterable = data if num_batches is None else itertools.islice(data, num_batches)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iter(it)
        total = num_batches if num_batches is not None else _len(data)
        if num_batches is not None and _len(data) is not None:
            total = min(num_batches, _len(data))
        return iter(tqdm(it, total=total, desc=desc, leave=False))
    return iter(it)


def _len(data) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def call_model(model: nn.Module, batch, forward: Callable | None, tool: str):
    """Run the model on one batch with the call convention above; returns its output."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{tool} cannot call the model on a batch of type "
                        f"{type(batch).__name__}: expected a tensor or an (input, target) tuple; "
                        "pass forward=lambda model, batch: model(...) for other batches")
    return model(batch.to(_device(model)))


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def preserved(model: nn.Module):
    """Restore, on exit (also after an error), every module's training flag, `momentum` and
    `track_running_stats` attributes, and every buffer's value (the same tensor objects)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(m, k, getattr(m, k)) for m in model.modules() for k in _FLAGS if hasattr(m, k)]
    bufs = [(m, k, t, t.detach().clone()) for m in model.modules()
            for k, t in m._buffers.items() if t is not None]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, k, t, saved in bufs:
                t.copy_(saved)
                m._buffers[k] = t
        for m, k, v in flags:
            setattr(m, k, v)
        for m, training in modes:
            m.training = training
