"""ICS: does BN work by reducing internal covariate shift? (Santurkar et al. 2018)

A ReLU MLP [Linear -> norm -> ReLU] x depth -> Linear trained with plain SGD in three
variants: no normalization, BN (bnkit BatchNorm1d), and noisy BN: BN followed by a
per-unit scale and shift drawn afresh at every step (scale ~ U(1, noise_scale), shift ~
U(-noise_shift, noise_shift)), so the distribution of every next layer's input moves at
every step on purpose (eval mode applies the noise's mean: scale (1 + noise_scale) / 2, no
shift, as inverted Dropout does). Measured at every probe step, on the
training batch and with the noise of that step held fixed:

* ICS as Santurkar et al. measure it: for each hidden layer l >= 2, the gradient G_l of the
  loss with respect to its weight, and G'_l after the layers before it took their SGD step;
  the l2 difference |G_l - G'_l| / |G_l| and the cosine of G_l and G'_l (1 = no shift);
* the loss landscape along the gradient g: for step sizes eta in `etas`, the range of
  L(theta - eta g), the gradient predictiveness max |grad L(theta) - grad L(theta - eta g)|
  and the effective beta-smoothness max of that difference / |eta g|.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as bnn
from . import plots
from .sections import Section, Table, by, combine, compare, fmt, mean, metric, pct
from .train import batch_indices, evaluate, subset

NAME = "ics"
TITLE = "Internal covariate shift and loss-landscape smoothness"
CLAIM = ("BN works by reducing internal covariate shift: BN networks see less shift of a "
         "layer's gradient when the layers before it update, and injecting shift after BN "
         "(noisy BN) makes training worse.")

VARIANTS = ("none", "bn", "noisy-bn")
LABELS = {"none": "no BN", "bn": "BN", "noisy-bn": "noisy BN"}
SERIES = ("ics_l2", "ics_cos", "loss_range", "grad_pred", "beta")

_BASE = {"hidden": 100, "depth": 4, "batch": 64, "lr": 0.1, "noise_shift": 1.0,
         "noise_scale": 2.0, "etas": [0.05, 0.1, 0.2, 0.4], "variants": list(VARIANTS)}
PROFILES = {
    "mini": {**_BASE, "hidden": 16, "depth": 3, "batch": 16, "steps": 20, "probe_every": 10,
             "test_subset": 64},
    "quick": {**_BASE, "steps": 400, "probe_every": 40, "test_subset": 2000},
    "full": {**_BASE, "depth": 6, "steps": 1500, "probe_every": 100, "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"norm": v} for v in cfg["variants"]]


class NoisyBN(nn.Module):
    """BN followed by y -> scale * y + shift, one (scale, shift) per unit drawn at each
    `resample()` from U(1, max_scale) and U(-max_shift, max_shift); in eval mode the noise's
    mean, y -> (1 + max_scale) / 2 * y.

    Example:
        >>> layer = NoisyBN(4, 1.0, 2.0, torch.Generator().manual_seed(0))
        >>> layer.resample(); layer(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    def __init__(self, features: int, max_shift: float, max_scale: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.bn, self.max_shift, self.max_scale = bnn.BatchNorm1d(features), max_shift, max_scale
        self.gen = generator
        self.scale, self.shift = torch.ones(features), torch.zeros(features)

    def resample(self) -> None:
        n = len(self.scale)
        self.scale = 1 + (self.max_scale - 1) * torch.rand(n, generator=self.gen)
        self.shift = self.max_shift * (2 * torch.rand(n, generator=self.gen) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.training:
            return y * self.scale + self.shift
        return y * ((1 + self.max_scale) / 2)


def make_model(cfg: dict, norm: str, seed: int, in_features: int = 784) -> nn.Sequential:
    """The MLP of variant `norm`; the same Linear weights for every variant."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    layers, width = [], in_features
    for _ in range(cfg["depth"]):
        layers.append(nn.Linear(width, cfg["hidden"], bias=norm == "none"))
        if norm == "bn":
            layers.append(bnn.BatchNorm1d(cfg["hidden"]))
        elif norm == "noisy-bn":
            layers.append(NoisyBN(cfg["hidden"], cfg["noise_shift"], cfg["noise_scale"], gen))
        layers.append(nn.ReLU())
        width = cfg["hidden"]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the hidden Linear layers, input side first (the head excluded)."""
    return [m.weight for m in model if isinstance(m, nn.Linear)][:-1]


def _grads(model: nn.Module, x, y) -> tuple[float, list[torch.Tensor]]:
    """(loss, gradients of all parameters) at the model's current parameters."""
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss.detach()), [g.detach() for g in grads]


def ics(model: nn.Module, x, y, lr: float) -> tuple[list[float], list[float]]:
    """Santurkar et al.'s ICS of every hidden layer l >= 2: (|G_l - G'_l| / |G_l|, cos) with
    G_l the gradient of the loss with respect to layer l's weight and G'_l the same after every
    parameter of the layers before l took the SGD step -lr * gradient. Runs on a copy."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    _, grads = _grads(m, x, y)
    index = {id(p): i for i, p in enumerate(params)}
    weights = linear_weights(m)
    l2, cos = [], []
    for w in weights[1:]:
        before = params[:index[id(w)]]  # parameters of the layers before layer l
        saved = [p.detach().clone() for p in before]
        with torch.no_grad():
            for p in before:
                p.sub_(lr * grads[index[id(p)]])
        _, new = _grads(m, x, y)
        with torch.no_grad():
            for p, s in zip(before, saved):
                p.copy_(s)
        g, g2 = grads[index[id(w)]].double().flatten(), new[index[id(w)]].double().flatten()
        l2.append(float((g - g2).norm() / g.norm().clamp_min(1e-30)))
        cos.append(float(F.cosine_similarity(g, g2, dim=0)))
    return l2, cos


def landscape(model: nn.Module, x, y, etas) -> dict:
    """Along the gradient g at the current parameters: the range of the loss over steps
    eta in etas (and 0), max |grad(theta) - grad(theta - eta g)| and that over |eta g|.
    Runs on a copy."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    loss0, g0 = _grads(m, x, y)
    saved = [p.detach().clone() for p in params]
    g_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g0))
    losses, diffs, betas = [loss0], [], []
    for eta in etas:
        with torch.no_grad():
            for p, s, g in zip(params, saved, g0):
                p.copy_(s - eta * g)
        loss, g1 = _grads(m, x, y)
        d = math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(g0, g1)))
        losses.append(loss)
        diffs.append(d)
        betas.append(d / max(eta * g_norm, 1e-30))
    return {"loss_range": max(losses) - min(losses), "grad_pred": max(diffs),
            "beta": max(betas)}


def _resample(model: nn.Module) -> None:
    for m in model:
        if isinstance(m, NoisyBN):
            m.resample()


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), None, cfg["test_subset"])
    x, y = data.x_train, data.y_train
    model = make_model(cfg, variant["norm"], seed, x.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    order = batch_indices(len(x), cfg["batch"], torch.Generator().manual_seed(seed))
    out: dict = {"steps": [], "acc": [], **{k: [] for k in SERIES}}
    model.train()
    with ctx.bar(cfg["steps"], LABELS[variant["norm"]]) as bar:
        for step in range(cfg["steps"] + 1):
            idx = next(order)
            _resample(model)
            if step % cfg["probe_every"] == 0:
                l2, cos = ics(model, x[idx], y[idx], cfg["lr"])
                land = landscape(model, x[idx], y[idx], cfg["etas"])
                out["steps"].append(step)
                out["acc"].append(evaluate(model, data.x_test, data.y_test))
                out["ics_l2"].append(sum(l2) / len(l2))
                out["ics_cos"].append(sum(cos) / len(cos))
                for k, v in land.items():
                    out[k].append(v)
            if step == cfg["steps"]:
                break
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            bar.advance()
    out["final_acc"] = out["acc"][-1]
    for k in SERIES:  # averages over the probes after initialization
        later = out[k][1:] or out[k]
        out[f"mean_{k}"] = sum(later) / len(later)
    return out


# ----------------------------------------------------------------------------- summary

def _m(groups, norm: str, name: str) -> list:
    return metric(groups.get((norm,), []), name)


def _smooth_text(groups) -> str:
    parts = []
    for key, what in (("loss_range", "loss range"), ("grad_pred", "gradient change"),
                      ("beta", "effective beta-smoothness")):
        bn, plain = _m(groups, "bn", f"mean_{key}"), _m(groups, "none", f"mean_{key}")
        parts.append(f"{what} {fmt(bn, digits=3)} with BN vs {fmt(plain, digits=3)} without "
                     f"(BN smoother: {compare(bn, plain, 'a < b')})")
    return ("Loss landscape along the gradient (Santurkar et al.'s alternative explanation; "
            "means over the probes after initialization, lower = smoother): "
            + "; ".join(parts) + ".")


def _figure(cfg, groups):
    fig, axes = plots.figure(3, 2, width=4.4, height=3.3)
    panels = (("acc", "test accuracy (eval: the noise's mean)", "%", 100, False),
              ("ics_cos", "ICS: cosine of G_l and G'_l (1 = no shift)", "cosine", 1, False),
              ("ics_l2", "ICS: |G_l - G'_l| / |G_l|", "relative l2", 1, True),
              ("loss_range", "loss range along the gradient", "loss", 1, True),
              ("grad_pred", "gradient change along the gradient", "l2", 1, True),
              ("beta", "effective beta-smoothness", "beta", 1, True))
    for ax, (key, title, unit, scale, log) in zip(axes, panels):
        for i, norm in enumerate(cfg["variants"]):
            recs = groups.get((norm,), [])
            if recs:
                plots.band(ax, recs[0]["metrics"]["steps"], metric(recs, key), LABELS[norm],
                           plots.COLORS[i], "--" if norm == "noisy-bn" else "-", scale)
        if log:
            ax.set_yscale("log")
        plots.finish(ax, title, "step", unit, legend=key == "acc")
    return fig


def _setup(cfg) -> str:
    return (f"A ReLU MLP with {cfg['depth']} hidden layers of {cfg['hidden']}, plain SGD lr "
            f"{cfg['lr']:g}, batch {cfg['batch']}, {cfg['steps']:,} steps; noisy BN scales each "
            f"unit by U(1, {cfg['noise_scale']:g}) and shifts it by U(-{cfg['noise_shift']:g}, "
            f"{cfg['noise_shift']:g}), redrawn every step. Probes every {cfg['probe_every']} "
            "steps; verdicts by two standard errors over seeds.")


def _train_text(acc_bn, acc_noisy, acc_plain, noise_hurts: str) -> str:
    text = (f"Training: final test accuracy BN {fmt(acc_bn, 100, unit='%')}, noisy BN "
            f"{fmt(acc_noisy, 100, unit='%')}, no BN {fmt(acc_plain, 100, unit='%')}. Noisy BN "
            f"worse than BN: {noise_hurts}.")
    if noise_hurts == "holds":
        return text + (" This contradicts Santurkar et al. 2018, whose noisy BN trained about "
                       "as well as BN (with their noise, on VGG and CIFAR-10).")
    return text + (" As Santurkar et al. 2018 found, a network whose layer inputs shift at "
                   "every step on purpose trains about as well as BN, which a covariate-shift "
                   "explanation does not predict.")


def _ics_text(groups, reduces: str) -> str:
    text = (f"ICS (mean over layers and probes after initialization): gradient cosine with BN "
            f"{fmt(_m(groups, 'bn', 'mean_ics_cos'), digits=3)}, without "
            f"{fmt(_m(groups, 'none', 'mean_ics_cos'), digits=3)}, noisy BN "
            f"{fmt(_m(groups, 'noisy-bn', 'mean_ics_cos'), digits=3)}; relative l2 change BN "
            f"{fmt(_m(groups, 'bn', 'mean_ics_l2'), digits=3)}, without "
            f"{fmt(_m(groups, 'none', 'mean_ics_l2'), digits=3)}. BN reduces ICS (higher cosine, "
            f"the decided check): {reduces}; smaller relative l2 change with BN: "
            f"{compare(_m(groups, 'bn', 'mean_ics_l2'), _m(groups, 'none', 'mean_ics_l2'), 'a < b')}.")
    if reduces == "holds":
        return text + (" This differs from Santurkar et al. 2018, who find that BN does not "
                       "reduce ICS measured this way.")
    return text + (" Santurkar et al. 2018 likewise find that BN does not reduce ICS measured "
                   "this way.")


VERDICT_TEXT = {
    "holds": "The claim holds in this run.",
    "does not hold": "The claim does NOT hold in this run: BN does not reduce ICS as measured "
                     "here, and injected shift does not hurt training.",
    "inconclusive": "This run cannot decide the claim: a difference is within the seed-to-seed "
                    "spread.",
    "mixed": "The claim holds only in part in this run (see the checks above).",
    "not run": "Not enough cells finished to decide."}


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "norm")
    acc_bn, acc_noisy, acc_plain = (_m(groups, n, "final_acc") for n in ("bn", "noisy-bn", "none"))
    cos_bn, cos_plain = _m(groups, "bn", "mean_ics_cos"), _m(groups, "none", "mean_ics_cos")
    reduces = compare(cos_bn, cos_plain, "a > b")
    noise_hurts = compare(acc_bn, acc_noisy, "a > b")
    verdict = combine([reduces, noise_hurts])
    text = [_setup(cfg), _train_text(acc_bn, acc_noisy, acc_plain, noise_hurts),
            _ics_text(groups, reduces), _smooth_text(groups), VERDICT_TEXT[verdict]
            + (" Neither check supports the claim beyond the spread."
               if verdict == "inconclusive" and "holds" not in (reduces, noise_hurts) else "")]
    rows = [[LABELS[n], fmt(_m(groups, n, "final_acc"), 100),
             *(fmt(_m(groups, n, f"mean_{k}"), digits=3) for k in SERIES)]
            for n in cfg["variants"] if (n,) in groups]
    headline = (f"test accuracy BN {pct(mean(acc_bn))}, noisy BN {pct(mean(acc_noisy))}, no BN "
                f"{pct(mean(acc_plain))}; ICS cosine BN {mean(cos_bn):.2f} vs "
                f"{mean(cos_plain):.2f}")
    return Section(NAME, TITLE, CLAIM, headline, verdict, text,
                   Table(["variant", "final acc %", "ICS l2", "ICS cos", "loss range",
                          "grad change", "beta"], rows), _figure(cfg, groups))
