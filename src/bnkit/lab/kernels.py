"""Kernels: the `bnkit bench` table (bnkit's BN on each CPU backend against
torch.nn.functional.batch_norm), run through `bnkit.bench`'s API in its quick mode.

Each cell is one case (shape, layout) of the bench, or the model training steps; times are
medians of interleaved rounds (every variant once per round), so a busy machine slows all
variants alike. The run uses the lab's thread count.
"""
from __future__ import annotations

from . import plots
from .sections import Section, Table, by, combine, compare, evidence, fmt, mean

NAME = "kernels"
USES_DATA = False  # synthetic tensors: runs without Fashion-MNIST
TITLE = "BN kernels against torch (bnkit bench)"
CLAIM = ("bnkit's fastest CPU backend runs the BN training step (forward + backward) at least "
         "as fast as torch.nn.functional.batch_norm.")

_BASE = {"compile": False, "warmup": 2, "models": True}
PROFILES = {
    "mini": {**_BASE, "cases": [[[64, 8, 4, 4], "nchw"], [[256, 32], "nc"]], "repeats": 2,
             "models": False},
    "quick": {**_BASE, "cases": [[[32, 64, 28, 28], "nchw"], [[8192, 256], "nc"]],
              "repeats": 3},
    "full": {**_BASE, "cases": [[[64, 64, 56, 56], "nchw"], [[64, 64, 56, 56], "nhwc"],
                                [[32, 256, 14, 14], "nchw"], [[256, 1024], "nc"],
                                [[8192, 256], "nc"]], "repeats": 5},
}


def requires(cfg: dict) -> str | None:
    try:
        from .. import bench
    except ImportError as exc:
        return f"bnkit.bench is not available ({exc})"
    return None if hasattr(bench, "run_case") else "bnkit.bench has no run_case"


def cells(cfg: dict) -> list[dict]:
    out = [{"shape": "x".join(map(str, shape)), "layout": layout}
           for shape, layout in cfg["cases"]]
    return out + ([{"shape": "models", "layout": "-"}] if cfg["models"] else [])


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    from .. import bench

    if variant["shape"] == "models":
        return {"models": bench.run_models(cfg["repeats"], cfg["warmup"])}
    shape = tuple(int(s) for s in variant["shape"].split("x"))
    return {"rows": bench.run_case(shape, variant["layout"], cfg["repeats"], cfg["warmup"],
                                   cfg["compile"])}


def _speedups(groups) -> dict[tuple, dict[str, list[float]]]:
    """{(case, phase): {variant: [x torch per seed]}} for bnkit variants."""
    out: dict[tuple, dict[str, list[float]]] = {}
    for (shape, layout), recs in groups.items():
        for rec in recs:
            for row in rec["metrics"].get("rows", []):
                if row["variant"].startswith("bnkit"):
                    out.setdefault((f"{shape} {layout}", row["phase"]), {}).setdefault(
                        row["variant"], []).append(row["x_torch"])
    return out


def _model_rows(groups) -> list[list[str]]:
    per: dict[tuple, list[float]] = {}
    for rec in groups.get(("models", "-"), []):
        for row in rec["metrics"]["models"]:
            per.setdefault((row["model"], row["variant"]), []).append(row["ms"])
    return [[m, v, fmt(ms, digits=3)] for (m, v), ms in per.items()]


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "shape", "layout")
    sp = _speedups(groups)
    rows = [[case, phase, var, fmt(vals, digits=2)] for (case, phase), d in sp.items()
            for var, vals in d.items()]
    checks, paragraphs = [], []
    for (case, phase), d in sp.items():
        if phase == "fwd+bwd":
            best = max(d, key=lambda v: mean(d[v]))
            checks.append(compare(d[best], 1.0, "a > b"))
            paragraphs.append(f"{case}, training forward + backward: fastest bnkit variant "
                              f"'{best}' at {mean(d[best]):.2f}x torch's speed; faster than "
                              f"torch: {checks[-1]} (speed ratio minus 1: "
                              f"{evidence(d[best], 1.0, digits=2)}).")
    models = _model_rows(groups)
    if models:
        paragraphs.append("Training step of two small models (ms per step, bnkit layers on each "
                          "backend vs torch.nn): " + "; ".join(f"{m} {v}: {ms}"
                                                               for m, v, ms in models) + ".")
    fig, (ax,) = plots.figure(1, 1, width=max(6.0, 1.1 * len(sp)))
    labels = [f"{c}\n{p}" for c, p in sp]
    variants = sorted({v for d in sp.values() for v in d})
    for i, v in enumerate(variants):
        xs = [j + 0.8 * (i + 0.5) / len(variants) - 0.4 for j in range(len(labels))]
        ax.bar(xs, [mean(d.get(v, [])) for d in sp.values()], 0.8 / len(variants), label=v,
               color=plots.COLORS[i])
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(list(range(len(labels))), labels, fontsize=6.5)
    plots.finish(ax, "speed relative to torch.nn.functional.batch_norm (higher is faster)", "",
                 "x torch")
    best_all = max((mean(d[v]) for (c, p), d in sp.items() if p == "fwd+bwd" for v in d),
                   default=float("nan"))
    return Section(NAME, TITLE, CLAIM, f"best bnkit fwd+bwd: {best_all:.2f}x torch",
                   combine(checks), paragraphs,
                   Table(["case", "phase", "variant", "x torch"], rows), fig)
