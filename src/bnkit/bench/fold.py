"""Inference speed of a ResNet-style CNN before and after `fold`, measured in one process.

The two models run in interleaved rounds (`timing.interleaved_samples`) so that machine
load drifts hit both alike; each side reports the median over `repeats` runs, and the ratio
unfolded / folded is the speed-up of folding.

Example:
    >>> from bnkit.bench.fold import bench_fold
    >>> result = bench_fold(norm="torch", batch=2, size=16, width=8, repeats=3)
    >>> sorted(result)[:3]
    ['batch', 'bn_layers', 'folded_ms']
"""
from __future__ import annotations

import torch
from torch import nn

from .. import nn as bnn
from ..tools.fold import fold
from .nets import resnet_cnn
from .timing import interleaved_medians, perf_timer, warm

NORMS = {"torch": nn.BatchNorm2d, "bnkit": bnn.BatchNorm2d}


def randomize_bn(model: nn.Module, seed: int) -> None:
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


def timed_forward(model: nn.Module, x: torch.Tensor, threads: int):
    """model(x) as a no-argument callable; sets the thread count first each time (a
    timed call elsewhere may have changed it)."""
    def run():
        torch.set_num_threads(threads)
        model(x)
    return run


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
    randomize_bn(model, seed)
    model.eval()
    folded, report = fold(model, return_report=True)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ref, out = model(x), folded(x)
            fns = {"unfolded": timed_forward(model, x, threads),
                   "folded": timed_forward(folded, x, threads)}
            warm(fns, warmup)
            t = interleaved_medians(fns, repeats, perf_timer())
    finally:
        torch.set_num_threads(old_threads)
    unf, fol = t["unfolded"], t["folded"]
    diff = float((out - ref).abs().max() / ref.abs().max())
    return {"norm": norm, "batch": batch, "size": size, "width": width, "threads": threads,
            "repeats": repeats, "bn_layers": len(report.folded) + len(report.skipped),
            "folded_pairs": len(report.folded), "unfolded_ms": unf, "folded_ms": fol,
            "speedup": unf / fol, "max_rel_diff": diff}
