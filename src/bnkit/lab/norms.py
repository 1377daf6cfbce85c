"""Norms: BatchNorm, LayerNorm, InstanceNorm, GroupNorm and no normalization in the same CNN,
at batch sizes from 2 to 64 (Wu & He 2018, Table 1 and Figure 1).

The lab's two-block CNN [conv3x3 -> norm -> ReLU -> maxpool2] with one normalization layer
per block: bnkit BatchNorm2d, or torch's own nn.LayerNorm over (C, H, W), nn.InstanceNorm2d
(affine) and nn.GroupNorm (G groups), or nothing. Every run takes the same number of SGD
steps, with the learning rate scaled by sqrt(batch / 32) (Hoffer et al. 2017, so the
gradient noise per step is about the same at every batch), and a larger batch also sees
more examples; the claim is about how the norms differ at each batch size, and how much
each loses as the batch shrinks. (Wu & He keep the epochs fixed and scale the learning rate
linearly instead; at the quick profile's budget that leaves the large batches a few dozen
steps.) Measured: test
accuracy (BN in eval mode uses its running statistics) and the process CPU time per
training step (the median over the steps, so a one-time cost such as kernel compilation
does not count; one thread, so other processes on the machine do not count either).
"""
from __future__ import annotations

import math
import statistics
import time

from torch import nn

from ..nn.registry import get_norm
from . import plots
from .models import divisor_at_most, make_cnn
from .sections import Section, Table, by, combine, compare, finite, fmt, mean, metric, pct
from .train import TrainConfig, evaluate, fit, images, subset

NAME = "norms"
TITLE = "BatchNorm, LayerNorm, InstanceNorm and GroupNorm against the batch size"
CLAIM = ("BN's accuracy falls as the batch shrinks to a few examples while GroupNorm's does "
         "not, so at the smallest batch GroupNorm is more accurate than BN (Wu & He 2018).")
NORMS = ("bn", "layer", "instance", "group", "none")
LABELS = {"bn": "BN", "layer": "LN", "instance": "IN", "group": "GN", "none": "no norm"}

_BASE = {"widths": [8, 16], "groups": 4, "lr": 0.02, "lr_batch": 32, "momentum": 0.9,
         "norms": list(NORMS)}
PROFILES = {
    "mini": {**_BASE, "widths": [4, 8], "batches": [2, 8], "steps": 8, "train_subset": 128,
             "test_subset": 64},
    "quick": {**_BASE, "batches": [2, 8, 32], "steps": 80, "train_subset": None,
              "test_subset": 1000},
    "full": {**_BASE, "batches": [2, 4, 8, 16, 32, 64], "steps": 300, "train_subset": None,
             "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"norm": n, "batch": b} for n in cfg["norms"] for b in cfg["batches"]]


def norm_layer(kind: str, groups: int):
    """A (channels, side) -> nn.Module factory for `make_cnn`: 'bn' (bnkit BatchNorm2d),
    'layer' (torch LayerNorm over (C, H, W)), 'instance' (torch InstanceNorm2d, affine),
    'group' (torch GroupNorm with `groups` groups, lowered to divide the channels), or the
    string 'none' (no normalization; the convs keep their bias)."""
    if kind == "none":
        return "none"

    def build(channels: int, side: int) -> nn.Module:
        if kind == "bn":
            return get_norm("batchnorm2d", channels)
        if kind == "layer":  # over (C, H, W), so not the registry's per-position layernorm
            return nn.LayerNorm([channels, side, side])
        if kind == "instance":
            return get_norm("instancenorm", channels, affine=True)
        if kind == "group":
            return get_norm("groupnorm", channels, num_groups=divisor_at_most(channels, groups))
        raise ValueError(f"unknown norm {kind!r}: expected one of {NORMS}; pass one of those")
    return build


def lr_at(cfg: dict, batch: int) -> float:
    """The learning rate at `batch`: lr * sqrt(batch / lr_batch) (Hoffer et al. 2017)."""
    return cfg["lr"] * math.sqrt(batch / cfg["lr_batch"])


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), cfg["train_subset"], cfg["test_subset"])
    norm, batch = variant["norm"], variant["batch"]
    model = make_cnn(cfg["widths"], norm_layer(norm, cfg["groups"]), seed=seed)
    x, steps = images(data.x_train), cfg["steps"]
    with ctx.bar(steps, f"{LABELS[norm]}, batch {batch}") as bar:
        clock = StepClock(bar)
        config = TrainConfig(steps=steps, batch=batch, lr=lr_at(cfg, batch),
                             momentum=cfg["momentum"], eval_every=steps // 4 or None, seed=seed)
        rows = fit(model, x, data.y_train, config, bar=clock, eval_fn=lambda m, row: {})
    return {"acc": evaluate(model, images(data.x_test), data.y_test, 500),
            "ms_per_step": 1000 * clock.median(), "last_loss": rows[-1]["train_loss"]}


class StepClock:
    """A progress bar stand-in for `fit` that records the process CPU time of each step
    (fit advances its bar once per step) and forwards to the real bar."""

    def __init__(self, bar) -> None:
        self.bar, self.times, self.last = bar, [], time.process_time()

    def advance(self) -> None:
        now = time.process_time()
        self.times.append(now - self.last)
        self.last = now
        self.bar.advance()

    def median(self) -> float:
        """Median seconds per step: a one-time cost in one step does not move it."""
        return statistics.median(self.times)


# ----------------------------------------------------------------------------- summary

def _accs(groups, norm: str, batch: int) -> list:
    return metric(groups.get((norm, batch), []), "acc")


def _drops(groups, norm: str, small: int, large: int) -> list[float]:
    """Per seed: accuracy at the largest batch minus accuracy at the smallest."""
    big = {r["seed"]: r["metrics"]["acc"] for r in groups.get((norm, large), [])}
    return [big[r["seed"]] - r["metrics"]["acc"] for r in groups.get((norm, small), [])
            if r["seed"] in big]


def _verdict(cfg, groups) -> tuple[str, list[str]]:
    small, large = min(cfg["batches"]), max(cfg["batches"])
    if not {"bn", "group"} <= set(cfg["norms"]) or small == large:
        return "not run", ["The claim needs BN and GN at two batch sizes at least."]
    bn_s, gn_s = _accs(groups, "bn", small), _accs(groups, "group", small)
    bn_l, gn_l = _accs(groups, "bn", large), _accs(groups, "group", large)
    d_bn, d_gn = _drops(groups, "bn", small, large), _drops(groups, "group", small, large)
    at_small, drop = compare(gn_s, bn_s, "a > b"), compare(d_bn, d_gn, "a > b")
    text = [(f"At batch {small}: GN {fmt(gn_s, 100)}% test accuracy, BN {fmt(bn_s, 100)}%; "
            f"at batch {large}: GN {fmt(gn_l, 100)}%, BN {fmt(bn_l, 100)}%. From batch {large} "
            f"to {small} BN lost {fmt(d_bn, 100)} points and GN {fmt(d_gn, 100)} (per seed). "
            f"GN more accurate than BN at batch {small}: {at_small}; BN losing more than GN: "
            f"{drop} (decided by two standard errors of the seed-to-seed spread).")]
    verdict = combine([at_small, drop])
    ref = ("Wu & He 2018 report on ImageNet (ResNet-50) BN 23.6% -> 34.7% error from 32 to 2 "
           "images per GPU, GN 24.1% -> 24.1%.")
    if verdict == "holds":
        text.append("The claim holds in this run, as in the paper. " + ref)
    elif verdict == "does not hold":
        text.append("The claim does NOT hold in this run, contrary to the paper. " + ref)
    else:
        text.append(f"The run does not decide the claim ({verdict}). " + ref)
    return verdict, text


def _others(cfg, groups) -> str:
    small, large = min(cfg["batches"]), max(cfg["batches"])
    parts = [f"{LABELS[n]} {pct(mean(_accs(groups, n, small)))} / "
             f"{pct(mean(_accs(groups, n, large)))}" for n in cfg["norms"]]
    times = [f"{LABELS[n]} {mean(metric(groups.get((n, large), []), 'ms_per_step')):.1f} ms"
             for n in cfg["norms"]]
    return (f"Test accuracy at batch {small} / {large}, every run "
            f"{cfg['steps']:,} steps at lr {cfg['lr']:g} x sqrt(batch / {cfg['lr_batch']}): " + ", ".join(parts) + ". CPU time per "
            f"training step at batch {large} (median, one thread): " + ", ".join(times) + ".")


STUCK = 2.2  # mean training loss over the last quarter at or above this: did not train


def _stuck(cfg, groups) -> str:
    """Which runs did not train (their loss stayed near chance, ln 10 = 2.30)."""
    stuck = []
    for n in cfg["norms"]:
        for k in cfg["batches"]:
            losses = [v for v in metric(groups.get((n, k), []), "last_loss") if v is not None]
            bad = sum(v >= STUCK for v in losses)
            if bad:
                stuck.append(f"{LABELS[n]} at batch {k} ({bad} of {len(losses)} seeds)")
    if not stuck:
        return ""
    return (f" Runs whose training loss over the last quarter stayed at or above {STUCK} "
            f"(chance is ln 10 = 2.30) did not train: "
            + "; ".join(stuck) + ".")


def _figure(cfg, groups):
    fig, (a, b) = plots.figure(2, 1)
    batches = cfg["batches"]
    for i, n in enumerate(cfg["norms"]):
        style = "o-" if n in ("bn", "group") else "s--"
        plots.points(a, batches, [_accs(groups, n, k) for k in batches], LABELS[n],
                     plots.COLORS[i], style, 100)
        plots.points(b, batches, [metric(groups.get((n, k), []), "ms_per_step")
                                  for k in batches], LABELS[n], plots.COLORS[i], style)
    for ax in (a, b):
        plots.log_x(ax, batches, 2)
    plots.finish(a, f"test accuracy after {cfg['steps']:,} steps (lr ~ sqrt(batch))",
                 "batch size", "%")
    plots.finish(b, "CPU time per training step (one thread)", "batch size", "ms")
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "norm", "batch")
    verdict, paragraphs = _verdict(cfg, groups)
    paragraphs.append(_others(cfg, groups) + _stuck(cfg, groups))
    rows = [[LABELS[n], str(k), fmt(_accs(groups, n, k), 100),
             fmt(metric(groups.get((n, k), []), "last_loss"), digits=2),
             fmt(metric(groups.get((n, k), []), "ms_per_step"), digits=2)]
            for n in cfg["norms"] for k in cfg["batches"]]
    small = min(cfg["batches"])
    bn, gn = mean(_accs(groups, "bn", small)), mean(_accs(groups, "group", small))
    headline = (f"batch {small}: GN {pct(gn)} vs BN {pct(bn)}" if finite(bn, gn)
                else "BN or GN has not finished")
    return Section(NAME, TITLE, CLAIM, headline, verdict, paragraphs,
                   Table(["norm", "batch", "test acc %", "train loss (last quarter)", "CPU ms/step"], rows),
                   _figure(cfg, groups))
