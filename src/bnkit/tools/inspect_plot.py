"""The PNG view of an InspectReport: one panel per quantity, one x position per BN layer."""
from __future__ import annotations

import os


def _nan(v):
    return float("nan") if v is None else v


def plot_report(report, path) -> str:
    """Draw mean gap, log variance ratio, dead share and input percentiles per layer; save a
    PNG at `path` with matplotlib's Agg canvas (the global pyplot backend is not touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("InspectReport.plot needs matplotlib; install it with "
                          "`pip install bnkit[lab]` or `pip install matplotlib`") from err
    layers = report.layers
    xs = list(range(len(layers)))
    fig = Figure(figsize=(max(6.0, 0.35 * len(layers) + 3), 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True)
    panels = [("mean gap (std units)", ["mean_gap_max", "mean_gap_mean"]),
              ("ln(running var / data var)", ["var_log_ratio_max", "var_log_ratio_mean"]),
              ("dead channel share", ["dead_share", "dead_gamma_share", "dead_var_share"])]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(xs, [_nan(getattr(r, key)) for r in layers], marker="o", label=key)
        ax.set_title(title)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    ax = axes[3]
    lo, mid, hi = ([_nan(getattr(r, k)) for r in layers]
                   for k in ("input_p15", "input_p50", "input_p85"))
    ax.fill_between(xs, lo, hi, alpha=0.3, label="15th-85th percentile")
    ax.plot(xs, mid, marker="o", label="median")
    ax.set_title(f"BN inputs ({report.mode} mode)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_xticks(xs, [r.name for r in layers], rotation=60, ha="right", fontsize="small")
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path
