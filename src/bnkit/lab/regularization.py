"""Regularization: does BN reduce overfitting and complement L2 and Dropout?

An overfitting set-up: a ReLU MLP 784 -> hidden -> hidden -> 10 trained on a small subset
of the training set (SGD with momentum, many epochs), in the variants

* none, bn (bnkit BatchNorm1d before each ReLU), dropout (after each hidden ReLU),
  l2 (weight decay on every weight), bn+l2;
* bn+dropout-before: Dropout after each hidden ReLU, so the next layer's BN sees
  dropped-out input (the set-up Li et al. 2019 warn about);
* bn+dropout-after: Dropout only after the last BN, before the classifier.

Measured: test accuracy and the train-test gap; the variance shift of every BN input between
train mode (Dropout active) and eval mode on the same test images (Li et al. 2019: for inverted
dropout with keep probability k on input of mean c and variance v the train-mode variance is
(c^2 + v) / k - c^2, not v); the scale invariance behind L2 with BN (van Laarhoven 2017):
scaling the weights feeding a BN leaves its train-mode output unchanged, and the weight norm
and the effective learning rate lr / |W|^2 with and without L2.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from .. import nn as bnn
from . import plots
from .sections import Section, Table, by, combine, compare, fmt, mean, metric, pct
from .train import TrainConfig, evaluate, fit, subset

NAME = "regularization"
TITLE = "BN as a regularizer, with L2 and Dropout"
CLAIM = ("BN reduces overfitting (a smaller train-test gap) and complements L2 and Dropout "
         "(adding either to a BN network raises its test accuracy).")

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # bnkit's layers subclass these
SHORT = {"none": "none", "bn": "BN", "dropout": "drop", "l2": "L2", "bn+l2": "BN\n+L2",
         "bn+dropout-before": "drop\n→BN", "bn+dropout-after": "BN\n→drop"}
VARIANTS = ("none", "bn", "dropout", "l2", "bn+l2", "bn+dropout-before", "bn+dropout-after")

_BASE = {"hidden": 128, "batch": 64, "lr": 0.05, "momentum": 0.9, "dropout": 0.5,
         "weight_decay": 5e-3, "scales": [0.5, 2.0, 10.0], "variants": list(VARIANTS)}
PROFILES = {
    "mini": {**_BASE, "hidden": 16, "batch": 16, "steps": 20, "eval_every": 10,
             "train_subset": 64, "test_subset": 64},
    "quick": {**_BASE, "steps": 300, "eval_every": 50, "train_subset": 1000,
              "test_subset": 2000},
    "full": {**_BASE, "hidden": 256, "steps": 1000, "eval_every": 100, "train_subset": 2000,
             "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"reg": v} for v in cfg["variants"]]


def make_model(reg: str, hidden: int, p: float, in_features: int = 784,
               seed: int = 0) -> nn.Sequential:
    """The MLP of variant `reg` (one of VARIANTS); the same Linear weights for every variant.

    Example:
        >>> [type(m).__name__ for m in make_model("bn+dropout-after", 8, 0.5)]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d', 'ReLU', 'Dropout', 'Linear']
    """
    if reg not in VARIANTS:
        raise ValueError(f"unknown regularization variant {reg!r}: expected one of {VARIANTS}; "
                         "pass one of those names")
    torch.manual_seed(seed)
    bn = reg.startswith("bn")
    layers, width = [], in_features
    for i in range(2):
        layers.append(nn.Linear(width, hidden, bias=not bn))
        if bn:
            layers.append(bnn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        if reg in ("dropout", "bn+dropout-before") or (reg == "bn+dropout-after" and i == 1):
            layers.append(nn.Dropout(p))
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def dropout_variance(mean_: torch.Tensor, var: torch.Tensor, p: float) -> torch.Tensor:
    """Variance of inverted Dropout(p) applied to independent input of mean `mean_` and
    variance `var`: (mean^2 + var) / (1 - p) - mean^2 (Li et al. 2019)."""
    return (mean_ ** 2 + var) / (1 - p) - mean_ ** 2


@torch.no_grad()
def bn_input_variances(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per BN layer, (train-mode variance, eval-mode variance, running variance) of its
    input per unit, on the same inputs x. Train mode runs on a copy, so the model's running
    statistics are untouched."""
    def variances(m, train: bool) -> list[torch.Tensor]:
        seen, hooks = [], [layer.register_forward_pre_hook(
            lambda mod, args: seen.append(args[0].double().var(0, unbiased=False)))
            for layer in m if isinstance(layer, BN_TYPES)]
        m.train(train)(x)
        for h in hooks:
            h.remove()
        return seen

    train = variances(copy.deepcopy(model), True)
    evals = variances(model, False)
    running = [layer.running_var.double() for layer in model
               if isinstance(layer, BN_TYPES)]
    return list(zip(train, evals, running))


def variance_shift(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per BN layer, mean over units of running variance / eval-mode variance of its input on
    x: 1 when the running statistics fit the test-time input, > 1 when training saw a larger
    variance (Dropout before BN)."""
    return [float((rv / ev.clamp_min(1e-12)).mean()) for _, ev, rv in bn_input_variances(model, x)]


@torch.no_grad()
def scale_invariance_error(model: nn.Module, x: torch.Tensor, scales) -> float:
    """Largest relative change of the logits with batch statistics (BN in train mode, Dropout
    off) when every Linear weight feeding a BN is multiplied by a scale (van Laarhoven 2017:
    BN(aWx) = BN(Wx)); runs on copies, the model is untouched."""
    def batch_stats_mode(m: nn.Module) -> nn.Module:
        m.train()
        for layer in m.modules():
            if isinstance(layer, nn.Dropout):
                layer.eval()
        return m

    ref = batch_stats_mode(copy.deepcopy(model))(x)
    worst = 0.0
    for a in scales:
        m = batch_stats_mode(copy.deepcopy(model))
        for layer in weights_before_bn(m):
            layer.weight.mul_(a)
        worst = max(worst, float((m(x) - ref).abs().max() / ref.abs().max()))
    return worst


def weights_before_bn(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a Sequential whose output goes straight into a BN layer."""
    return [m for m, nxt in itertools.pairwise(model) if isinstance(m, nn.Linear)
            and isinstance(nxt, BN_TYPES)]


def _hidden_weight_norm(model: nn.Module) -> float:
    """Root mean square over hidden layers of the Frobenius norm |W| of their weights."""
    ws = [m.weight for m in model if isinstance(m, nn.Linear)][:-1]
    return float(torch.stack([w.detach().double().norm() ** 2 for w in ws]).mean().sqrt())


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), cfg["train_subset"], cfg["test_subset"])
    x, y = data.x_train, data.y_train
    reg = variant["reg"]
    model = make_model(reg, cfg["hidden"], cfg["dropout"], x.shape[1], seed)
    wd = cfg["weight_decay"] if reg.endswith("l2") else 0.0
    def eval_fn(m, row):
        return {"acc": evaluate(m, data.x_test, data.y_test), "norm": _hidden_weight_norm(m)}

    with ctx.bar(cfg["steps"], reg) as bar:
        config = TrainConfig(steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                             momentum=cfg["momentum"], weight_decay=wd,
                             eval_every=cfg["eval_every"], seed=seed)
        fitted = fit(model, x, y, config, bar=bar, eval_fn=eval_fn)
    rows = [(r["step"], r["acc"], r["norm"]) for r in fitted]
    train_acc = evaluate(model, x, y)
    out = {"steps": [r[0] for r in rows], "test_acc": [r[1] for r in rows],
           "weight_norm": [r[2] for r in rows], "final_test_acc": rows[-1][1],
           "train_acc": train_acc, "gap": train_acc - rows[-1][1]}
    if reg.startswith("bn"):
        probe = data.x_test[:512]
        out["var_shift"] = variance_shift(model, probe)
        out["scale_err"] = scale_invariance_error(model, probe, cfg["scales"])
    return out


# ----------------------------------------------------------------------------- summary

def _m(groups, reg: str, name: str) -> list:
    return metric(groups.get((reg,), []), name)


def _shift(groups, reg: str) -> list[float]:
    """Variance shift of the last BN layer per seed."""
    return [v[-1] for v in _m(groups, reg, "var_shift") if v]


def _checks(groups) -> list[tuple[str, str]]:
    return [("BN has a smaller train-test gap than no normalization",
             compare(_m(groups, "bn", "gap"), _m(groups, "none", "gap"), "a < b")),
            ("adding L2 to BN raises test accuracy",
             compare(_m(groups, "bn+l2", "final_test_acc"), _m(groups, "bn", "final_test_acc"))),
            ("adding Dropout after the last BN raises test accuracy",
             compare(_m(groups, "bn+dropout-after", "final_test_acc"),
                     _m(groups, "bn", "final_test_acc")))]


def _li_text(cfg, groups) -> str:
    before, after = _shift(groups, "bn+dropout-before"), _shift(groups, "bn+dropout-after")
    if not before:
        return ""
    worse = compare(_m(groups, "bn+dropout-after", "final_test_acc"),
                    _m(groups, "bn+dropout-before", "final_test_acc"))
    return (f"Variance shift (Li et al. 2019): the running variance of the last BN's input over "
            f"its eval-mode variance on test images is {fmt(before, digits=2)} with Dropout "
            f"(p = {cfg['dropout']:g}) before it, {fmt(after, digits=2)} with Dropout only after "
            f"the last BN, {fmt(_shift(groups, 'bn'), digits=2)} without Dropout. Test accuracy: "
            f"Dropout before BN {fmt(_m(groups, 'bn+dropout-before', 'final_test_acc'), 100, unit='%')}, "
            f"after {fmt(_m(groups, 'bn+dropout-after', 'final_test_acc'), 100, unit='%')}; placing it "
            f"after is better: {worse}." + (
                "" if worse == "holds" else " Li et al. 2019 find that the shift costs test "
                "accuracy; in this run it did not (within two standard errors or the other way)."))


def _laarhoven_text(cfg, groups) -> str:
    errs = [e for r in VARIANTS if r.startswith("bn") for e in _m(groups, r, "scale_err")]
    bn, l2 = _m(groups, "bn", "weight_norm"), _m(groups, "bn+l2", "weight_norm")
    if not errs or not bn or not l2:
        return ""
    end_bn, end_l2 = mean([w[-1] for w in bn]), mean([w[-1] for w in l2])
    return (f"Scale invariance (van Laarhoven 2017): multiplying the weights feeding each BN by "
            f"{' or '.join(f'{s:g}' for s in cfg['scales'])} changed the train-mode logits by at "
            f"most {max(errs):.1e} (relative; exact up to BN's eps), so L2 on those weights does "
            f"not constrain the function. It shrinks their norm instead: |W| at the end {end_bn:.1f} without L2, "
            f"{end_l2:.1f} with L2 (weight decay {cfg['weight_decay']:g}), so the effective "
            f"learning rate lr / |W|^2 is {(end_bn / end_l2) ** 2:.2f}x larger with L2.")


def _against(checks) -> str:
    """' This run contradicts the common claim where ...' for the checks that do not hold."""
    failed = [what for what, v in checks if v == "does not hold"]
    return (" This run contradicts the common claim where the opposite was measured beyond the "
            "spread: NOT " + "; NOT ".join(failed) + "." if failed else "")


def _figure(cfg, groups):
    fig, (a, b, c) = plots.figure(3, 1, width=4.6)
    regs = [r for r in cfg["variants"] if (r,) in groups]
    for j, (name, label) in enumerate((("final_test_acc", "test"), ("train_acc", "train"))):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(regs))]
        vals = [[100 * v for v in _m(groups, r, name)] for r in regs]
        a.bar(xs, [mean(v, 0.0) for v in vals], 0.38, color=plots.COLORS[j], label=label)
        for x, v in zip(xs, vals):
            a.plot([x] * len(v), v, "k.", ms=3)
    a.set_xticks(range(len(regs)), [SHORT[r] for r in regs], fontsize=8)
    lows = [100 * v for r in regs for v in _m(groups, r, "final_test_acc")]
    a.set_ylim(max(0.0, min(lows, default=0.0) - 5), 101)
    plots.finish(a, f"accuracy, {cfg['train_subset']} training examples (drop = Dropout)", "",
                 "%")
    for i, reg in enumerate(("bn", "bn+l2", "none", "l2")):
        recs = groups.get((reg,), [])
        if recs:
            plots.band(b, recs[0]["metrics"]["steps"], metric(recs, "weight_norm"), reg,
                       plots.COLORS[i], "-" if reg.startswith("bn") else "--")
    plots.finish(b, "hidden weight norm |W| (L2 shrinks it)", "step", "|W|")
    labels = [r for r in ("bn", "bn+dropout-before", "bn+dropout-after") if (r,) in groups]
    plots.points(c, list(range(len(labels))), [_shift(groups, r) for r in labels],
                 "last BN", plots.COLORS[3], "o")
    c.axhline(1.0, color="k", lw=0.8)
    c.set_xticks(range(len(labels)), [SHORT[r] for r in labels], fontsize=8)
    c.set_xlim(-0.5, len(labels) - 0.5)
    plots.finish(c, "variance shift: running var / eval var", "", "ratio", legend=False)
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "reg")
    checks = _checks(groups)
    verdict = combine([v for _, v in checks])
    text = [f"A ReLU MLP with two hidden layers of {cfg['hidden']} trained on "
            f"{cfg['train_subset']} examples for {cfg['steps']:,} steps of {cfg['batch']} (SGD "
            f"lr {cfg['lr']:g}, momentum {cfg['momentum']:g}); test accuracy on "
            f"{cfg['test_subset'] or 'all'} test images in eval mode. Checks (two standard "
            "errors over seeds): " + "; ".join(f"{what}: {v}" for what, v in checks) + ".",
            _li_text(cfg, groups), _laarhoven_text(cfg, groups),
            {"holds": "The claim holds in this run.",
             "does not hold": "The claim does NOT hold in this run.",
             "inconclusive": "This run cannot decide the claim: some differences are within "
                             "the seed-to-seed spread.",
             "mixed": "The claim holds only in part in this run: see which checks failed above.",
             "not run": "Not enough cells finished to decide."}[verdict] + _against(checks)]
    rows = [[r, fmt(_m(groups, r, "train_acc"), 100), fmt(_m(groups, r, "final_test_acc"), 100),
             fmt(_m(groups, r, "gap"), 100), fmt(_shift(groups, r), digits=2)
             if r.startswith("bn") else "–"] for r in cfg["variants"] if (r,) in groups]
    headline = (f"test accuracy: none {pct(mean(_m(groups, 'none', 'final_test_acc')))}, BN "
                f"{pct(mean(_m(groups, 'bn', 'final_test_acc')))}, BN+L2 "
                f"{pct(mean(_m(groups, 'bn+l2', 'final_test_acc')))}, BN+Dropout after "
                f"{pct(mean(_m(groups, 'bn+dropout-after', 'final_test_acc')))}")
    return Section(NAME, TITLE, CLAIM, headline, verdict, [t for t in text if t],
                   Table(["variant", "train acc %", "test acc %", "gap (points)",
                          "variance shift"], rows), _figure(cfg, groups))
