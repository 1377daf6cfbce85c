"""The BN paper's MNIST experiment (Ioffe & Szegedy 2015, section 4.1) on Fashion-MNIST.

A 784-100-100-100-10 sigmoid MLP is trained twice with plain SGD, with and without
`bnkit.nn.BatchNorm1d` before each sigmoid, from the same initial weights and on the same
batches. At this initialization (N(0, 1/28^2)) and learning rate (0.1) the plain network's
test accuracy stays at chance (10%) for the first 1,500 steps, while the BN network is past
80% after 500 (the shape of the paper's Fig. 1a).

A thin command over the lab's pieces: the model is `bnkit.lab.models.make_mlp`, the data,
the training loop and the evaluation are `bnkit.lab.train`'s (re-exported here: `load_data`,
`make_mlp`, `train_classifier`, `evaluate`, `batch_indices`, `warm_up`).

Example:
    >>> import torch
    >>> from bnkit.demo import run_demo
    >>> torch.set_num_threads(1)                         # small model: one thread is fastest
    >>> results = run_demo(steps=500, eval_every=500, out=lambda line: None)  # or out=print
    >>> results["plain"][-1]["test_acc"] < 0.15 < 0.75 < results["bn"][-1]["test_acc"]
    True
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .lab.models import INIT_STD, make_mlp
from .lab.train import (
    EVAL_BATCH,
    ClassificationData,
    TrainConfig,
    batch_indices,
    evaluate,
    load_data,
    train_classifier,
    warm_up,
)
from .progress import Bar

__all__ = ["INIT_STD", "DemoData", "batch_indices", "evaluate", "format_table", "load_data",
           "make_mlp", "run_demo", "summary_line", "train_classifier", "warm_up"]

DemoData = ClassificationData  # the name this module has always exported


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
        data: A `ClassificationData` (`DemoData`), or the folder of the IDX files (default None:
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
    if not isinstance(data, ClassificationData):
        data = load_data(data)
    TrainConfig(steps=steps, batch=batch_size, lr=lr, momentum=0.0, eval_every=eval_every,
                seed=seed).check(len(data.x_train))  # before any work
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
