"""Training utilities of the lab: cached data, image views, class subsets, a generic SGD loop.

The MLP experiments reuse `bnkit.demo` (`make_mlp`, `train_classifier`, `evaluate`); this
file adds what the image models need: (N, 1, 28, 28) views, momentum SGD, training only a
subset of the parameters, and micro-batches (the gradient of a batch of B summed over
B / k forward passes of k examples, so BN sees k examples while the step sees B).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..demo import DemoData, batch_indices, evaluate, load_data

__all__ = [
    "DemoData",
    "accuracy_by_batches",
    "class_subset",
    "evaluate",
    "fit",
    "get_data",
    "images",
    "subset",
]

_DATA: dict[str | None, DemoData] = {}


def get_data(root: str | None = None) -> DemoData:
    """Fashion-MNIST as flat float tensors in [0, 1] (see `bnkit.demo.load_data`), cached."""
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


def subset(data: DemoData, n_train: int | None = None, n_test: int | None = None) -> DemoData:
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


OPTIMIZERS = {
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                            weight_decay=wd),
    "rmsprop": lambda params, lr, momentum, wd: torch.optim.RMSprop(params, lr=lr,
                                                                    weight_decay=wd),
}


def _step(model, xb, yb, micro: int | None) -> float:
    """Accumulate the gradient of the mean loss over xb, in chunks of `micro` examples."""
    if micro is None or micro >= len(xb):
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return float(loss.detach())
    total = 0.0
    for xs, ys in zip(xb.split(micro), yb.split(micro)):
        loss = F.cross_entropy(model(xs), ys) * (len(xs) / len(xb))  # sum = mean over xb
        loss.backward()
        total += float(loss.detach())
    return total


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int,
        lr: float, momentum: float = 0.9, micro: int | None = None, params=None, seed: int = 0,
        optimizer: str = "sgd", clip: float | None = None, bar=None,
        eval_every: int | None = None, eval_fn=None, weight_decay: float = 0.0,
        order=None) -> list[dict]:
    """Train on cross-entropy (SGD with momentum by default); return the evaluation rows.

    Args:
        model: trained in place, in train mode.
        x, y: training inputs (N, ...) and int64 labels (N,).
        steps: optimizer steps; batch: examples per step (at most N).
        lr, momentum: SGD settings (momentum default 0.9).
        micro: examples per forward pass (default None: the whole batch).
        params: parameters to train (default None: all that require grad).
        seed: seed of the batch order.
        optimizer: 'sgd' (default) or 'rmsprop' (momentum unused), as in OPTIMIZERS.
        clip: clip the gradient norm to this value before each step (default None: no).
        bar: optional `bnkit.progress.Bar`, advanced once per step.
        eval_every, eval_fn: call eval_fn(model) -> dict every eval_every steps and at the end.
        weight_decay: L2 penalty of the optimizer (default 0).
        order: iterator of index tensors (batch,) to train on (default None: a seeded random
            permutation per epoch, `batch_indices`); e.g. class-skewed batches.

    Returns: [{"step", "train_loss", **eval_fn(model)}] (empty without eval_fn).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> rows = fit(model, x, y, steps=4, batch=8, lr=0.1, micro=4, eval_every=2,
        ...            eval_fn=lambda m: {"acc": evaluate(m, x, y)})
        >>> [r["step"] for r in rows]
        [2, 4]
    """
    if batch > len(x):
        raise ValueError(f"batch must be at most the number of training examples ({len(x)}), "
                         f"got {batch}; lower the batch size or use more data")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params, lr, momentum, weight_decay)
    if order is None:
        order = batch_indices(len(x), batch, torch.Generator().manual_seed(seed))
    rows, losses = [], []
    model.train()
    for step in range(1, steps + 1):
        idx = next(order)
        opt.zero_grad(set_to_none=True)
        losses.append(_step(model, x[idx], y[idx], micro))
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if bar is not None:
            bar.advance()
        if eval_fn is not None and (step == steps or (eval_every and step % eval_every == 0)):
            rows.append({"step": step, "train_loss": sum(losses) / len(losses), **eval_fn(model)})
            losses = []
    return rows


def accuracy_by_batches(model: nn.Module, x, y, batch: int, adapt=None) -> float:
    """Accuracy over (x, y) fed in batches; `adapt(model, xb)` may run first on each batch
    (test-time adaptation) and return the logits to use, else the model's eval logits count."""
    correct = 0
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        if adapt is not None:
            logits = adapt(model, xb)
        else:
            with torch.no_grad():
                logits = model.eval()(xb)
        correct += int((logits.argmax(1) == yb).sum())
    return correct / max(len(x), 1)
