"""Transfer: pretrain on classes 0-4, fine-tune on classes 5-9 with k labelled images per class.

The pretrained CNN's classifier is replaced by a new 5-way head, then one of:

* all:       train every parameter, BN in train mode (statistics from the new batches);
* frozen:    `bnkit.freeze` (BN statistics and affine fixed at the source values), train
             the rest;
* adabn:     `bnkit.adapt(method="adabn")` on the k-shot images (statistics re-estimated),
             then frozen as above and the rest trained;
* bn_affine: train only BN's gamma and beta and the new head (Frankle et al. 2020 train
             only BN; the head must learn the new classes).

Every method takes the same number of steps; accuracy is on the test images of classes 5-9.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import plots
from .models import make_cnn
from .sections import Section, Table, by, combine, decide, finite, fmt, mean, metric, paired, pct
from .train import TrainConfig, class_subset, evaluate, fit, images, subset

NAME = "transfer"
TITLE = "Transfer to new classes: what to do with BN when fine-tuning"
CLAIM = ("With few labels, keeping BN's statistics fixed (frozen BN, or AdaBN then frozen) is "
         "more accurate than training everything; with many labels, training everything "
         "is best.")
METHODS = ("all", "frozen", "adabn", "bn_affine")

_BASE = {"widths": [16, 32], "batch": 32, "lr": 0.05, "momentum": 0.9, "ft_lr": 0.01,
         "source_classes": [0, 1, 2, 3, 4], "target_classes": [5, 6, 7, 8, 9],
         "ks": [10, 100, 1000], "methods": list(METHODS)}
PROFILES = {
    "mini": {**_BASE, "widths": [4, 8], "batch": 8, "ks": [2, 5], "pretrain_steps": 10,
             "ft_steps": 5, "test_subset": 128},
    "quick": {**_BASE, "widths": [8, 16], "ks": [10, 1000], "pretrain_steps": 300,
              "ft_steps": 40, "test_subset": 2000},
    "full": {**_BASE, "pretrain_steps": 1000, "ft_steps": 300, "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    from .. import tools

    missing = [n for n in ("adapt", "freeze") if not hasattr(tools, n)]
    return f"bnkit.tools has no {', '.join(missing)} yet" if missing else None


def cells(cfg: dict) -> list[dict]:
    return [{"k": k, "method": m} for k in cfg["ks"] for m in cfg["methods"]]


def _pretrained(ctx, cfg: dict, seed: int):
    """(CNN trained on the source classes, its source test accuracy), shared by the cells."""
    def build():
        data = subset(ctx.data(), n_test=cfg["test_subset"])
        x, y = class_subset(images(data.x_train), data.y_train, cfg["source_classes"])
        model = make_cnn(cfg["widths"], "bn", classes=len(cfg["source_classes"]), seed=seed)
        with ctx.bar(cfg["pretrain_steps"], "pretrain on source classes") as bar:
            fit(model, x, y, TrainConfig(steps=cfg["pretrain_steps"], batch=cfg["batch"],
                                         lr=cfg["lr"], momentum=cfg["momentum"], seed=seed),
                bar=bar)
        xt, yt = class_subset(images(data.x_test), data.y_test, cfg["source_classes"])
        return model.eval(), evaluate(model, xt, yt, 500)
    return ctx.artifact(f"transfer-cnn-seed{seed}", build)


def prepare(model: nn.Module, method: str, x: torch.Tensor, classes: int, seed: int):
    """(model ready to fine-tune, parameters to train) for one method; `model` is copied."""
    from ..tools import adapt, freeze

    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    model[-1] = nn.Linear(model[-1].in_features, classes)  # new head for the new classes
    if method == "adabn":
        model = adapt(model, list(x.split(256)), method="adabn", progress=False)
    if method in ("frozen", "adabn"):
        model = freeze(model)
    if method == "bn_affine":
        from ..tools import bn_affine_params

        params = bn_affine_params(model) + list(model[-1].parameters())
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)  # no gradient work for the fixed weights
        return model, params
    return model, None


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    base, source_acc = _pretrained(ctx, cfg, seed)
    data = subset(ctx.data(), n_test=cfg["test_subset"])
    target = cfg["target_classes"]
    x, y = class_subset(images(data.x_train), data.y_train, target, variant["k"], seed)
    model, params = prepare(base, variant["method"], x, len(target), seed)
    with ctx.bar(cfg["ft_steps"], f"k={variant['k']}, {variant['method']}") as bar:
        fit(model, x, y, TrainConfig(steps=cfg["ft_steps"], batch=min(cfg["batch"], len(x)),
                                     lr=cfg["ft_lr"], momentum=cfg["momentum"], seed=seed),
            params=params, bar=bar)
    xt, yt = class_subset(images(data.x_test), data.y_test, target)
    return {"test_acc": evaluate(model, xt, yt, 500), "source_acc": source_acc,
            "train_examples": len(x)}


# ----------------------------------------------------------------------------- summary

def _acc(groups, k, m) -> float:
    return mean(metric(groups.get((k, m), []), "test_acc"))


def _text(cfg, groups, checks) -> list[str]:
    out = []
    src = mean([r["metrics"]["source_acc"] for recs in groups.values() for r in recs])
    out.append(f"Source model: {pct(src)} test accuracy on classes "
               f"{cfg['source_classes'][0]}-{cfg['source_classes'][-1]}.")
    for k in cfg["ks"]:
        accs = {m: _acc(groups, k, m) for m in cfg["methods"] if finite(_acc(groups, k, m))}
        if accs:
            best = max(accs, key=accs.get)
            out.append(f"k={k} per class: " + ", ".join(f"{m} {pct(a)}" for m, a in
                                                       accs.items()) + f"; best: {best}.")
    lo, hi = min(cfg["ks"]), max(cfg["ks"])
    fixed = max(("frozen", "adabn"), key=lambda m: _acc(groups, lo, m))
    if finite(_acc(groups, lo, fixed), _acc(groups, lo, "all")):
        verdict, how = _check(groups, (lo, fixed), (lo, "all"))
        checks.append(verdict)
        out.append(f"With k={lo}, fixed BN statistics ({fixed}, the better of frozen and adabn) "
                   f"more accurate than training everything: {verdict} "
                   f"({pct(_acc(groups, lo, fixed))} vs {pct(_acc(groups, lo, 'all'))}; {how}).")
    others = [m for m in cfg["methods"] if m != "all"]
    if others and finite(_acc(groups, hi, "all"), *(_acc(groups, hi, m) for m in others)):
        best = max(others, key=lambda m: _acc(groups, hi, m))
        verdict, how = _check(groups, (hi, "all"), (hi, best))
        checks.append(verdict)
        out.append(f"With k={hi}, training everything more accurate than the best other "
                   f"method ({best}): {verdict} ({pct(_acc(groups, hi, 'all'))} vs "
                   f"{pct(_acc(groups, hi, best))}; {how}).")
    out.append("A difference within 2 standard errors is inconclusive: the methods tie within "
               "the seed-to-seed spread.")
    return out


def _check(groups, a: tuple, b: tuple) -> tuple[str, str]:
    """Decide 'a is more accurate than b' on per-seed differences (the same seed gives both
    the same pretrained model and the same k-shot images)."""
    return decide(paired(groups.get(a, []), groups.get(b, []), "test_acc"), "a > b", 100,
                  unit=" points")


def _figure(cfg, groups):
    fig, (ax,) = plots.figure(1, 1, width=6.0)
    for i, m in enumerate(cfg["methods"]):
        plots.points(ax, cfg["ks"], [metric(groups.get((k, m), []), "test_acc")
                                     for k in cfg["ks"]], m, plots.COLORS[i], scale=100)
    plots.log_x(ax, cfg["ks"])
    plots.finish(ax, f"accuracy on classes {cfg['target_classes'][0]}-"
                     f"{cfg['target_classes'][-1]} after {cfg['ft_steps']} steps",
                 "labelled images per class (k)", "%")
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "k", "method")
    checks: list[str] = []
    paragraphs = _text(cfg, groups, checks)
    rows = [[str(k)] + [fmt(metric(groups.get((k, m), []), "test_acc"), 100)
                        for m in cfg["methods"]] for k in cfg["ks"]]
    lo = min(cfg["ks"])
    headline = f"k={lo}: " + ", ".join(f"{m} {pct(_acc(groups, lo, m))}" for m in cfg["methods"])
    return Section(NAME, TITLE, CLAIM, headline, combine(checks), paragraphs,
                   Table(["k"] + [f"{m} acc %" for m in cfg["methods"]], rows),
                   _figure(cfg, groups))
