"""Inference: folding BN into the preceding conv / linear layer with `bnkit.fold`.

For each model (the CNN and a small ResNet), briefly trained so its BN statistics and affine
parameters are not the defaults, measure the eval-mode forward time before and after
folding (medians of interleaved repeats, so load from other processes hits both alike) and
the largest difference between the two models' outputs on test images.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import plots
from .models import make_cnn, make_resnet
from .sections import Section, Table, by, combine, compare, evidence, fmt, mean, metric
from .train import TrainConfig, fit, images, subset

NAME = "inference"
TITLE = "Folding BN into convolutions for inference"
CLAIM = ("Folding BN into the preceding conv/linear layer makes eval-mode inference faster "
         "and changes the outputs only by float32 rounding (relative difference < 1e-4).")

_BASE = {"models": ["cnn", "resnet"], "cnn_widths": [16, 32], "resnet_width": 16,
         "batch": 32, "lr": 0.05, "timing_batch": 256, "rel_tol": 1e-4}
PROFILES = {
    "mini": {**_BASE, "cnn_widths": [4, 8], "resnet_width": 4, "batch": 16, "train_steps": 3,
             "timing_batch": 16, "repeats": 3, "test_subset": 64},
    "quick": {**_BASE, "train_steps": 10, "timing_batch": 128, "repeats": 10,
              "test_subset": 500},
    "full": {**_BASE, "train_steps": 300, "repeats": 20, "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    from .. import tools

    return None if hasattr(tools, "fold") else "bnkit.tools has no fold yet"


def cells(cfg: dict) -> list[dict]:
    return [{"model": m} for m in cfg["models"]]


def _build(cfg: dict, name: str, seed: int):
    if name == "cnn":
        return make_cnn(cfg["cnn_widths"], "bn", seed=seed)
    return make_resnet(cfg["resnet_width"], seed=seed)


def interleaved_ms(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per call of each fn(x), timed in rounds that run every fn once."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)  # warm-up
        for r in range(repeats):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                t0 = time.perf_counter()
                fns[k](x)
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    from ..tools import fold

    data = subset(ctx.data(), n_test=cfg["test_subset"])
    model = _build(cfg, variant["model"], seed)
    fit(model, images(data.x_train), data.y_train,
        TrainConfig(steps=cfg["train_steps"], batch=cfg["batch"], lr=cfg["lr"], seed=seed))
    model.eval()
    x = images(data.x_test)
    folded, rep = fold(model, x[:cfg["batch"]], return_report=True)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    diff = float((out - ref).abs().max())
    ms = interleaved_ms({"bn": model, "folded": folded}, x[:cfg["timing_batch"]], cfg["repeats"])
    return {"ms_bn": ms["bn"], "ms_folded": ms["folded"], "speedup": ms["bn"] / ms["folded"],
            "max_abs_diff": diff, "max_rel_diff": diff / float(ref.abs().max()),
            "folded": len(rep.folded), "skipped": len(rep.skipped),
            "params": sum(p.numel() for p in model.parameters())}


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "model")
    checks, paragraphs, rows = [], [], []
    for name in cfg["models"]:
        recs = groups.get((name,), [])
        if not recs:
            continue
        sp, rel = mean(metric(recs, "speedup")), max(metric(recs, "max_rel_diff"))
        checks += [compare(metric(recs, "speedup"), 1.0, "a > b"),
                   "holds" if rel < cfg["rel_tol"] else "does not hold"]
        paragraphs.append(
            f"{name}: {recs[0]['metrics']['folded']} BN layer(s) folded, "
            f"{recs[0]['metrics']['skipped']} left; eval forward of {cfg['timing_batch']} images "
            f"{mean(metric(recs, 'ms_bn')):.2f} ms -> {mean(metric(recs, 'ms_folded')):.2f} ms "
            f"({sp:.2f}x); faster: {checks[-2]} (speed-up minus 1: "
            f"{evidence(metric(recs, 'speedup'), 1.0, digits=2)}); largest output difference "
            f"{max(metric(recs, 'max_abs_diff')):.2e} (relative {rel:.2e} over every seed, "
            f"{'within' if rel < cfg['rel_tol'] else 'ABOVE'} the {cfg['rel_tol']:g} bound: a "
            "bound on every seed, not a mean, so no spread is involved).")
        rows.append([name, fmt(metric(recs, "ms_bn"), digits=2),
                     fmt(metric(recs, "ms_folded"), digits=2),
                     fmt(metric(recs, "speedup"), digits=2), f"{max(metric(recs, 'max_abs_diff')):.2e}",
                     f"{rel:.2e}"])
    fig, (ax,) = plots.figure(1, 1, width=5.0)
    names = [n for n in cfg["models"] if (n,) in groups]
    plots.points(ax, list(range(len(names))), [metric(groups[(n,)], "speedup") for n in names],
                 "speed-up", plots.COLORS[0], "o")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(list(range(len(names))), names)
    plots.finish(ax, "eval forward time, BN / folded", "model", "speed-up (x)", legend=False)
    headline = "; ".join(f"{n}: {mean(metric(groups[(n,)], 'speedup')):.2f}x, max diff "
                         f"{max(metric(groups[(n,)], 'max_abs_diff')):.1e}" for n in names)
    return Section(NAME, TITLE, CLAIM, headline, combine(checks), paragraphs,
                   Table(["model", "ms BN", "ms folded", "speed-up", "max |diff|",
                          "max rel diff"], rows), fig)
