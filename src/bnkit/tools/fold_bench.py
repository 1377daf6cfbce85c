"""Inference speed of a ResNet-style CNN before and after `fold`, measured in one process.

The two models run interleaved (unfolded, folded, folded, unfolded, ...) so that machine
load drifts hit both alike; each side reports the median over `repeats` runs, and the ratio
unfolded / folded is the speed-up of folding.

Example:
    >>> from bnkit.tools.fold_bench import bench_fold
    >>> result = bench_fold(norm="torch", batch=2, size=16, width=8, repeats=3)
    >>> sorted(result)[:3]
    ['batch', 'bn_layers', 'folded_ms']
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .. import nn as bnn
from .fold import fold

NORMS = {"torch": nn.BatchNorm2d, "bnkit": bnn.BatchNorm2d}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (conv1x1-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet_cnn(width: int = 16, norm=nn.BatchNorm2d, classes: int = 10) -> nn.Module:
    """A small ResNet (3 stages of 2 basic blocks: width, 2x, 4x) for 3-channel images."""
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2, norm), BasicBlock(cout, cout, 1, norm)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Trained-looking BN state, so folding is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tuple(NORMS.values())):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def _time(model: nn.Module, x: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)  # again each run: a numba-backed kernel may have changed it
    start = time.perf_counter()
    model(x)
    return (time.perf_counter() - start) * 1e3


def bench_fold(norm: str = "bnkit", *, batch: int = 16, size: int = 32, width: int = 16,
               repeats: int = 20, warmup: int = 3, threads: int = 1, seed: int = 0) -> dict:
    """Median eval-mode forward time (ms) of a ResNet-style CNN before and after folding.

    Args:
        norm: "bnkit" or "torch", the BN layers of the unfolded model. Default "bnkit".
        batch, size, width: input (batch, 3, size, size) and the CNN's first-stage width
            (defaults 16, 32, 16).
        repeats: timed runs per model, interleaved (default 20); warmup runs first (3).
        threads: torch threads during the measurement (restored after). Default 1.
        seed: seed of the weights and input.

    Returns: {"norm", "batch", "size", "width", "threads", "repeats", "bn_layers",
    "folded_pairs", "unfolded_ms", "folded_ms", "speedup" (unfolded_ms / folded_ms),
    "max_rel_diff" (folded vs unfolded outputs)}.
    """
    if norm not in NORMS:
        raise ValueError(f"bench_fold: norm must be one of {sorted(NORMS)} (got {norm!r})")
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"bench_fold: need repeats >= 1, warmup >= 0, threads >= 1 (got "
                         f"{repeats}, {warmup}, {threads})")
    torch.manual_seed(seed)
    model = resnet_cnn(width, NORMS[norm])
    _randomize_bn(model, seed)
    model.eval()
    folded, report = fold(model, return_report=True)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ref, out = model(x), folded(x)
            for _ in range(warmup):
                model(x), folded(x)
            times: dict[str, list[float]] = {"unfolded": [], "folded": []}
            for r in range(repeats):  # alternate the order so neither side always goes first
                order = (("unfolded", model), ("folded", folded))
                for name, m in order if r % 2 == 0 else order[::-1]:
                    times[name].append(_time(m, x, threads))
    finally:
        torch.set_num_threads(old_threads)
    unf, fol = statistics.median(times["unfolded"]), statistics.median(times["folded"])
    diff = float((out - ref).abs().max() / ref.abs().max())
    return {"norm": norm, "batch": batch, "size": size, "width": width, "threads": threads,
            "repeats": repeats, "bn_layers": len(report.folded) + len(report.skipped),
            "folded_pairs": len(report.folded), "unfolded_ms": unf, "folded_ms": fol,
            "speedup": unf / fol, "max_rel_diff": diff}
