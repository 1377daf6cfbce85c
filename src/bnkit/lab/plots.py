"""Plot helpers: matplotlib Figures built without pyplot (no global state, no display), lines
with a min-max band over seeds, and deterministic PNG output.
"""
from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f")


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A Figure with an (nrows, ncols) grid of axes; returns (fig, flat list of axes).

    Margins are fixed in inches (no layout engine: constrained layout was about half of the
    report's plotting time).
    """
    w, h = width * ncols, height * nrows
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    left, right, bottom, top, gap_w, gap_h = 0.75, 0.15, 0.6, 0.35, 0.85, 0.85  # inches
    axis_w = (w - left - right - (ncols - 1) * gap_w) / ncols
    axis_h = (h - bottom - top - (nrows - 1) * gap_h) / nrows
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=gap_w / axis_w, hspace=gap_h / axis_h)  # gaps: fractions of an axis
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def band(ax, x, series, label: str, color: str, style: str = "-", scale: float = 1.0) -> None:
    """Plot the mean of `series` (one list of y per seed, aligned with x) and shade min-max.

    Seeds with a shorter series (an interrupted cell) are cut to the common length.
    """
    series = [s for s in series if s]
    if not series:
        return
    n = min(len(s) for s in series)
    cols = [[scale * s[i] for s in series] for i in range(n)]
    mean = [math.fsum(c) / len(c) for c in cols]
    ax.plot(x[:n], mean, style, color=color, label=label, lw=1.6)
    if len(series) > 1:
        ax.fill_between(x[:n], [min(c) for c in cols], [max(c) for c in cols], color=color,
                        alpha=0.2, lw=0)


def points(ax, x, per_x, label: str, color: str, style: str = "o-", scale: float = 1.0):
    """Plot the mean over seeds at each x with min-max error bars; per_x[i] = values at x[i]."""
    keep = [(xi, [scale * v for v in vals]) for xi, vals in zip(x, per_x) if vals]
    if not keep:
        return
    xs = [k[0] for k in keep]
    mean = [math.fsum(v) / len(v) for _, v in keep]
    err = [[m - min(v) for m, (_, v) in zip(mean, keep)],
           [max(v) - m for m, (_, v) in zip(mean, keep)]]
    ax.errorbar(xs, mean, yerr=err, fmt=style, color=color, label=label, capsize=3, lw=1.4,
                ms=4)


def log_x(ax, values, base: float = 10) -> None:
    """Log-scaled x axis with one labelled tick per value (e.g. learning rates, k)."""
    ax.set_xscale("log", base=base)
    ax.set_xticks(list(values), [f"{v:g}" for v in values])
    ax.minorticks_off()


def finish(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """Title, labels, light grid and (if there are labelled artists) a legend."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def png_bytes(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes, without a timestamp (the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
