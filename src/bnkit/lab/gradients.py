"""Gradients: does BN cure vanishing and exploding gradients in deep networks?

Deep plain networks (no skip connections) of `depth` hidden layers [Linear or 3x3 conv ->
norm -> activation], ReLU or tanh, PyTorch's default initialization, in three variants:

* none:   no normalization (the layers keep their bias);
* bn:     bnkit BatchNorm after every hidden layer;
* bn_res: the same with residual connections, h <- h + act(bn(W h)) after the first layer.

Measured on the training batches: the Frobenius norm of the gradient of the loss with
respect to each hidden layer's weight, at initialization (step 0) and at later steps of
SGD with momentum, and the growth per layer towards the input, exp(-slope) of a least-squares
line through log(norm) against layer index (1 = no growth, > 1 explosion towards the input,
< 1 vanishing). Yang et al. 2019 (mean-field theory of BN) predict that BN without skip
connections makes gradients explode with depth at initialization, and that one optimization
step already shrinks the explosion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as bnn
from . import plots
from .sections import Section, Table, by, combine, compare, fmt, mean, metric
from .train import batch_indices

NAME = "gradients"
TITLE = "Vanishing and exploding gradients with depth"
CLAIM = ("BN cures vanishing and exploding gradients: with BN, the gradient norm changes "
         "less from layer to layer of a deep network than without BN.")

NORMS = ("none", "bn", "bn_res")
LABELS = {"none": "no BN", "bn": "BN", "bn_res": "BN + residual"}
ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh}

_BASE = {"width": 64, "batch": 64, "lr": 0.01, "momentum": 0.9, "acts": ["relu", "tanh"],
         "norms": list(NORMS), "cnn_width": 8, "cnn_pool": 4}
PROFILES = {
    "mini": {**_BASE, "width": 8, "cnn_width": 4, "batch": 16, "archs": ["mlp", "cnn"],
             "depths": [2, 4], "cnn_depths": [2], "steps": 2, "probe_steps": [0, 2],
             "train_subset": 64},
    "quick": {**_BASE, "archs": ["mlp", "cnn"], "depths": [4, 16, 64], "cnn_depths": [4, 16],
              "steps": 10, "probe_steps": [0, 1, 10], "train_subset": 10000},
    "full": {**_BASE, "width": 128, "archs": ["mlp", "cnn"], "depths": [4, 8, 16, 32, 64],
             "cnn_depths": [4, 8, 16, 32], "cnn_width": 16, "steps": 50,
             "probe_steps": [0, 1, 10, 50], "train_subset": None},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    out = []
    for arch in cfg["archs"]:
        depths = cfg["depths"] if arch == "mlp" else cfg["cnn_depths"]
        out += [{"arch": arch, "act": act, "norm": norm, "depth": d}
                for act in cfg["acts"] for norm in cfg["norms"] for d in depths]
    return out


# ----------------------------------------------------------------------------- model

class Layer(nn.Module):
    """One hidden layer: act(norm(W h)), plus h when `residual` (shapes permitting)."""

    def __init__(self, weight_layer: nn.Module, norm: nn.Module, act: nn.Module,
                 residual: bool) -> None:
        super().__init__()
        self.weight_layer, self.norm, self.act, self.residual = weight_layer, norm, act, residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm(self.weight_layer(h)))
        return h + out if self.residual else out


class DeepNet(nn.Module):
    """`depth` hidden Layers (MLP on flat pixels, or CNN on average-pooled images) and a
    linear head; `hidden` lists the layers whose weight gradients are measured.

    Shape: input (N, 784) flat pixels, output (N, classes).

    Example:
        >>> DeepNet("mlp", 3, 8, "relu", "bn_res")(torch.rand(4, 784)).shape
        torch.Size([4, 10])
    """

    def __init__(self, arch: str, depth: int, width: int, act: str, norm: str,
                 classes: int = 10, pool: int = 4, seed: int = 0) -> None:
        super().__init__()
        if arch not in ("mlp", "cnn") or norm not in NORMS or act not in ACTS:
            raise ValueError(f"DeepNet takes arch 'mlp' or 'cnn', act in {tuple(ACTS)} and norm "
                             f"in {NORMS} (got {arch!r}, {act!r}, {norm!r}); pass those names")
        torch.manual_seed(seed)
        self.arch, self.pool = arch, pool
        layers, c_in = [], 1 if arch == "cnn" else 784
        for i in range(depth):
            if arch == "mlp":
                w = nn.Linear(c_in, width, bias=norm == "none")
                n = bnn.BatchNorm1d(width) if norm != "none" else nn.Identity()
            else:
                w = nn.Conv2d(c_in, width, 3, padding=1, bias=norm == "none")
                n = bnn.BatchNorm2d(width) if norm != "none" else nn.Identity()
            layers.append(Layer(w, n, ACTS[act](), norm == "bn_res" and i > 0))
            c_in = width
        self.hidden = nn.ModuleList(layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "cnn":
            side = math.isqrt(x.shape[1])
            x = F.avg_pool2d(x.view(len(x), 1, side, side), self.pool)
        for layer in self.hidden:
            x = layer(x)
        if self.arch == "cnn":
            x = x.mean((2, 3))
        return self.head(x)


def layer_grad_norms(net: DeepNet) -> list[float]:
    """Frobenius norm of each hidden layer's weight gradient (after a backward pass)."""
    return [float(layer.weight_layer.weight.grad.double().norm()) for layer in net.hidden]


def log_growth(norms: list[float]) -> float:
    """Natural log of the gradient's growth per layer towards the input: minus the slope of
    the least-squares line through (l, log norm_l), l = 1..L; NaN with fewer than 2 layers or
    a zero or non-finite norm.

    Example:
        >>> round(math.exp(log_growth([8.0, 4.0, 2.0, 1.0])), 6)   # halves at each layer
        2.0
    """
    if len(norms) < 2 or not all(math.isfinite(v) and v > 0 for v in norms):
        return math.nan
    xs, ys = range(1, len(norms) + 1), [math.log(v) for v in norms]
    mx, my = sum(xs) / len(norms), sum(ys) / len(norms)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
             / sum((x - mx) ** 2 for x in xs))
    return -slope


# ----------------------------------------------------------------------------- cell

def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    """Train one deep net for cfg['steps'] steps; record per-layer gradient norms at the
    probe steps (0 = the gradient at initialization)."""
    data = ctx.data()
    x, y = data.x_train[:cfg["train_subset"]], data.y_train[:cfg["train_subset"]]
    cnn = variant["arch"] == "cnn"
    net = DeepNet(variant["arch"], variant["depth"], cfg["cnn_width"] if cnn else cfg["width"],
                  variant["act"], variant["norm"], pool=cfg["cnn_pool"], seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    order = batch_indices(len(x), cfg["batch"], torch.Generator().manual_seed(seed))
    probes, norms, losses = set(cfg["probe_steps"]), [], []
    desc = f"{variant['arch']} {variant['act']} {variant['norm']} depth {variant['depth']}"
    with ctx.bar(cfg["steps"] + 1, desc) as bar:
        for step in range(cfg["steps"] + 1):  # step s: the gradient after s updates
            idx = next(order)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            losses.append(float(loss.detach()))
            if step in probes:
                norms.append(layer_grad_norms(net))
            if step < cfg["steps"]:
                opt.step()
            bar.advance()
    return {"probe_steps": sorted(probes), "grad_norms": norms,
            "log_growth": [log_growth(n) for n in norms], "first_loss": losses[0],
            "last_loss": losses[-1]}


# ----------------------------------------------------------------------------- summary

def _growth(records, probe: int) -> list[float]:
    """exp(log growth) per seed at probe index `probe`."""
    return [math.exp(g) if g is not None and math.isfinite(g) else math.nan
            for g in (r["metrics"]["log_growth"][probe] for r in records)]


def _abs_log(records, probe: int) -> list[float]:
    return [abs(r["metrics"]["log_growth"][probe]) for r in records
            if r["metrics"]["log_growth"][probe] is not None]


def _ratio_first_last(records, probe: int) -> list[float]:
    """||grad layer 1|| / ||grad layer L|| per seed."""
    return [r["metrics"]["grad_norms"][probe][0] / r["metrics"]["grad_norms"][probe][-1]
            for r in records if r["metrics"]["grad_norms"][probe][-1] > 0]


def _checks(cfg, groups) -> tuple[list[str], list[str]]:
    """Per activation, at the deepest MLP, at init and after training: is BN's |log growth|
    smaller than without BN? Returns (verdicts, sentences)."""
    deepest, last = max(cfg["depths"]), len(cfg["probe_steps"]) - 1
    verdicts, text = [], []
    for act in cfg["acts"]:
        plain = groups.get(("mlp", act, "none", deepest), [])
        bn = groups.get(("mlp", act, "bn", deepest), [])
        res = groups.get(("mlp", act, "bn_res", deepest), [])
        if not plain or not bn:
            continue
        parts = []
        for probe, when in ((0, "at initialization"),
                            (last, f"after {cfg['probe_steps'][last]} steps")):
            v = compare(_abs_log(bn, probe), _abs_log(plain, probe), "a < b")
            verdicts.append(v)
            parts.append(f"{when}: growth per layer with BN {fmt(_growth(bn, probe), digits=3)}, "
                         f"without {fmt(_growth(plain, probe), digits=3)}"
                         + (f", BN + residual {fmt(_growth(res, probe), digits=3)}" if res else "")
                         + f" (BN closer to 1: {v})")
        text.append(f"{act}, MLP of depth {deepest}: " + "; ".join(parts) + ".")
    return verdicts, text


def _yang(cfg, groups) -> str:
    """Yang et al. 2019: BN without skips explodes with depth at initialization."""
    deepest = max(cfg["depths"])
    out = []
    for act in cfg["acts"]:
        bn = groups.get(("mlp", act, "bn", deepest), [])
        if not bn:
            continue
        explodes = compare(_growth(bn, 0), [1.0] * len(bn), "a > b")
        ratio = mean(_ratio_first_last(bn, 0))
        out.append(f"{act}: first-layer gradient {ratio:.3g}x the last layer's at depth "
                   f"{deepest}, explosion towards the input {explodes}")
    if not out:
        return ""
    agree = all("explosion towards the input holds" in s for s in out)
    return ("Yang et al. 2019 predict that BN without skip connections makes gradients explode "
            "with depth at initialization. Measured (growth > 1 beyond two standard errors): "
            + "; ".join(out) + ". " + (
                "This run agrees with the prediction, which qualifies the common claim: at "
                "initialization BN without skips does not keep the gradient constant, it turns "
                "the plain network's vanishing gradient into one that grows towards the input; "
                "residual connections keep the growth near 1, and a few training steps bring "
                "BN's growth back towards 1." if agree else
                "This run does not reproduce the predicted explosion for every activation."))


def _table(cfg, groups) -> Table:
    rows, last = [], len(cfg["probe_steps"]) - 1
    for (arch, act, norm, depth), recs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], NORMS.index(kv[0][2]), kv[0][3])):
        rows.append([arch, act, LABELS[norm], str(depth), fmt(_growth(recs, 0), digits=3),
                     fmt(_growth(recs, last), digits=3), fmt(_ratio_first_last(recs, 0), digits=3),
                     fmt(metric(recs, "first_loss"), digits=3),
                     fmt(metric(recs, "last_loss"), digits=3)])
    return Table(["arch", "act", "norm", "depth", "growth/layer init",
                  f"growth/layer step {cfg['probe_steps'][last]}", "|g1|/|gL| init",
                  "loss step 0", f"loss step {cfg['steps']}"], rows)


def _per_layer(ax, cfg, groups, act: str, probe: int) -> None:
    deepest = max(cfg["depths"])
    for i, norm in enumerate(cfg["norms"]):
        recs = groups.get(("mlp", act, norm, deepest), [])
        if recs:
            series = [r["metrics"]["grad_norms"][probe] for r in recs]
            plots.band(ax, list(range(1, deepest + 1)), series, LABELS[norm], plots.COLORS[i])
    ax.set_yscale("log")
    plots.finish(ax, f"MLP depth {deepest}, {act}: |dL/dW| per layer, step "
                     f"{cfg['probe_steps'][probe]}", "layer (1 = input side)", "gradient norm")


def _against_depth(ax, cfg, groups, probe: int) -> None:
    for i, norm in enumerate(cfg["norms"]):
        for arch, act, style in (("mlp", "relu", "o-"), ("mlp", "tanh", "s--"),
                                 ("cnn", "relu", "^:"), ("cnn", "tanh", "v:")):
            if arch not in cfg["archs"] or act not in cfg["acts"]:
                continue
            depths = cfg["depths"] if arch == "mlp" else cfg["cnn_depths"]
            plots.points(ax, depths, [_ratio_first_last(groups.get((arch, act, norm, d), []),
                                                        probe) for d in depths],
                         f"{LABELS[norm]}, {arch} {act}", plots.COLORS[i], style)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    plots.log_x(ax, sorted(set(cfg["depths"]) | set(cfg["cnn_depths"])), base=2)
    plots.finish(ax, f"|grad layer 1| / |grad last layer|, step {cfg['probe_steps'][probe]}",
                 "depth", "ratio (log)", legend=probe == 0)


def _figure(cfg, groups):
    fig, (a, b, c, d) = plots.figure(2, 2, width=5.5, height=4.0)
    acts = cfg["acts"] + cfg["acts"][:1]
    _per_layer(a, cfg, groups, acts[0], 0)
    _per_layer(b, cfg, groups, acts[1], 0)
    last = len(cfg["probe_steps"]) - 1
    _against_depth(c, cfg, groups, 0)
    _against_depth(d, cfg, groups, last)
    if c.get_legend() is not None:
        c.legend(fontsize=6, ncol=2)
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "arch", "act", "norm", "depth")
    verdicts, text = _checks(cfg, groups)
    verdict = combine(verdicts)
    intro = (f"Plain deep networks with PyTorch's default initialization, {cfg['width']} units "
             f"per MLP layer, SGD lr {cfg['lr']:g} with momentum {cfg['momentum']:g}, batch "
             f"{cfg['batch']}; gradient norms of each hidden layer's weight on the training "
             f"batch, and their growth per layer towards the input (1 = constant, > 1 "
             "explodes, < 1 vanishes; mean ± std over seeds). The claim is scored as: BN's "
             "growth is closer to 1 (smaller |log growth|) than without BN, beyond two standard "
             "errors, for each activation, at initialization and after training.")
    closing = {"holds": "The claim holds in this run.",
               "does not hold": "The claim does NOT hold in this run: BN's gradients are "
                                "further from constant than the plain network's.",
               "inconclusive": "This run cannot decide the claim: some differences are within "
                               "the seed-to-seed spread.",
               "mixed": "The claim holds only in part in this run (see the checks above): it "
                        "depends on the activation or on the time in training.",
               "not run": "Not enough cells finished to decide."}[verdict]
    paragraphs = [intro, *text, _yang(cfg, groups), closing]
    deepest = max(cfg["depths"])
    heads = []
    for norm in ("none", "bn"):
        recs = groups.get(("mlp", "relu", norm, deepest), [])
        if recs:
            heads.append(f"{LABELS[norm]} x{mean(_growth(recs, 0)):.2f}")
    headline = f"ReLU MLP depth {deepest}, gradient growth per layer at init: " + ", ".join(heads)
    return Section(NAME, TITLE, CLAIM, headline, verdict, [p for p in paragraphs if p],
                   _table(cfg, groups), _figure(cfg, groups))
