"""Convergence: the BN paper's MNIST set-up (Ioffe & Szegedy 2015, section 4.1, Figure 1).

A 784-100-100-100-10 sigmoid MLP trained with plain SGD at batch 60, with and without
BatchNorm1d before each sigmoid, over several learning rates. Measured: test accuracy
against steps, the first evaluated step with accuracy >= target (and the ratio no-BN / BN),
and the 15/50/85th percentiles of the input of one sigmoid of the last hidden layer on a
fixed probe set over training (Figure 1b, c).
"""
from __future__ import annotations

import math

import torch

from . import plots
from .models import make_mlp
from .sections import Section, Table, by, combine, decide, fmt, mean, metric, paired, pct
from .train import subset, train_classifier, warm_up

NAME = "convergence"
TITLE = "Convergence with and without BN (BN paper, Fig. 1)"
CLAIM = ("BN reaches a given test accuracy in fewer steps than the same network without BN, "
         "and keeps the distribution of a sigmoid's input stable during training.")

_BASE = {"hidden": 100, "depth": 3, "batch": 60, "init_std": 1 / 28, "unit": 0,
         "reference_lr": 0.1, "lrs": [0.05, 0.1, 0.5, 1.0, 2.0]}
PROFILES = {
    "mini": {**_BASE, "lrs": [0.1, 1.0], "steps": 30, "eval_every": 10, "batch": 16,
             "target": 0.3, "test_subset": 128, "probe": 64},
    "quick": {**_BASE, "steps": 240, "eval_every": 20, "target": 0.75, "test_subset": 1000,
              "probe": 500},
    "full": {**_BASE, "steps": 5000, "eval_every": 250, "target": 0.80, "test_subset": None,
             "probe": 1000},
}


def requires(cfg: dict) -> str | None:
    """Nothing beyond bnkit.nn.BatchNorm1d."""
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"lr": lr, "bn": bn} for lr in cfg["lrs"] for bn in (False, True)]


def _percentile_probe(model, probe: torch.Tensor, unit: int):
    """on_eval callback: 15/50/85th percentiles of the last sigmoid's input, unit `unit`."""
    last_sigmoid = [m for m in model if isinstance(m, torch.nn.Sigmoid)][-1]
    seen = {}

    def hook(module, args):
        seen["x"] = args[0][:, unit]

    def on_eval(row, model):
        handle = last_sigmoid.register_forward_pre_hook(hook)
        was = model.training
        with torch.no_grad():
            model.eval()(probe)
        model.train(was)
        handle.remove()
        q = torch.quantile(seen["x"].double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
        return {"p15": float(q[0]), "p50": float(q[1]), "p85": float(q[2])}

    return on_eval


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    """Train one MLP (same weights and batches for BN and no BN at a given seed)."""
    data = subset(ctx.data(), n_test=cfg["test_subset"])
    model = make_mlp(variant["bn"], cfg["hidden"], cfg["depth"], init_std=cfg["init_std"],
                     in_features=data.x_train.shape[1], seed=seed)
    probe = _percentile_probe(model, data.x_test[:cfg["probe"]], cfg["unit"])
    # one-time costs (kernel compilation) are paid on a copy, outside ms/step
    warm_up(model, data.x_train[:cfg["batch"]], data.y_train[:cfg["batch"]])
    with ctx.bar(cfg["steps"], f"lr {variant['lr']}, BN {variant['bn']}") as bar:
        def on_eval(row, m):
            bar.advance_to(row["step"])
            return probe(row, m)
        rows = train_classifier(model, data, cfg["steps"], variant["lr"], cfg["batch"],
                                cfg["eval_every"], seed, on_eval)
    acc = [r["test_acc"] for r in rows]
    hit = next((r["step"] for r in rows if r["test_acc"] >= cfg["target"]), None)
    return {"steps": [r["step"] for r in rows], "acc": acc,
            "loss": [r["train_loss"] for r in rows],
            "p15": [r["p15"] for r in rows], "p50": [r["p50"] for r in rows],
            "p85": [r["p85"] for r in rows], "final_acc": acc[-1], "steps_to_target": hit,
            "ms_per_step": sum(r["ms_per_step"] for r in rows) / len(rows)}


# ----------------------------------------------------------------------------- summary

def to_target(records: list[dict]) -> float:
    """Mean steps to target over seeds; inf when any seed never reached it."""
    hits = metric(records, "steps_to_target")
    return math.inf if not hits or None in hits else mean(hits)


def step_gain(plain: list[dict], bn: list[dict], steps: int) -> list[float]:
    """Per seed: steps to target without BN minus with BN (same initial weights and batches),
    a seed that never reached it counted as `steps` (the run's length: a lower bound, which
    favours the side that never got there)."""
    def hit(rec):
        h = rec["metrics"]["steps_to_target"]
        return steps if h is None else h
    return paired(plain, bn, hit)


def drift(rec: dict) -> float:
    """How far the median sigmoid input moved in one cell, |last - first evaluation|."""
    return abs(rec["metrics"]["p50"][-1] - rec["metrics"]["p50"][0])


def _after(hit: float, steps: int) -> str:
    """'after 400 steps', or 'not within the run's 600 steps'."""
    return f"after {hit:,.0f} steps" if math.isfinite(hit) else f"not within the {steps:,} steps"


def _ratio(plain: float, bn: float, steps: int) -> str:
    """no-BN steps / BN steps; a lower bound (> steps / BN steps) when no BN never got there."""
    if math.isinf(bn):
        return "n/a (BN never reached it)"
    if math.isinf(plain):
        return f">{steps / bn:.1f}x, no BN never reached it"
    return f"{plain / bn:.1f}x"


def _steps_cell(records: list[dict]) -> str:
    """Steps to target over seeds: 'mean ± std (n=k)', with the seeds that never got there."""
    hits = metric(records, "steps_to_target")
    reached = [h for h in hits if h is not None]
    if len(reached) == len(hits):
        return fmt(reached, digits=0)
    text = f"never in {len(hits) - len(reached)} of {len(hits)} seed(s)"
    return text if not reached else f"{fmt(reached, digits=0)}; {text}"


def _rows(cfg, groups) -> list[list[str]]:
    rows = []
    for lr in cfg["lrs"]:
        plain, bn = groups.get((lr, False), []), groups.get((lr, True), [])
        rows.append([f"{lr:g}", fmt(metric(plain, "final_acc"), 100),
                     fmt(metric(bn, "final_acc"), 100), _steps_cell(plain), _steps_cell(bn),
                     _ratio(to_target(plain), to_target(bn), cfg["steps"]),
                     fmt(metric(plain, "ms_per_step"), digits=2),
                     fmt(metric(bn, "ms_per_step"), digits=2)])
    return rows


def _drift(records: list[dict]) -> tuple[float, float, float]:
    """(median at the first evaluation, at the last, |last - first|), each averaged over
    seeds (the movement per seed first: seeds watch different units' weights)."""
    first = mean([r["metrics"]["p50"][0] for r in records])
    last = mean([r["metrics"]["p50"][-1] for r in records])
    return first, last, mean([drift(r) for r in records])


def _reference_text(cfg, groups, checks) -> list[str]:
    lr, target = cfg["reference_lr"], cfg["target"]
    plain, bn = groups.get((lr, False), []), groups.get((lr, True), [])
    if not plain or not bn:
        return [f"The reference learning rate {lr:g} has not finished for both variants."]
    tp, tb = to_target(plain), to_target(bn)
    steps = cfg["steps"]
    verdict, how = decide(step_gain(plain, bn, steps), "a > b", digits=0)
    checks.append(verdict)
    text = (f"At learning rate {lr:g}, after {steps:,} steps: with BN "
            f"{pct(mean(metric(bn, 'final_acc')))} test accuracy, without "
            f"{pct(mean(metric(plain, 'final_acc')))}. With BN, {target:.0%} test accuracy "
            f"{_after(tb, steps)}; without, {_after(tp, steps)}")
    text += f" (ratio {_ratio(tp, tb, steps)})." if math.isfinite(tb) else "."
    text += (f" Fewer steps with BN: {verdict} (steps without BN minus with BN, a seed that "
             f"never got there counted as {steps:,}: {how}).")
    (f0, f1, fd), (b0, b1, bd) = _drift(plain), _drift(bn)
    verdict, how = decide(paired(plain, bn, drift), "a > b", digits=2)
    checks.append(verdict)
    text2 = (f"Median input of sigmoid unit {cfg['unit']} of the last hidden layer on the probe "
             f"set, first to last evaluation: without BN {f0:+.2f} -> {f1:+.2f} (moved "
             f"{fd:.2f}); with BN {b0:+.2f} -> {b1:+.2f} (moved {bd:.2f}). "
             f"A more stable input with BN: {verdict} (movement without BN minus with BN: "
             f"{how}).")
    if checks[-1] == "does not hold":
        text2 += " This contradicts the paper's Figure 1: the BN network's input moved more."
    return [text, text2]


def _across_lrs(cfg, groups) -> str:
    decided: dict[str, list[str]] = {}
    for lr in cfg["lrs"]:
        plain, bn = groups.get((lr, False), []), groups.get((lr, True), [])
        if plain and bn:
            verdict = decide(step_gain(plain, bn, cfg["steps"]), "a > b")[0]
            decided.setdefault(verdict, []).append(f"{lr:g}")
    parts = [f"{v} at {', '.join(lrs)}" for v, lrs in decided.items()]
    return (f"Across learning rates, 'BN reaches {cfg['target']:.0%} in fewer steps' (decided "
            f"per learning rate by 2 standard errors): {'; '.join(parts) or 'nothing finished'}.")


def _figure(cfg, groups):
    fig, (a, b, c, d) = plots.figure(2, 2)
    for i, lr in enumerate(cfg["lrs"]):
        for bn, style in ((False, "--"), (True, "-")):
            recs = groups.get((lr, bn), [])
            if recs:
                plots.band(a, recs[0]["metrics"]["steps"], metric(recs, "acc"),
                           f"lr {lr:g}{' BN' if bn else ''}", plots.COLORS[i], style, 100)
    a.axhline(100 * cfg["target"], color="k", lw=0.8, ls=":")
    plots.finish(a, "test accuracy (solid: BN, dashed: no BN)", "step", "%")
    for bn, style in ((False, "s--"), (True, "o-")):
        ys = [to_target(groups.get((lr, bn), [])) for lr in cfg["lrs"]]
        b.plot(cfg["lrs"], [y if math.isfinite(y) else math.nan for y in ys], style,
               label="BN" if bn else "no BN")
    plots.log_x(b, cfg["lrs"])
    plots.finish(b, f"steps to {cfg['target']:.0%} (missing = never)", "learning rate", "steps")
    lr = cfg["reference_lr"]
    for ax, bn in ((c, False), (d, True)):
        recs = groups.get((lr, bn), [])[:1]  # one network, as in the paper's Figure 1
        for q, color in (("p15", plots.COLORS[0]), ("p50", plots.COLORS[1]),
                         ("p85", plots.COLORS[0])):
            if recs:
                plots.band(ax, recs[0]["metrics"]["steps"], metric(recs, q), q, color)
        seed = f", seed {recs[0]['seed']}" if recs and "seed" in recs[0] else ""
        plots.finish(ax, f"sigmoid input percentiles, {'BN' if bn else 'no BN'}, lr {lr:g}"
                         f"{seed}", "step", "value")
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "lr", "bn")
    checks: list[str] = []
    paragraphs = _reference_text(cfg, groups, checks) + [_across_lrs(cfg, groups)]
    lr = cfg["reference_lr"]
    tp, tb = to_target(groups.get((lr, False), [])), to_target(groups.get((lr, True), []))
    steps = cfg["steps"]
    headline = (f"lr {lr:g}: {cfg['target']:.0%} test accuracy {_after(tb, steps)} with BN, "
                f"{_after(tp, steps)} without")
    table = Table(["lr", "final acc no BN %", "final acc BN %", "steps to target no BN",
                   "steps to target BN", "ratio", "ms/step no BN", "ms/step BN"],
                  _rows(cfg, groups))
    return Section(NAME, TITLE, CLAIM, headline, combine(checks), paragraphs, table,
                   _figure(cfg, groups))
