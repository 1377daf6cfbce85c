"""Training pieces shared by `bnkit demo` and every lab experiment: the data, the batches,
one training loop (`fit`) and one evaluation (`evaluate`).

`fit` trains any classifier on cross-entropy under a `TrainConfig` (SGD with or without
momentum, or RMSprop; optional weight decay, gradient clipping, micro-batches whose summed
gradient makes one step, a subset of the parameters, a custom batch order) and evaluates
with a callback. `train_classifier` is `fit` with plain SGD and the test accuracy at each
evaluation: the BN paper's set-up, used by the demo and the MLP experiments.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import load_fashion_mnist

__all__ = [
    "EVAL_BATCH",
    "ClassificationData",
    "TrainConfig",
    "batch_indices",
    "class_subset",
    "evaluate",
    "fit",
    "get_data",
    "images",
    "load_data",
    "subset",
    "train_classifier",
    "warm_up",
]

EVAL_BATCH = 1000  # test images per forward pass in `evaluate`


class ClassificationData(NamedTuple):
    """A classification data set held as tensors: x float (N, D) in [0, 1], y int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str  # folder the files came from, for the printout


def _flat_float(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, H*W) scaled to [0, 1], on `device`."""
    return images.reshape(len(images), -1).to(device=device, dtype=torch.float32).div_(255.0)


def load_data(root=None, device=None) -> ClassificationData:
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
    from ..data.fashion_mnist import find_fashion_mnist

    x_tr, y_tr = load_fashion_mnist("train", root)
    x_te, y_te = load_fashion_mnist("test", root)
    source = str(find_fashion_mnist("train", root)[0].parent)
    return ClassificationData(_flat_float(x_tr, device), y_tr.to(device),
                              _flat_float(x_te, device), y_te.to(device), source)


_DATA: dict[str | None, ClassificationData] = {}


def get_data(root: str | None = None) -> ClassificationData:
    """Fashion-MNIST as flat float tensors in [0, 1] (see `load_data`), cached per process."""
    if root not in _DATA:
        _DATA.clear()  # one data set at a time keeps memory bounded
        _DATA[root] = load_data(root)
    return _DATA[root]


def images(x: torch.Tensor) -> torch.Tensor:
    """Flat (N, S*S) pixels -> (N, 1, S, S) view (no copy).

    Example:
        >>> images(torch.zeros(2, 784)).shape
        torch.Size([2, 1, 28, 28])
    """
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"images expects square images flattened to S*S features (got "
                         f"{x.shape[1]} features); pass Fashion-MNIST-like data")
    return x.view(len(x), 1, side, side)


def subset(data: ClassificationData, n_train: int | None = None,
           n_test: int | None = None) -> ClassificationData:
    """The first n_train training and n_test test examples (None: all)."""
    return data._replace(x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
                         x_test=data.x_test[:n_test], y_test=data.y_test[:n_test])


def class_subset(x, y, classes, per_class: int | None = None, seed: int = 0):
    """Examples of `classes` (labels remapped to 0..len-1), at most `per_class` of each.

    Which examples are kept is a seeded random choice, the same for the same seed.

    Shape: x (N, ...), y (N,) -> x (M, ...), y (M,) with M <= len(classes) * per_class.

    Example:
        >>> x, y = class_subset(torch.arange(6.0), torch.tensor([5, 6, 5, 6, 7, 5]), [5, 6], 1)
        >>> sorted(y.tolist())
        [0, 1]
    """
    gen = torch.Generator().manual_seed(seed)
    keep, labels = [], []
    for new, cls in enumerate(classes):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
        keep.append(idx)
        labels.append(torch.full((len(idx),), new, dtype=torch.long))
    keep_t = torch.cat(keep)
    order = torch.randperm(len(keep_t), generator=gen)  # mix the classes
    return x[keep_t[order]], torch.cat(labels)[order]


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
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
        >>> model = torch.nn.Linear(784, 10)
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


# ----------------------------------------------------------------------------- training

def _positive_int(name: str, value, fix: str) -> None:
    """Raise ValueError unless value is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {fix}")


OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
    "rmsprop": lambda params, cfg: torch.optim.RMSprop(params, lr=cfg.lr,
                                                       weight_decay=cfg.weight_decay),
}


@dataclass(frozen=True)
class TrainConfig:
    """How `fit` trains: the settings that travel together from an experiment's config to
    the loop.

    Attributes:
        steps: optimizer steps.
        batch: examples per step (at most the number of training examples).
        lr: learning rate.
        momentum: SGD momentum (default 0.9; 0 is plain SGD; unused by RMSprop).
        weight_decay: L2 penalty of the optimizer (default 0).
        optimizer: 'sgd' (default) or 'rmsprop', a key of OPTIMIZERS.
        clip: clip the gradient norm to this value before each step (default None: no).
        micro: examples per forward pass; their gradients add up to one step (default None:
            the whole batch in one pass).
        eval_every: steps between evaluations; the last step is always evaluated (default
            None: the last step only).
        seed: seed of the batch order (default 0).

    Example:
        >>> TrainConfig(steps=100, batch=32, lr=0.1).momentum
        0.9
    """

    steps: int
    batch: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    clip: float | None = None
    micro: int | None = None
    eval_every: int | None = None
    seed: int = 0

    def check(self, n_train: int) -> None:
        """Raise ValueError naming the setting when it cannot train on n_train examples."""
        _positive_int("steps", self.steps, "pass the number of optimizer steps, e.g. 2000")
        if self.eval_every is not None:
            _positive_int("eval_every", self.eval_every,
                          "pass how many steps between evaluations")
        _positive_int("batch", self.batch, "pass the examples per step, e.g. 60")
        if self.batch > n_train:
            raise ValueError(f"batch must be at most the number of training examples "
                             f"({n_train}), got {self.batch}; lower the batch size or use "
                             "more data")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 \
                or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}; pass e.g. 0.1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}; pass one of those")

    def evaluates_at(self, step: int) -> bool:
        """Whether `fit` evaluates after `step`."""
        return step == self.steps or bool(self.eval_every and step % self.eval_every == 0)


def _step(model, xb, yb, micro: int | None) -> float:
    """Accumulate the gradient of the mean loss over xb, in chunks of `micro` examples."""
    if micro is None or micro >= len(xb):
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return float(loss.detach())  # syncs, so a step's timing includes device work
    total = 0.0
    for xs, ys in zip(xb.split(micro), yb.split(micro)):
        loss = F.cross_entropy(model(xs), ys) * (len(xs) / len(xb))  # sum = mean over xb
        loss.backward()
        total += float(loss.detach())
    return total


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, *,
        params=None, bar=None, eval_fn: Callable | None = None,
        order: Iterator[torch.Tensor] | None = None) -> list[dict]:
    """Train `model` on cross-entropy as `config` says; return the evaluation rows.

    Every training run of the demo and of the lab goes through this loop.

    Args:
        model: trained in place, in train mode.
        x, y: training inputs (N, ...) and int64 labels (N,).
        config: the `TrainConfig` (checked first: a bad setting changes nothing).
        params: parameters to train (default None: all that require grad).
        bar: optional `bnkit.progress.Bar`, advanced once per step.
        eval_fn: called as eval_fn(model, row) -> dict at each evaluation (see
            TrainConfig.eval_every), `row` holding the columns below so far; the
            returned items are added to the row.
        order: iterator of index tensors (batch,) to train on (default None: a random
            permutation per epoch seeded by config.seed, `batch_indices`); e.g.
            class-skewed batches.

    Returns: one row per evaluation, {"step", "train_loss" (mean since the previous row),
    "ms_per_step" (training time only), "elapsed_s" (training time so far),
    **eval_fn(model, row)}; empty without eval_fn.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> config = TrainConfig(steps=4, batch=8, lr=0.1, micro=4, eval_every=2)
        >>> rows = fit(model, x, y, config, eval_fn=lambda m, row: {"acc": evaluate(m, x, y)})
        >>> [r["step"] for r in rows]
        [2, 4]
    """
    config.check(len(x))
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt = OPTIMIZERS[config.optimizer](params, config)
    if order is None:
        order = batch_indices(len(x), config.batch, torch.Generator().manual_seed(config.seed))
    rows, losses, train_s, elapsed = [], [], 0.0, 0.0
    model.train()
    for step in range(1, config.steps + 1):
        t0 = time.perf_counter()
        idx = next(order)
        opt.zero_grad(set_to_none=True)
        losses.append(_step(model, x[idx], y[idx], config.micro))
        if config.clip is not None:
            nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        train_s += time.perf_counter() - t0
        if bar is not None:
            bar.advance()
        if eval_fn is not None and config.evaluates_at(step):
            elapsed += train_s
            row = {"step": step, "train_loss": sum(losses) / len(losses),
                   "ms_per_step": 1e3 * train_s / len(losses), "elapsed_s": elapsed}
            row.update(eval_fn(model, row))
            rows.append(row)
            losses, train_s = [], 0.0
    return rows


def train_classifier(model: nn.Module, data: ClassificationData, steps: int, lr: float = 0.1,
                     batch_size: int = 60, eval_every: int = 500, seed: int = 0,
                     on_eval: Callable | None = None, bar=None) -> list[dict]:
    """Train with plain SGD on softmax cross-entropy; evaluate every `eval_every` steps.

    `fit` with TrainConfig(steps, batch_size, lr, momentum=0, eval_every, seed) and the test
    accuracy as evaluation. Batches come from `batch_indices` with a generator seeded by
    `seed`, so two models trained with the same seed see the same batches in the same order.

    Args:
        model: Maps (B, D) inputs to (B, classes) logits; trained in place.
        data: A `ClassificationData` (tensors already on the model's device).
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
        >>> from bnkit.lab.models import make_mlp
        >>> rows = train_classifier(make_mlp(bn=True), load_data(), steps=100, eval_every=50)
        >>> [r["step"] for r in rows]
        [50, 100]
    """
    config = TrainConfig(steps=steps, batch=batch_size, lr=lr, momentum=0.0,
                         eval_every=eval_every, seed=seed)
    config.check(len(data.x_train))
    _positive_int("eval_every", eval_every, "pass how many steps between evaluations")

    def test_accuracy(m: nn.Module, row: dict) -> dict:
        row["test_acc"] = evaluate(m, data.x_test, data.y_test)
        extra = on_eval(row, m) if on_eval is not None else None
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"on_eval must return a dict of extra columns or None, got "
                            f"{type(extra).__name__} {extra!r}; end the callback with "
                            "`return None` (a progress bar's update() returns a bool)")
        return extra or {}

    return fit(model, data.x_train, data.y_train, config, bar=bar, eval_fn=test_accuracy)


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
