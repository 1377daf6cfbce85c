"""Inspect the BN layers of a model on data: train/eval gap, dead channels, affine, inputs.

For each BN layer (each statistics row of a per-step layer) with running statistics
(mu_r, var_r) and population statistics of its inputs measured on the data (mu_p, var_p
unbiased, pooled over all batches as in `recalibrate`), per channel:

    mean gap   |mu_r - mu_p| / sqrt(var_p + eps)             (in units of the input's std)
    var ratio  ln((var_r + eps) / (var_p + eps))              (0 when they agree; the log of
                                                               the squared scale mismatch)
A channel is dead when |gamma| <= 1e-3 * max|gamma| over the layer (it is switched off), or
when var_p < eps (its input barely varies: the output is ~ beta whatever the input).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._run import check_run_args
from .recalibrate import Call, collect, running_views, unbiased
from .walk import bn_eps, bn_layers, check_initialized, has_running_stats

GAMMA_DEAD = 1e-3  # |gamma| <= GAMMA_DEAD * max|gamma| counts as a switched-off channel
QUANTILES = (0.15, 0.50, 0.85)


@dataclass
class LayerReport:
    """Numbers for one BN layer; None where they do not apply (no running statistics, no
    affine, no input seen)."""

    name: str
    kind: str
    num_features: int
    count: int  # input values per channel seen
    mean_gap_max: float | None = None
    mean_gap_mean: float | None = None
    var_log_ratio_max: float | None = None  # largest |ln ratio|
    var_log_ratio_mean: float | None = None  # signed mean: > 0 means running_var too large
    dead_gamma_share: float | None = None
    dead_var_share: float | None = None
    dead_share: float | None = None  # dead by either rule
    gamma_min: float | None = None
    gamma_median: float | None = None
    gamma_max: float | None = None
    beta_min: float | None = None
    beta_median: float | None = None
    beta_max: float | None = None
    input_p15: float | None = None
    input_p50: float | None = None
    input_p85: float | None = None


_COLUMNS = [("layer", "name"), ("type", "kind"), ("C", "num_features"),
            ("mean gap max", "mean_gap_max"), ("mean gap avg", "mean_gap_mean"),
            ("|ln var ratio| max", "var_log_ratio_max"), ("ln var ratio avg", "var_log_ratio_mean"),
            ("dead", "dead_share"), ("gamma min/med/max", ("gamma_min", "gamma_median",
                                                          "gamma_max")),
            ("beta min/med/max", ("beta_min", "beta_median", "beta_max")),
            ("input p15/p50/p85", ("input_p15", "input_p50", "input_p85"))]


class InspectReport:
    """The per-layer numbers of `inspect`, with markdown, dict and PNG views.

    `layers` is the list of LayerReport; `report[name]` finds one by name.
    """

    def __init__(self, layers: list[LayerReport], mode: str, num_batches: int):
        self.layers, self.mode, self.num_batches = layers, mode, num_batches

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no BN layer named {name!r} in this report; names: "
                       f"{[r.name for r in self.layers]}")

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        """{"mode", "num_batches", "layers": [one dict per layer]} (JSON-serialisable)."""
        return {"mode": self.mode, "num_batches": self.num_batches,
                "layers": [asdict(r) for r in self.layers]}

    def to_markdown(self) -> str:
        """A markdown (GFM) table, one row per layer; a `|` inside a cell is escaped as `\\|`."""
        rows = [_md_row(c for c, _ in _COLUMNS), "|" + "---|" * len(_COLUMNS)]
        rows += [_md_row(_cell(r, key) for _, key in _COLUMNS) for r in self.layers]
        return "\n".join(rows)

    def plot(self, path) -> str:
        """Write a PNG (matplotlib's Agg canvas, no global backend change); returns the path."""
        from .inspect_plot import plot_report

        return plot_report(self, path)

    def __repr__(self) -> str:
        return f"InspectReport({len(self.layers)} layers, mode={self.mode!r})\n" + \
            self.to_markdown()


def _md_row(cells) -> str:
    """One table row; pipes in the cells (a column title, a layer name) are escaped so that
    every row has as many cells as the delimiter row."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _cell(r: LayerReport, key) -> str:
    if isinstance(key, tuple):
        return "/".join(_fmt(getattr(r, k)) for k in key)
    return _fmt(getattr(r, key))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


class _Sampler:
    """A uniform random sample (without replacement) of at most `cap` input values per key:
    each value gets a random key and the `cap` smallest keys are kept. Exact below `cap`."""

    def __init__(self, cap: int, seed: int = 0):
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, call: Call) -> None:
        vals = _valid_values(call).detach()
        keep = torch.float64 if vals.dtype == torch.float64 else torch.float32  # exact values
        vals = vals.to(device="cpu", dtype=keep)
        keys = torch.rand(vals.numel(), generator=self.gen)
        if call.key in self.kept:
            old_v, old_k = self.kept[call.key]
            vals, keys = torch.cat([old_v, vals]), torch.cat([old_k, keys])
        if vals.numel() > self.cap:
            idx = torch.topk(keys, self.cap, largest=False).indices
            vals, keys = vals[idx], keys[idx]
        self.kept[call.key] = (vals, keys)

    def values(self, key: str) -> torch.Tensor | None:
        return self.kept[key][0] if key in self.kept else None


def _valid_values(call: Call) -> torch.Tensor:
    """All input values, or only those at valid (mask True) positions."""
    x = call.x
    if call.mask is None:
        return x.reshape(-1)
    axis = getattr(call.module, "axis", 1) % x.dim()
    m = call.mask if call.mask.dim() == x.dim() else call.mask.unsqueeze(axis)
    return x[m.expand_as(x)]


def inspect(model: nn.Module, data, *, num_batches: int | None = None,
            forward: Callable | None = None, mode: str = "eval", max_values: int = 1 << 18,
            progress: bool = False) -> InspectReport:
    """Measure, per BN layer, how its running statistics and parameters fit the data.

    Runs the model over the batches without gradients and records every BN input: its
    pooled per-channel statistics (as `recalibrate` computes them) and a sample of its
    values. See the module docstring for the mean gap, the log variance ratio and the dead
    channel rules. gamma and beta are summarized by min / median / max, the inputs by their
    15th / 50th / 85th percentiles over all channels (exact up to `max_values` values per
    layer; beyond, of a uniform random sample of that size, seeded). The model is unchanged.

    Args:
        model: a model with BN layers.
        data: iterable of batches (tensors or (input, target) tuples).
        num_batches: use only the first num_batches batches. Default None (all).
        forward: forward(model, batch) for other call conventions. Default None.
        mode: "eval" (default): the model runs as at inference, so the gap is what eval-mode
            BN assumes versus what it receives; "train": BN layers use batch statistics, as
            `recalibrate` measures them.
        max_values: values kept per layer for the percentiles. Default 262144.
        progress: tqdm progress bar. Default False.

    Returns: an InspectReport (`.layers`, `.to_markdown()`, `.to_dict()`, `.plot(path)`).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
        >>> report = inspect(net, [torch.randn(64, 4) for _ in range(2)])
        >>> report.layers[0].name
        '1'
    """
    check_run_args("inspect", model, data, num_batches, forward)
    if mode not in ("eval", "train"):
        raise ValueError(f"inspect: mode must be 'eval' or 'train' (got {mode!r}); 'eval' "
                         "measures what inference sees")
    if isinstance(max_values, bool) or not isinstance(max_values, int) or max_values < 1:
        raise ValueError(f"inspect: max_values must be a positive int (got {max_values!r}); "
                         "the default keeps 262144 values per layer")
    check_initialized(model, "inspect")
    layers = dict(bn_layers(model))
    sampler = _Sampler(max_values)
    col = collect(model, data, layers, train=mode == "train", num_batches=num_batches,
                  forward=forward, progress=progress, on_input=sampler, tool="inspect")
    reports = []
    for name, bn in layers.items():
        keys = [k for k, (n, _) in col.where.items() if n == name] or [name]
        for key in keys:
            row = col.where[key][1] if key in col.where else None
            reports.append(layer_report(key, bn, row, col.stats.get(key), sampler.values(key)))
    return InspectReport(reports, mode, col.batches)


def layer_report(key: str, bn: nn.Module, row, stats, values) -> LayerReport:
    """The numbers of one layer (or statistics row) from its pooled input statistics."""
    weight = _vec(getattr(bn, "weight", None))
    c = int(weight.numel()) if weight is not None else _num_features(bn)
    r = LayerReport(key, type(bn).__name__, c, int(stats.count) if stats is not None else 0)
    dead = torch.zeros(c, dtype=torch.bool)
    if weight is not None:
        r.gamma_min, r.gamma_median, r.gamma_max = _summary(weight)
        g_dead = weight.abs() <= GAMMA_DEAD * weight.abs().max()  # all dead if max is 0
        r.dead_gamma_share, dead = _share(g_dead), dead | g_dead.cpu()
    bias = _vec(getattr(bn, "bias", None))
    if bias is not None:
        r.beta_min, r.beta_median, r.beta_max = _summary(bias)
    if stats is None or float(stats.count) < 2:
        return r
    eps = bn_eps(bn)
    var_p = unbiased(stats)
    v_dead = (var_p < eps).cpu()
    r.dead_var_share, r.dead_share = _share(v_dead), _share(dead | v_dead)
    if has_running_stats(bn):
        rm, rv = (t.detach().to(torch.float64) for t in running_views(bn, row))
        gap = (rm - stats.mean).abs() / torch.sqrt(var_p + eps)
        ratio = torch.log((rv + eps) / (var_p + eps))
        r.mean_gap_max, r.mean_gap_mean = float(gap.max()), float(gap.mean())
        r.var_log_ratio_max, r.var_log_ratio_mean = float(ratio.abs().max()), float(ratio.mean())
    if values is not None and values.numel():
        q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
        r.input_p15, r.input_p50, r.input_p85 = (float(v) for v in q)
    return r


def _vec(t):
    return t.detach().to(torch.float64).cpu() if isinstance(t, torch.Tensor) else None


def _num_features(bn) -> int:
    n = getattr(bn, "num_features", None)
    return int(n) if n is not None else int(bn.running_mean.shape[-1])


def _summary(v: torch.Tensor) -> tuple[float, float, float]:
    """(min, median, max); the median interpolates between the two middle values."""
    q = torch.quantile(v, torch.tensor([0.0, 0.5, 1.0], dtype=v.dtype))
    return float(q[0]), float(q[1]), float(q[2])


def _share(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else math.nan
