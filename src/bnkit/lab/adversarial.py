"""Adversarial: does BN make a network more robust? FGSM, PGD and Gaussian noise against the
same CNN with and without BN (Galloway et al. 2019, "Batch Normalization is a Cause of
Adversarial Vulnerability").

The lab's two-block CNN, with bnkit BatchNorm2d after each conv or without normalization, is
trained until its accuracy on a held-out validation split (the last examples of the
training set) reaches a target, so both networks are compared at about the same clean
accuracy. Then, in eval mode (BN uses its running statistics), on test images in [0, 1]:

* FGSM (Goodfellow et al. 2015): x' = clip(x + eps * sign(grad_x loss), 0, 1);
* PGD (Madry et al. 2018), L-infinity: a uniform random start in the eps-ball, then `steps`
  signed-gradient steps of 2.5 * eps / steps, each projected back onto the eps-ball and
  [0, 1];
* additive Gaussian noise: clip(x + sigma * N(0, 1), 0, 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import plots
from .models import make_cnn
from .sections import Section, Table, by, combine, compare, fmt, mean, metric, pct
from .train import TrainConfig, evaluate, fit, images, subset

NAME = "adversarial"
TITLE = "Robustness to adversarial examples and noise, with and without BN"
CLAIM = ("BN makes a network more robust: at the same clean accuracy, the BN network keeps a "
         "higher accuracy under small FGSM and PGD perturbations and under Gaussian noise.")
ATTACKS = ("fgsm", "pgd", "noise")
LABELS = {"fgsm": "FGSM", "pgd": "PGD", "noise": "Gaussian noise"}

_BASE = {"widths": [8, 16], "batch": 32, "lr": 0.05, "momentum": 0.9, "target": 0.80,
         "check_every": 50, "max_steps": 600, "val": 1000,
         "eps": [0.005, 0.01, 0.02, 0.04], "pgd_steps": 7, "sigmas": [0.05, 0.1, 0.2, 0.3]}
PROFILES = {
    "mini": {**_BASE, "widths": [4, 8], "batch": 16, "target": 0.3, "check_every": 5,
             "max_steps": 10, "val": 32, "train_subset": 160, "test_subset": 64,
             "eps": [0.01, 0.05], "pgd_steps": 2, "sigmas": [0.1]},
    "quick": {**_BASE, "val": 500, "eps": [0.01, 0.02, 0.04], "pgd_steps": 5,
              "train_subset": None,
              "test_subset": 400},
    "full": {**_BASE, "target": 0.85, "check_every": 100, "max_steps": 3000, "val": 5000,
             "train_subset": None, "test_subset": 1000, "eps": [0.0025, 0.005, 0.01, 0.02, 0.04],
             "pgd_steps": 10, "sigmas": [0.05, 0.1, 0.2, 0.3, 0.4]},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"bn": bn} for bn in (False, True)]


# ----------------------------------------------------------------------------- attacks

def input_grad(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy with respect to the input (model in eval mode)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps, clipped to the image range [0, 1]."""
    return (x + eps * input_grad(model, x, y).sign()).clamp(0.0, 1.0)


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
        generator: torch.Generator, step_size: float | None = None) -> torch.Tensor:
    """L-infinity PGD from a uniform random start; every iterate stays in
    [x - eps, x + eps] and in [0, 1]. step_size defaults to 2.5 * eps / steps."""
    alpha = 2.5 * eps / steps if step_size is None else step_size
    lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
    adv = torch.minimum(torch.maximum(x + eps * noise, lo), hi)
    for _ in range(steps):
        adv = adv + alpha * input_grad(model, adv, y).sign()
        adv = torch.minimum(torch.maximum(adv, lo), hi)
    return adv.detach()


def gaussian(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x + sigma * N(0, 1), clipped to [0, 1]."""
    return (x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)).clamp(0, 1)


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def robust_accuracy(model, x, y, cfg: dict, seed: int) -> dict[str, list[float]]:
    """{attack: [accuracy at each eps (sigma for noise)]} on (x, y), model in eval mode."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + seed)
    return {"fgsm": [_acc(model, fgsm(model, x, y, e), y) for e in cfg["eps"]],
            "pgd": [_acc(model, pgd(model, x, y, e, cfg["pgd_steps"], gen), y)
                    for e in cfg["eps"]],
            "noise": [_acc(model, gaussian(x, s, gen), y) for s in cfg["sigmas"]]}


# ----------------------------------------------------------------------------- cells

def train_to_target(model, data, cfg: dict, seed: int, bar) -> tuple[int, float]:
    """Train in chunks of check_every steps (each a `fit` call, so the SGD momentum restarts)
    until the validation accuracy reaches the target or max_steps; returns (steps taken,
    validation accuracy)."""
    n_val = cfg["val"]
    x, y = images(data.x_train[:-n_val]), data.y_train[:-n_val]
    xv, yv = images(data.x_train[-n_val:]), data.y_train[-n_val:]
    steps, acc = 0, evaluate(model, xv, yv, 500)
    while acc < cfg["target"] and steps < cfg["max_steps"]:
        chunk = min(cfg["check_every"], cfg["max_steps"] - steps)
        # a new batch order per chunk, seeded by the seed and the chunk
        fit(model, x, y, TrainConfig(steps=chunk, batch=cfg["batch"], lr=cfg["lr"],
                                     momentum=cfg["momentum"], seed=1000 * seed + steps),
            bar=bar)
        steps += chunk
        acc = evaluate(model, xv, yv, 500)
    return steps, acc


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), cfg["train_subset"], cfg["test_subset"])
    model = make_cnn(cfg["widths"], "bn" if variant["bn"] else "none", seed=seed)
    with ctx.bar(cfg["max_steps"], f"{'BN' if variant['bn'] else 'no BN'}: train") as bar:
        steps, val = train_to_target(model, data, cfg, seed, bar)
    x, y = images(data.x_test), data.y_test
    return {"steps": steps, "val_acc": val, "clean_acc": _acc(model.eval(), x, y),
            **robust_accuracy(model, x, y, cfg, seed)}


# ----------------------------------------------------------------------------- summary

def _avg(records: list[dict], attack: str) -> list[float]:
    """Per seed: the accuracy under `attack`, averaged over its eps (or sigma) values."""
    return [mean(r["metrics"][attack]) for r in records]


def _check(groups, attack: str) -> tuple[str, str]:
    plain, bn = groups.get((False,), []), groups.get((True,), [])
    a, b = _avg(bn, attack), _avg(plain, attack)
    verdict = compare(a, b, "a > b")
    word = {"holds": "higher", "does not hold": "LOWER", "inconclusive": "not decidably "
            "different"}[verdict]
    return verdict, (f"{LABELS[attack]}: BN {fmt(a, 100)}%, no BN {fmt(b, 100)}% (accuracy "
                     f"averaged over the levels) — BN's is {word}")


def _text(cfg, groups) -> tuple[str, list[str]]:
    plain, bn = groups.get((False,), []), groups.get((True,), [])
    out = [(f"Both networks were trained until {cfg['target']:.0%} validation accuracy "
            f"(at most {cfg['max_steps']:,} steps of batch {cfg['batch']}): BN took "
            f"{fmt(metric(bn, 'steps'), digits=0)} steps, no BN "
            f"{fmt(metric(plain, 'steps'), digits=0)}; clean test accuracy BN "
            f"{fmt(metric(bn, 'clean_acc'), 100)}%, no BN "
            f"{fmt(metric(plain, 'clean_acc'), 100)}%.")]
    checks = [_check(groups, a) for a in ATTACKS]
    verdict = combine([v for v, _ in checks])
    levels = (f"eps {', '.join(f'{e:g}' for e in cfg['eps'])} on [0, 1] images, PGD with "
              f"{cfg['pgd_steps']} steps; noise sigma {', '.join(f'{s:g}' for s in cfg['sigmas'])}")
    out.append(f"Under attack ({levels}): " + "; ".join(t for _, t in checks)
               + " (two standard errors of the seed-to-seed spread decide).")
    if verdict == "holds":
        out.append("The claim holds in this run: BN made the network more robust. This "
                   "contradicts Galloway et al. 2019, who report that BN increases "
                   "adversarial vulnerability and the sensitivity to noise.")
    elif verdict == "does not hold":
        out.append("The claim does NOT hold in this run: the BN network was less robust, as "
                   "Galloway et al. 2019 report (BN increases adversarial vulnerability).")
    else:
        out.append(f"The run does not decide the claim as a whole ({verdict}); Galloway et "
                   "al. 2019 report that BN lowers the accuracy under small perturbations "
                   "and noise.")
    return verdict, out


def _figure(cfg, groups):
    fig, axes = plots.figure(3, 1, width=4.2)
    for ax, attack in zip(axes, ATTACKS):
        levels = cfg["sigmas"] if attack == "noise" else cfg["eps"]
        for bn, style, color in ((False, "s--", plots.COLORS[1]), (True, "o-", plots.COLORS[0])):
            recs = groups.get((bn,), [])
            per = [metric(recs, "clean_acc")] + [[r["metrics"][attack][i] for r in recs]
                                                 for i in range(len(levels))]
            plots.points(ax, [0.0] + list(levels), per, "BN" if bn else "no BN", color, style,
                         100)
        ax.set_ylim(0, 100)
        ax.axhline(10, color="k", lw=0.8, ls=":")  # chance
        what = "sigma" if attack == "noise" else "eps (L-inf, pixels in [0, 1])"
        plots.finish(ax, f"{LABELS[attack]}: test accuracy (dotted: chance)", what, "%",
                     legend=attack == "fgsm")
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "bn")
    verdict, paragraphs = _text(cfg, groups)
    rows = []
    for bn in (False, True):
        recs = groups.get((bn,), [])
        rows.append(["BN" if bn else "no BN", fmt(metric(recs, "clean_acc"), 100)]
                    + [fmt([r["metrics"]["pgd"][i] for r in recs], 100)
                       for i in range(len(cfg["eps"]))]
                    + [fmt(_avg(recs, a), 100) for a in ATTACKS])
    pgd = {bn: mean(_avg(groups.get((bn,), []), "pgd")) for bn in (False, True)}
    headline = (f"PGD accuracy (mean over eps): BN {pct(pgd[True])}, no BN {pct(pgd[False])}"
                if not math.isnan(pgd[True] + pgd[False]) else "a variant has not finished")
    table = Table(["network", "clean %"] + [f"PGD eps {e:g} %" for e in cfg["eps"]]
                  + [f"{LABELS[a]} mean %" for a in ATTACKS], rows)
    return Section(NAME, TITLE, CLAIM, headline, verdict, paragraphs, table,
                   _figure(cfg, groups))
