"""Model benchmarks: whole training steps and eval forwards with torch's BN against bnkit's.

`run_models`: the SGD step of two small models (the BN paper's sigmoid MLP, a 2-conv CNN)
with torch.nn's BN layers and with bnkit.nn's on every CPU backend. `run_vision_models`: a
ResNet-18 and a MobileNetV2 (`nets`, torchvision's definitions) built with
torch.nn.BatchNorm2d and a copy converted with `bnkit.convert(model, "bnkit")`, so both
start from the same weights: the training step (forward, cross-entropy, backward, SGD
update) and the eval forward, the two sides in the same interleaved rounds. `x_torch` =
torch ms / bnkit ms: above 1 bnkit is faster.

Example:
    >>> from bnkit.bench.models import run_vision_models
    >>> rows = run_vision_models(["resnet18"], batch=2, size=32, repeats=1, warmup=0)
    >>> [(r["model"], r["phase"]) for r in rows]
    [('resnet18', 'train step'), ('resnet18', 'eval')]
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import backends, nets
from .timing import time_all

VISION_BATCH, VISION_SIZE = 16, 112  # default input: 16 x 3 x 112 x 112
VISION_CLASSES = 1000


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """One SGD training step: forward, cross-entropy, backward, update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def eval_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable:
    """The eval-mode forward of `model` on `x` without autograd (model set to eval)."""
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)
    return forward


def run_models(repeats: int, warmup: int) -> list[dict]:
    """ms per training step of the MLP (batch 60) and the CNN (batch 32, 28x28) with
    torch.nn BN layers and with bnkit.nn's on every CPU backend and 'auto' (and the 'cpu'
    backend through its Python op, where `backends.python_op` offers it)."""
    from .. import nn as bnn

    specs = {"mlp": (nets.mlp, "BatchNorm1d", (60, 784)),
             "cnn": (nets.cnn, "BatchNorm2d", (32, 1, 28, 28))}
    rows = []
    with backends.restored_backend():
        for name, (build, layer, shape) in specs.items():
            x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
            fns = {"torch": step_fn(build(getattr(torch.nn, layer)), x, y)}
            for be in ["auto", *backends.cpu_backends()]:
                fns[f"bnkit {be}"] = backends.on(be, step_fn(build(getattr(bnn, layer)), x, y))
            py_op = backends.python_op(step_fn(build(getattr(bnn, layer)), x, y))
            if py_op is not None:  # the same kernels through the Python autograd.Function
                fns["bnkit cpu, py op"] = py_op
            t = time_all(fns, repeats, warmup + 3)
            rows += [{"model": name, "variant": v, "ms": t[v], "x_torch": t["torch"] / t[v]}
                     for v in fns]
    return rows


def model_pair(name: str, width_mult: float = 1.0, seed: int = 0,
               classes: int = VISION_CLASSES) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(torch model, bnkit model): `nets.MODELS[name]` with torch.nn.BatchNorm2d, and a deep
    copy converted with `bnkit.convert(..., "bnkit")`: the same weights and statistics."""
    from ..tools.convert import convert

    if name not in nets.MODELS:
        raise ValueError(f"model must be one of {sorted(nets.MODELS)} (got {name!r})")
    torch.manual_seed(seed)
    kw = {"width_mult": width_mult} if name == "mobilenet_v2" else {}
    model = nets.MODELS[name](torch.nn.BatchNorm2d, classes, **kw)
    return model, convert(model, "bnkit", inplace=False)


def check_vision_input(batch: int, size: int, width_mult: float) -> None:
    """Raise ValueError unless batch >= 2 (BN in training needs two values per channel at
    the last 1x1 feature map), size >= 32 (five stride-2 stages) and width_mult > 0."""
    if batch < 2 or size < 32 or not width_mult > 0:
        raise ValueError(f"the model benchmarks need a batch >= 2, an image size >= 32 and a "
                         f"width multiplier > 0 (got batch {batch}, size {size}, width "
                         f"{width_mult}); pass e.g. --model-batch 16 --model-size 112 "
                         f"--model-width 1.0")


def run_vision_models(names=tuple(nets.MODELS), batch: int = VISION_BATCH,
                      size: int = VISION_SIZE, repeats: int = 15, warmup: int = 2,
                      width_mult: float = 1.0) -> list[dict]:
    """Rows {"model", "input", "phase" ("train step" or "eval"), "torch_ms", "bnkit_ms",
    "x_torch"} of each model in `names`, on a (batch, 3, size, size) float32 input.

    bnkit runs on the backend selected now ('auto' unless changed). The two sides of a
    phase run in the same interleaved rounds (median of `repeats`, after `warmup` calls).
    """
    check_vision_input(batch, size, width_mult)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, VISION_CLASSES, (batch,), generator=g)
    rows = []
    for name in names:
        ref, bnk = model_pair(name, width_mult)
        ref_eval, bnk_eval = copy.deepcopy(ref), copy.deepcopy(bnk)
        phases = {"train step": {"torch": step_fn(ref.train(), x, y),
                                 "bnkit": step_fn(bnk.train(), x, y)},
                  "eval": {"torch": eval_fn(ref_eval, x), "bnkit": eval_fn(bnk_eval, x)}}
        for phase, fns in phases.items():
            t = time_all(fns, repeats, warmup)
            rows.append({"model": name, "input": f"{batch}x3x{size}x{size}", "phase": phase,
                         "torch_ms": t["torch"], "bnkit_ms": t["bnkit"],
                         "x_torch": t["torch"] / t["bnkit"]})
    return rows
