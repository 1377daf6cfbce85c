"""Batch size: error against the normalization batch size, inside a fixed batch of 32.

Every model takes the same number of SGD steps on batches of 32; only the number of
examples each normalization layer sees changes (Wu & He 2018, Table 2; Ioffe 2017):

* bn:     bnkit BatchNorm2d, the batch of 32 fed as 32/k forward passes of k examples
          (gradients summed), as on k examples per device;
* ghost:  GhostBatchNorm(virtual_batch_size=k) in one forward pass of 32;
* renorm: BatchRenorm over micro-batches of k, with the paper's r_max/d_max ramp squeezed
          into the run;
* group:  torch GroupNorm, which uses no batch statistics (one run: it cannot depend on k).

The model is the lab's 2-conv CNN (`model: "cnn"`, the full profile), or the BN paper's
sigmoid MLP (`model: "mlp"`, the quick profile, with the norm layer before each sigmoid).
A CNN's BN pools each channel's statistics over the positions as well (2 x 14 x 14 values
at k=2 in the second block), so its small-batch penalty only shows after longer training
(the full profile's epoch); an MLP's BN over k=2 examples maps every feature to about
±1, so the penalty is large within the quick profile's few hundred steps.
"""
from __future__ import annotations

from .. import nn as bnn
from ..nn.registry import get_norm
from . import plots
from .models import make_cnn, make_mlp
from .sections import Section, Table, by, combine, decide, finite, fmt, mean, metric, paired, pct
from .train import TrainConfig, evaluate, fit, images, subset

NAME = "batch-size"
TITLE = "Error against the normalization batch size"
CLAIM = ("BN's error grows as its normalization batch shrinks (from 32 to 2 examples), "
         "GroupNorm does not depend on it, and BatchRenorm reduces BN's small-batch penalty.")

_BASE = {"model": "cnn", "widths": [16, 32], "hidden": 100, "depth": 3, "init_std": 0.1,
         "batch": 32, "lr": 0.05, "momentum": 0.9,
         "norm_batches": [2, 4, 8, 16, 32], "norms": ["bn", "ghost", "renorm", "group"],
         "group_groups": 4, "renorm": {"r_max": 3.0, "d_max": 5.0, "warmup": 0.1,
                                       "r_max_end": 0.6, "d_max_end": 0.4}}
PROFILES = {
    "mini": {**_BASE, "widths": [4, 8], "norm_batches": [2, 8], "batch": 8, "steps": 6,
             "train_subset": 128, "test_subset": 64},
    "quick": {**_BASE, "model": "mlp", "lr": 0.1, "steps": 200, "norm_batches": [2, 8, 32],
              "norms": ["bn", "renorm", "group"], "train_subset": None, "test_subset": 2000},
    "full": {**_BASE, "steps": 750, "norm_batches": [2, 8, 32], "train_subset": None,
             "test_subset": None},  # 0.4 epoch
}


_LAYERS = {"ghost": "GhostBatchNorm", "renorm": "BatchRenorm"}


def requires(cfg: dict) -> str | None:
    """The bnkit.nn layers the configured norms need, if any is missing."""

    missing = [_LAYERS[n] for n in cfg["norms"] if n in _LAYERS and not hasattr(bnn, _LAYERS[n])]
    return f"bnkit.nn has no {', '.join(missing)} yet" if missing else None


def cells(cfg: dict) -> list[dict]:
    out = []
    for norm in cfg["norms"]:
        sizes = [cfg["batch"]] if norm == "group" else [k for k in cfg["norm_batches"]
                                                         if k <= cfg["batch"]]
        out += [{"norm": norm, "norm_batch": k} for k in sizes]
    return out


def _norm_kw(cfg: dict, norm: str, k: int) -> tuple[dict, int | None]:
    """(norm-layer keyword arguments, micro-batch size for the training loop)."""
    if norm == "ghost":
        return {"virtual_batch_size": k}, None
    if norm == "group":
        return {"groups": cfg["group_groups"]}, None
    if norm == "renorm":
        from ..nn.renorm import renorm_schedule

        r, micro_steps = cfg["renorm"], cfg["steps"] * (cfg["batch"] // k)  # layer steps
        return renorm_schedule(int(r["warmup"] * micro_steps), r["r_max"],
                               int(r["r_max_end"] * micro_steps), r["d_max"],
                               int(r["d_max_end"] * micro_steps)), k
    return {}, k


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), cfg["train_subset"], cfg["test_subset"])
    norm, k = variant["norm"], variant["norm_batch"]
    kw, micro = _norm_kw(cfg, norm, k)
    model, view = _model(cfg, norm, kw, seed)
    with ctx.bar(cfg["steps"], f"{norm}, norm batch {k}") as bar:
        fit(model, view(data.x_train), data.y_train,
            TrainConfig(steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                        momentum=cfg["momentum"], micro=micro, seed=seed), bar=bar)
    acc = evaluate(model, view(data.x_test), data.y_test, 500)
    return {"test_acc": acc, "test_err": 1 - acc}


_MLP_NORMS = {"bn": "batchnorm1d", "ghost": "ghost", "renorm": "renorm"}  # get_norm names


def _model(cfg: dict, norm: str, kw: dict, seed: int):
    """(model, input view): the CNN on (N, 1, 28, 28) images, or the sigmoid MLP on flat
    pixels with `norm` before each sigmoid. The same seed gives the same weights for every
    norm."""
    if cfg["model"] == "cnn":
        return make_cnn(cfg["widths"], norm, seed=seed, **kw), images
    if norm == "group":
        def factory(c):
            return get_norm("groupnorm", c, num_groups=kw["groups"])
    else:
        def factory(c):
            return get_norm(_MLP_NORMS[norm], c, **kw)
    return make_mlp(True, cfg["hidden"], cfg["depth"], factory, init_std=cfg["init_std"],
                    seed=seed), lambda x: x


# ----------------------------------------------------------------------------- summary

def _err(groups, norm: str, k) -> float:
    return mean(metric(groups.get((norm, k), []), "test_err"))


def _check(groups, a: tuple, b: tuple, claim: str) -> tuple[str, str]:
    """Decide `claim` on the per-seed error differences a - b (the same seed gives every
    model the same convolution weights and batches, so the differences are paired)."""
    return decide(paired(groups.get(a, []), groups.get(b, []), "test_err"), claim, 100,
                  unit=" points")


def _what(cfg: dict) -> str:
    if cfg["model"] == "cnn":
        return f"CNN {'/'.join(map(str, cfg['widths']))} channels"
    return f"sigmoid MLP {cfg['depth']}x{cfg['hidden']}"


def _text(cfg, groups, checks) -> list[str]:
    small, big = min(cfg["norm_batches"]), cfg["batch"]
    bn_small, bn_big = _err(groups, "bn", small), _err(groups, "bn", big)
    out = [f"Model: {_what(cfg)}, {cfg['steps']:,} steps of batch {big}."
           + (" An MLP's BN over 2 examples maps every feature to about ±1, so its "
              "small-batch penalty is far larger than a CNN's, whose BN also pools over "
              "positions (the full profile uses the CNN)." if cfg["model"] == "mlp" else "")]
    if finite(bn_small, bn_big):  # both measured
        verdict, how = _check(groups, ("bn", small), ("bn", big), "a > b")
        checks.append(verdict)
        out.append(f"BN's test error went from {pct(bn_big)} with {big} examples per "
                   f"normalization to {pct(bn_small)} with {small}. The small-batch "
                   f"penalty: {verdict} (error at {small} minus at {big}: {how}).")
    gn = _err(groups, "group", big)
    if finite(gn, bn_small):
        verdict, how = _check(groups, ("group", big), ("bn", small), "a < b")
        checks.append(verdict)
        out.append(f"GroupNorm (no batch statistics): {pct(gn)}. Better than BN at {small} "
                   f"examples: {verdict} (GroupNorm minus BN: {how}).")
    brn = _err(groups, "renorm", small)
    if finite(brn, bn_small):
        verdict, how = _check(groups, ("renorm", small), ("bn", small), "a < b")
        checks.append(verdict)
        out.append(f"BatchRenorm at {small} examples: {pct(brn)} vs BN {pct(bn_small)}. "
                   f"Renormalization reduces the small-batch error: {verdict} (BatchRenorm "
                   f"minus BN: {how}).")
    ghost = _err(groups, "ghost", small)
    if finite(ghost):
        out.append(f"GhostBatchNorm at {small} examples (one forward pass, same training "
                   f"statistics as BN's micro-batches, different running statistics): "
                   f"{pct(ghost)}.")
    return out


def _figure(cfg, groups):
    fig, (ax,) = plots.figure(1, 1, width=6.0)
    sizes = cfg["norm_batches"]
    for i, norm in enumerate(n for n in cfg["norms"] if n != "group"):
        plots.points(ax, sizes, [metric(groups.get((norm, k), []), "test_err") for k in sizes],
                     norm, plots.COLORS[i], scale=100)
    gn = metric(groups.get(("group", cfg["batch"]), []), "test_err")
    if gn:
        ax.axhline(100 * mean(gn), color=plots.COLORS[3], ls="--", label="group (any k)")
    plots.log_x(ax, sizes, base=2)
    plots.finish(ax, f"{_what(cfg)}: test error after {cfg['steps']} steps of batch "
                     f"{cfg['batch']}",
                 "examples per normalization (k)", "error %")
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "norm", "norm_batch")
    checks: list[str] = []
    paragraphs = _text(cfg, groups, checks)
    norms = cfg["norms"]
    rows = [[str(k)] + [fmt(metric(groups.get((n, cfg["batch"] if n == "group" else k), []),
                                   "test_err"), 100) for n in norms]
            for k in cfg["norm_batches"]]
    small = min(cfg["norm_batches"])
    headline = (f"BN error {pct(_err(groups, 'bn', cfg['batch']))} at k={cfg['batch']} vs "
                f"{pct(_err(groups, 'bn', small))} at k={small}; GN "
                f"{pct(_err(groups, 'group', cfg['batch']))}")
    return Section(NAME, TITLE, CLAIM, headline, combine(checks), paragraphs,
                   Table(["k"] + [f"{n} error %" for n in norms], rows), _figure(cfg, groups))
