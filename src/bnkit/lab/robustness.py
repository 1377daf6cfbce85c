"""Robustness: a BN CNN trained on clean images, tested on corrupted ones, with and without
test-time adaptation of its BN layers.

Methods (all through `bnkit.adapt`, on the unlabelled corrupted test set in batches):
source (the training statistics), adabn (Li et al. 2016: the statistics re-estimated on the
target data), prior (Schneider et al. 2020: source and target statistics mixed with prior
strength N) and tent (Wang et al. 2021: BN affine parameters trained to minimize the
prediction entropy, one pass). The adapted model is then evaluated in eval mode on the same
data. Corruptions are in `bnkit.lab.corruptions`.
"""
from __future__ import annotations

from . import plots
from .corruptions import LEVELS, corrupt
from .models import make_cnn
from .sections import Section, Table, by, combine, decide, finite, fmt, mean, pct
from .train import TrainConfig, evaluate, fit, images, subset

NAME = "robustness"
TITLE = "Robustness to corruptions and test-time BN adaptation"
CLAIM = ("Re-estimating BN statistics on the shifted test data (AdaBN, prior mixing) or "
         "adapting BN's affine parameters (TENT) lowers the error under covariate shift.")
METHODS = ("source", "adabn", "prior", "tent")

_BASE = {"widths": [16, 32], "batch": 32, "lr": 0.05, "momentum": 0.9,
         "corruptions": list(LEVELS), "severities": [1, 2, 3, 4, 5], "methods": list(METHODS),
         "adapt_batch": 128, "prior": 16}
PROFILES = {
    "mini": {**_BASE, "widths": [4, 8], "batch": 16, "steps": 10, "train_subset": 128,
             "test_subset": 64, "corruptions": ["contrast", "gaussian_noise"],
             "severities": [1, 5], "adapt_batch": 32},
    "quick": {**_BASE, "widths": [8, 16], "steps": 300, "severities": [1, 3, 5],
              "train_subset": None, "test_subset": 300},
    "full": {**_BASE, "steps": 1000, "train_subset": None, "test_subset": 5000},
}


def requires(cfg: dict) -> str | None:
    from .. import tools

    return None if hasattr(tools, "adapt") else "bnkit.tools has no adapt yet"


def cells(cfg: dict) -> list[dict]:
    return [{"corruption": "none"}] + [{"corruption": c} for c in cfg["corruptions"]]


def _source_model(ctx, cfg: dict, seed: int):
    """The clean-trained CNN of this seed, shared by the cells through an artifact."""
    def build():
        data = subset(ctx.data(), cfg["train_subset"])
        model = make_cnn(cfg["widths"], "bn", seed=seed)
        with ctx.bar(cfg["steps"], "train source CNN") as bar:
            fit(model, images(data.x_train), data.y_train,
                TrainConfig(steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                            momentum=cfg["momentum"], seed=seed), bar=bar)
        return model.eval()
    return ctx.artifact(f"robustness-cnn-seed{seed}", build)


def accuracy(model, method: str, x, y, cfg: dict) -> float:
    """Test accuracy after adapting `model` (not changed) to x with `method`."""
    from ..tools import adapt

    if method != "source":
        batches = list(x.split(cfg["adapt_batch"]))
        model = adapt(model, batches, method=method, prior=cfg["prior"],
                      batch_size=cfg["adapt_batch"], progress=False, inplace=False)
    return evaluate(model, x, y, cfg["adapt_batch"])


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    model = _source_model(ctx, cfg, seed)
    data = subset(ctx.data(), n_test=cfg["test_subset"])
    x, y = images(data.x_test), data.y_test
    name = variant["corruption"]
    levels = [0] if name == "none" else cfg["severities"]
    acc = {m: [] for m in cfg["methods"]}
    with ctx.bar(len(levels) * len(acc), f"{name}") as bar:
        for s in levels:
            xc = x if s == 0 else corrupt(x, name, s, seed=1000 * seed + s)
            for m, values in acc.items():
                values.append(accuracy(model, m, xc, y, cfg))
                bar.advance()
    return {"severities": levels, "acc": acc,
            "mean_err": {m: 1 - sum(a) / len(a) for m, a in acc.items()}}


# ----------------------------------------------------------------------------- summary

def _err(groups, corruption: str, method: str) -> float:
    return mean([r["metrics"]["mean_err"].get(method) for r in groups.get((corruption,), [])])


def gains(groups, names, method: str) -> list[float]:
    """Per seed: the mean error over the corruptions `names` with `method` minus with the
    training statistics (the same source model of that seed; seeds that finished them all)."""
    per: dict[int, list[float]] = {}
    for c in names:
        for rec in groups.get((c,), []):
            err = rec["metrics"]["mean_err"]
            per.setdefault(rec["seed"], []).append(err[method] - err["source"])
    return [mean(v) for _, v in sorted(per.items()) if len(v) == len(names)]


def _text(cfg, groups, checks) -> list[str]:
    names = [c for c in cfg["corruptions"] if (c,) in groups]
    if not names:
        return ["No corrupted test set has finished yet."]
    avg = {m: mean([_err(groups, c, m) for c in names]) for m in cfg["methods"]}
    clean = _err(groups, "none", "source")
    out = [f"Clean test error {pct(clean)}. Mean error over {len(names)} corruptions x "
           f"{len(cfg['severities'])} severities: "
           + ", ".join(f"{m} {pct(avg[m])}" for m in cfg["methods"]) + "."]
    for m in (m for m in cfg["methods"] if m != "source"):
        better = [c for c in names if _err(groups, c, m) < _err(groups, c, "source")]
        verdict, how = decide(gains(groups, names, m), "a < b", 100, unit=" points")
        checks.append(verdict)
        out.append(f"{m} lowers the mean corrupted error: {verdict} ({m} minus the training "
                   f"statistics, same model per seed: {how}); "
                   f"its mean error was lower on {len(better)} of {len(names)} corruptions"
                   + (f" (not on: {', '.join(c for c in names if c not in better)})"
                      if len(better) < len(names) else "") + ".")
    return out + _worst_case(cfg, groups)


def _worst_case(cfg, groups) -> list[str]:
    """The corruption where adaptation helped most, at the highest severity."""
    gains = {}
    for (c,), recs in groups.items():
        if c == "none" or "adabn" not in cfg["methods"]:
            continue
        src = mean([r["metrics"]["acc"]["source"][-1] for r in recs])
        ada = mean([r["metrics"]["acc"]["adabn"][-1] for r in recs])
        if finite(src, ada):
            gains[c] = (ada - src, src, ada)
    if not gains:
        return []
    c = max(gains, key=lambda k: gains[k][0])
    _, src, ada = gains[c]
    top = cfg["severities"][-1]
    return [(f"Largest AdaBN gain: {c} at severity {top} (parameter "
             f"{LEVELS[c][top - 1]:g}): {pct(src)} accuracy with the training statistics, "
             f"{pct(ada)} after re-estimating them.")]


def _figure(cfg, groups):
    names = cfg["corruptions"]
    ncols = min(3, len(names))
    fig, axes = plots.figure(ncols, -(-len(names) // ncols), width=4.0, height=3.0)
    clean = groups.get(("none",), [])
    for ax, c in zip(axes, names):
        recs = groups.get((c,), [])
        for i, m in enumerate(cfg["methods"]):
            per = [[1 - r["metrics"]["acc"][m][j] for r in recs]
                   for j in range(len(cfg["severities"]))]
            plots.points(ax, cfg["severities"], per, m, plots.COLORS[i], scale=100)
        if clean:
            ax.axhline(100 * _err(groups, "none", "source"), color="k", ls=":", lw=0.8)
        plots.finish(ax, c, "severity", "error %", legend=ax is axes[0])
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "corruption")
    checks: list[str] = []
    paragraphs = _text(cfg, groups, checks)
    rows = [[c] + [fmt([r["metrics"]["mean_err"][m] for r in groups.get((c,), [])], 100)
                   for m in cfg["methods"]] for c in ["none"] + cfg["corruptions"]]
    names = [c for c in cfg["corruptions"] if (c,) in groups]
    avg = {m: mean([_err(groups, c, m) for c in names]) for m in cfg["methods"]}
    headline = "mean corrupted error: " + ", ".join(f"{m} {pct(avg[m])}" for m in avg)
    return Section(NAME, TITLE, CLAIM, headline, combine(checks), paragraphs,
                   Table(["corruption (mean over severities)"]
                         + [f"{m} error %" for m in cfg["methods"]], rows),
                   _figure(cfg, groups))
