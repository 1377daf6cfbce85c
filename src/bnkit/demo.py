"""The BN paper's MNIST experiment (Ioffe & Szegedy 2015, section 4.1) on Fashion-MNIST.

A 784-100-100-100-10 sigmoid MLP is trained twice with plain SGD, with and without
`bnkit.nn.BatchNorm1d` before each sigmoid, from the same initial weights and on the same
batches. At this initialization (N(0, 1/28^2)) and learning rate (0.1) the plain network's
test accuracy stays at chance (10%) for the first 1,500 steps, while the BN network is past
80% after 500 (the shape of the paper's Fig. 1a).

The building blocks are public so experiments can reuse them: `load_data`, `make_mlp`,
`train_classifier`, `evaluate`.

Example:
    >>> import torch
    >>> from bnkit.demo import run_demo
    >>> torch.set_num_threads(1)                         # small model: one thread is fastest
    >>> results = run_demo(steps=500, eval_every=500, out=lambda line: None)  # or out=print
    >>> results["plain"][-1]["test_acc"] < 0.15 < 0.75 < results["bn"][-1]["test_acc"]
    True
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as bnn
from .data import load_fashion_mnist
from .progress import Bar

__all__ = ["DemoData", "batch_indices", "evaluate", "format_table", "load_data", "make_mlp",
           "run_demo", "summary_line", "train_classifier", "warm_up"]

INIT_STD = 1.0 / 28  # N(0, 1/28^2): the init under which the plain net plateaus at 10%
EVAL_BATCH = 1000  # test images per forward pass in `evaluate`


class DemoData(NamedTuple):
    """A classification data set held as tensors: x float (N, D) in [0, 1], y int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str  # folder the files came from, for the printout


def _flat_float(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, H*W) scaled to [0, 1], on `device`."""
    return images.reshape(len(images), -1).to(device=device, dtype=torch.float32).div_(255.0)


def load_data(root=None, device=None) -> DemoData:
    """Load Fashion-MNIST once as flat float tensors on `device`.

    Pixels become x / 255 in [0, 1]; images are flattened to 784 features.

    Args:
        root: The folder of the IDX files, the only one searched (default None: the loader's
            search order).
        device: Where the tensors live (default None: CPU).

    Shape: x_train (60000, 784) float32, y_train (60000,) int64, x_test (10000, 784).

    Raises:
        FileNotFoundError: The data set is in no searched folder (the message says how to
            install it).

    Example:
        >>> data = load_data()
        >>> data.x_train.shape, float(data.x_train.max())
        (torch.Size([60000, 784]), 1.0)
    """
    from .data.fashion_mnist import find_fashion_mnist

    x_tr, y_tr = load_fashion_mnist("train", root)
    x_te, y_te = load_fashion_mnist("test", root)
    source = str(find_fashion_mnist("train", root)[0].parent)
    return DemoData(_flat_float(x_tr, device), y_tr.to(device), _flat_float(x_te, device),
                    y_te.to(device), source)


def _check_positive_int(name: str, value, fix: str) -> None:
    """Raise ValueError unless value is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {fix}")


def make_mlp(bn: bool, hidden: int = 100, depth: int = 3, norm: Callable | None = None, *,
             in_features: int = 784, classes: int = 10, init_std: float = INIT_STD,
             seed: int = 0) -> nn.Sequential:
    """The sigmoid MLP of the BN paper: `depth` x [Linear -> (norm) -> Sigmoid] -> Linear.

    Weights are drawn from N(0, init_std^2) with a generator seeded by `seed`, so two calls
    with the same seed and sizes start from the same weights whether or not `bn` is set.
    Biases start at 0; the Linear layers feeding a norm layer have no bias (the norm's
    shift beta replaces it).

    Args:
        bn: Insert a norm layer before each sigmoid.
        hidden: Units per hidden layer (default 100).
        depth: Number of hidden layers (default 3).
        norm: Factory `num_features -> nn.Module` for the norm layer (default None:
            `bnkit.nn.BatchNorm1d`); only valid with bn=True.
        in_features: Input size (default 784 = 28 * 28).
        classes: Output size (default 10).
        init_std: Standard deviation of the initial weights (default 1/28).
        seed: Seed of the weight generator (default 0).

    Shape: input (N, in_features), output logits (N, classes).

    Example:
        >>> model = make_mlp(bn=True)
        >>> model(torch.rand(60, 784)).shape
        torch.Size([60, 10])
    """
    if norm is not None and not bn:
        raise ValueError("norm= is only used with bn=True, got bn=False and norm="
                         f"{norm!r}; pass bn=True to insert it, or drop norm=")
    for name, value in (("hidden", hidden), ("depth", depth), ("in_features", in_features),
                        ("classes", classes)):
        _check_positive_int(name, value, "pass a layer size or count >= 1")
    norm = norm or bnn.BatchNorm1d
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden, bias=not bn)] + ([norm(hidden)] if bn else [])
        layers.append(nn.Sigmoid())
        width = hidden
    layers.append(nn.Linear(width, classes))
    _init_linear(layers, init_std, seed)
    return nn.Sequential(*layers)


def _init_linear(layers, init_std: float, seed: int) -> None:
    """Weights ~ N(0, init_std^2) in layer order from one seeded generator; biases 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * init_std)
                if layer.bias is not None:
                    layer.bias.zero_()


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Yield index tensors (batch_size,) forever: one random permutation per epoch.

    The last partial batch of an epoch is dropped so every step sees batch_size samples
    (BN statistics depend on the batch size).
    """
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = EVAL_BATCH) -> float:
    """Accuracy of `model` on (x, y) in eval mode, in batches; the mode is restored after.

    Example:
        >>> model = make_mlp(bn=False)
        >>> 0.0 <= evaluate(model, torch.rand(10, 784), torch.zeros(10, dtype=torch.long)) <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def _check_training_args(data: DemoData, steps, lr, batch_size, eval_every) -> None:
    """Validate train_classifier's arguments before anything is touched."""
    _check_positive_int("steps", steps, "pass the number of SGD steps, e.g. 2000")
    _check_positive_int("eval_every", eval_every, "pass how many steps between evaluations")
    _check_positive_int("batch_size", batch_size, "pass e.g. 60")
    if batch_size > len(data.x_train):
        raise ValueError(f"batch_size must be at most the training set size "
                         f"({len(data.x_train)}), got {batch_size}; pass a smaller batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 \
            or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}; pass e.g. 0.1")


def train_classifier(model: nn.Module, data: DemoData, steps: int, lr: float = 0.1,
                     batch_size: int = 60, eval_every: int = 500, seed: int = 0,
                     on_eval: Callable | None = None, bar=None) -> list[dict]:
    """Train with plain SGD on softmax cross-entropy; evaluate every `eval_every` steps.

    Batches come from `batch_indices` with a generator seeded by `seed`, so two models
    trained with the same seed see the same batches in the same order.

    Args:
        model: Maps (B, D) inputs to (B, classes) logits; trained in place.
        data: A `DemoData` (tensors already on the model's device).
        steps: Number of SGD steps.
        lr: Learning rate (default 0.1).
        batch_size: Samples per step (default 60).
        eval_every: Steps between test-set evaluations (default 500); the last step is
            always evaluated.
        seed: Seed of the batch order (default 0).
        on_eval: Optional `f(row, model) -> dict | None`, called at each evaluation; a
            returned dict is merged into the row (e.g. activation percentiles).
        bar: Optional `bnkit.progress.Bar`, advanced once per step.

    Returns:
        One dict per evaluation: step, test_acc (in [0, 1]), train_loss (mean over the
        steps since the previous row), ms_per_step (training time only), elapsed_s.

    Example:
        >>> rows = train_classifier(make_mlp(bn=True), load_data(), steps=100, eval_every=50)
        >>> [r["step"] for r in rows]
        [50, 100]
    """
    _check_training_args(data, steps, lr, batch_size, eval_every)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = batch_indices(len(data.x_train), batch_size, torch.Generator().manual_seed(seed))
    rows, loss_sum, train_s, elapsed = [], 0.0, 0.0, 0.0
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        idx = next(batches)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach())  # syncs, so the timing includes device work
        train_s += time.perf_counter() - t0
        if bar is not None:
            bar.advance()
        if step % eval_every == 0 or step == steps:
            n = step - (rows[-1]["step"] if rows else 0)
            elapsed += train_s
            rows.append(_eval_row(model, data, step, loss_sum / n, 1e3 * train_s / n, elapsed,
                                  on_eval))
            loss_sum, train_s = 0.0, 0.0
    return rows


def _eval_row(model, data, step, train_loss, ms_per_step, elapsed, on_eval) -> dict:
    """Evaluate on the test set and build one result row."""
    row = {"step": step, "test_acc": evaluate(model, data.x_test, data.y_test),
           "train_loss": train_loss, "ms_per_step": ms_per_step, "elapsed_s": elapsed}
    extra = on_eval(row, model) if on_eval is not None else None
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"on_eval must return a dict of extra columns or None, got "
                        f"{type(extra).__name__} {extra!r}; end the callback with `return None` "
                        "(a progress bar's update() returns a bool)")
    if extra:
        row.update(extra)
    return row


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            x_eval: torch.Tensor | None = None) -> float:
    """Run one training step, then an eval forward of `x_eval`, on a copy of `model`.

    The first call of a layer can pay one-time costs (operator registration, kernel
    compilation for the train and eval paths); paying them on a copy keeps them out of the
    per-step timing and leaves `model` (weights, running statistics) untouched. torch's
    thread count is restored after, since starting a compiled backend's OpenMP thread pool
    can reset it.

    Returns:
        The time taken, in seconds.
    """
    threads, t0 = torch.get_num_threads(), time.perf_counter()
    twin = copy.deepcopy(model).train()
    F.cross_entropy(twin(x), y).backward()
    if x_eval is not None:
        with torch.no_grad():
            twin.eval()(x_eval)
    torch.set_num_threads(threads)
    return time.perf_counter() - t0


def format_table(plain: list[dict], bn: list[dict]) -> str:
    """The comparison table: step | no BN acc | BN acc | ms/step of each."""
    header = (f"{'step':>6} | {'no BN acc':>9} | {'BN acc':>7} | {'no BN ms/step':>13} | "
              f"{'BN ms/step':>10}")
    lines = [header, "-" * len(header)]
    for p, b in zip(plain, bn):
        lines.append(f"{p['step']:>6} | {p['test_acc']:>9.1%} | {b['test_acc']:>7.1%} | "
                     f"{p['ms_per_step']:>13.2f} | {b['ms_per_step']:>10.2f}")
    return "\n".join(lines)


def _first_step_above(rows: list[dict], level: float) -> str:
    """The first evaluated step with test accuracy >= level, or 'never'."""
    return next((f"step {r['step']}" for r in rows if r["test_acc"] >= level), "never")


def summary_line(plain: list[dict], bn: list[dict], level: float = 0.8) -> str:
    """One line: final accuracies and the first evaluated step reaching `level`."""
    p, b = plain[-1], bn[-1]
    return (f"After {b['step']} steps: BN {b['test_acc']:.1%} vs no BN {p['test_acc']:.1%} "
            f"test accuracy; first >= {level:.0%}: {_first_step_above(bn, level)} with BN, "
            f"{_first_step_above(plain, level)} without.")


def run_demo(steps: int = 2000, eval_every: int = 500, data=None, lr: float = 0.1,
             batch_size: int = 60, seed: int = 0, out: Callable = print,
             progress: bool = False) -> dict:
    """Train the plain and the BN MLP on the same batches and print the comparison.

    Args:
        steps, eval_every, lr, batch_size, seed: As in `train_classifier` (defaults 2000,
            500, 0.1, 60, 0); `seed` also seeds the initial weights.
        data: A `DemoData`, or the folder of the IDX files (default None:
            the loader's search order).
        out: Where lines are printed (default print).
        progress: Show a progress bar per model on a terminal (stderr; needs tqdm), and
            print a line as each model finishes (default False).

    Returns:
        {"plain": rows, "bn": rows}, the rows of `train_classifier`.

    Example:
        >>> results = run_demo(steps=200, eval_every=100, out=lambda line: None)
        >>> [r["step"] for r in results["bn"]]
        [100, 200]
    """
    if not isinstance(data, DemoData):
        data = load_data(data)
    _check_training_args(data, steps, lr, batch_size, eval_every)  # before any work
    out(f"Fashion-MNIST from {data.source}: {len(data.x_train)} train / {len(data.x_test)} "
        f"test images. MLP {data.x_train.shape[1]}-100-100-100-10, sigmoid, SGD lr {lr}, "
        f"batch {batch_size}, {steps} steps, {torch.get_num_threads()} thread(s).")
    results = {}
    for key, bn in (("plain", False), ("bn", True)):
        model = make_mlp(bn, in_features=data.x_train.shape[1], seed=seed).to(data.x_train.device)
        setup_s = warm_up(model, data.x_train[:batch_size], data.y_train[:batch_size],
                          data.x_test[:EVAL_BATCH])
        if setup_s > 0.1:
            out(f"({'BN' if bn else 'no BN'} model: {setup_s:.1f} s one-time setup on the first "
                "step, excluded from ms/step)")
        label = "BN" if bn else "no BN"
        with Bar(steps, f"{label} model", enabled=progress) as bar:
            results[key] = train_classifier(model, data, steps, lr, batch_size, eval_every,
                                            seed, bar=bar)
        if progress:
            last = results[key][-1]
            out(f"{label} model: {steps} steps, {last['elapsed_s']:.1f} s of training, "
                f"test accuracy {last['test_acc']:.1%}")
    out(format_table(results["plain"], results["bn"]))
    out(summary_line(results["plain"], results["bn"]))
    return results
