"""Init: sensitivity to the scale of the initial weights, with and without BN.

The BN paper's sigmoid MLP (as in `convergence`) started from weights N(0, s^2) for scales
s spanning two orders of magnitude. BN makes a layer's output invariant to the scale of
its weights (BN(aWx) = BN(Wx) for a > 0, section 3.3 of Ioffe & Szegedy 2015), so the BN
network should train from every scale, while the plain network saturates its sigmoids at
large scales and barely moves at small ones.
"""
from __future__ import annotations

from . import plots
from .models import make_mlp
from .sections import Section, Table, by, combine, compare, evidence, fmt, mean, metric, pct
from .train import subset, train_classifier

NAME = "init"
TITLE = "Sensitivity to the weight-initialization scale"
CLAIM = ("With BN, final accuracy barely depends on the scale of the initial weights; "
         "without BN it depends strongly on it.")

_BASE = {"hidden": 100, "depth": 3, "batch": 60, "lr": 0.5,
         "init_stds": [0.01, 0.03, 0.1, 0.3, 1.0]}
PROFILES = {
    "mini": {**_BASE, "init_stds": [0.01, 1.0], "steps": 20, "eval_every": 10, "batch": 16,
             "test_subset": 128},
    "quick": {**_BASE, "steps": 200, "eval_every": 25, "test_subset": 1000},
    "full": {**_BASE, "steps": 2500, "eval_every": 250, "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"init_std": s, "bn": bn} for s in cfg["init_stds"] for bn in (False, True)]


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), n_test=cfg["test_subset"])
    model = make_mlp(variant["bn"], cfg["hidden"], cfg["depth"], init_std=variant["init_std"],
                     in_features=data.x_train.shape[1], seed=seed)
    with ctx.bar(cfg["steps"], f"init {variant['init_std']:g}, BN {variant['bn']}") as bar:
        rows = train_classifier(model, data, cfg["steps"], cfg["lr"], cfg["batch"],
                                cfg["eval_every"], seed,
                                lambda row, m: bar.advance_to(row["step"]))
    return {"steps": [r["step"] for r in rows], "acc": [r["test_acc"] for r in rows],
            "final_acc": rows[-1]["test_acc"], "final_loss": rows[-1]["train_loss"]}


def _range(groups, scales, bn: bool) -> tuple[float, float]:
    """(worst, best) mean final accuracy across the init scales that finished."""
    accs = [mean(metric(groups[(s, bn)], "final_acc")) for s in scales if (s, bn) in groups]
    return (min(accs), max(accs)) if accs else (float("nan"), float("nan"))


def per_seed(groups, scales, bn: bool) -> tuple[list[float], list[float]]:
    """(spread across scales, worst scale) of the final accuracy, one value per seed that
    finished every scale."""
    finals: dict[int, list[float]] = {}
    for s in scales:
        for rec in groups.get((s, bn), []):
            finals.setdefault(rec["seed"], []).append(rec["metrics"]["final_acc"])
    full = [v for v in finals.values() if len(v) == len(scales)]
    return [max(v) - min(v) for v in full], [min(v) for v in full]


def _figure(cfg, groups):
    fig, (a, b) = plots.figure(2, 1)
    scales = cfg["init_stds"]
    for bn, style, color in ((False, "s--", plots.COLORS[1]), (True, "o-", plots.COLORS[0])):
        plots.points(a, scales, [metric(groups.get((s, bn), []), "final_acc") for s in scales],
                     "BN" if bn else "no BN", color, style, 100)
    plots.log_x(a, scales)
    plots.finish(a, f"final test accuracy after {cfg['steps']} steps", "initial weight std",
                 "%")
    for i, s in enumerate(scales):
        for bn, style in ((False, "--"), (True, "-")):
            recs = groups.get((s, bn), [])
            if recs:
                plots.band(b, recs[0]["metrics"]["steps"], metric(recs, "acc"),
                           f"std {s:g}{' BN' if bn else ''}", plots.COLORS[i], style, 100)
    plots.finish(b, "test accuracy (solid: BN, dashed: no BN)", "step", "%")
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups, scales = by(records, "init_std", "bn"), cfg["init_stds"]
    (pw, pb), (bw, bb) = _range(groups, scales, False), _range(groups, scales, True)
    text = (f"Over initial weight std {min(scales):g} to {max(scales):g} ({len(scales)} "
            f"scales, lr {cfg['lr']:g}, {cfg['steps']:,} steps): with BN the final test accuracy "
            f"ranged from {pct(bw)} to {pct(bb)} (spread {100 * (bb - bw):.1f} points); without "
            f"BN from {pct(pw)} to {pct(pb)} (spread {100 * (pb - pw):.1f} points).")
    (p_spread, p_worst), (b_spread, b_worst) = (per_seed(groups, scales, False),
                                                per_seed(groups, scales, True))
    checks = [compare(p_spread, b_spread, "a > b"), compare(b_worst, p_worst, "a > b")]
    text += (f" Smaller spread across scales with BN: {checks[0]} (spread without BN minus "
             f"with BN, per seed: {evidence(p_spread, b_spread, 100, unit=' points')}). A "
             f"better worst scale with BN: {checks[1]} (worst with BN minus worst without: "
             f"{evidence(b_worst, p_worst, 100, unit=' points')}).")
    if "does not hold" in checks:
        text += " This contradicts the claim that BN removes the sensitivity to the scale."
    rows = [[f"{s:g}", fmt(metric(groups.get((s, False), []), "final_acc"), 100),
             fmt(metric(groups.get((s, True), []), "final_acc"), 100)] for s in scales]
    headline = (f"final accuracy across scales: BN {pct(bw)}–{pct(bb)}, "
                f"no BN {pct(pw)}–{pct(pb)}")
    return Section(NAME, TITLE, CLAIM, headline, combine(checks), [text],
                   Table(["init std", "final acc no BN %", "final acc BN %"], rows),
                   _figure(cfg, groups))
