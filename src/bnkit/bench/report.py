"""Rows and text tables of the benchmarks (what `bnkit bench` prints and stores as JSON).

Every ratio is `x torch` = torch's time / the variant's time, both from the same
interleaved rounds: above 1 the variant is faster than torch.

Example:
    >>> from bnkit.bench.report import format_table, make_row
    >>> row = make_row((4096, 4096), "float32", "nchw", "eval", "bnkit", ms=0.05,
    ...                torch_ms=0.06, nbytes=4096 * 4096 * 4, copy_ms=0.04)
    >>> print(format_table([row]))
    shape      dtype    layout  phase  variant  ms      x torch  GB/s  % copy
    4096x4096  float32  nchw    eval   bnkit    0.0500  1.20     2684  80.0
"""
from __future__ import annotations

from .phases import PASSES


def make_row(shape, dtype, layout, phase, variant, ms, torch_ms, nbytes, copy_ms) -> dict:
    """One kernel-table row: time, speed-up over torch, effective GB/s and % of the copy's."""
    gbps = PASSES.get(phase, 0) * nbytes / (ms * 1e6)
    copy_gbps = PASSES["copy"] * nbytes / (copy_ms * 1e6)
    return {"shape": "x".join(map(str, shape)), "dtype": dtype, "layout": layout,
            "phase": phase, "variant": variant, "ms": ms, "x_torch": torch_ms / ms,
            "gbps": gbps, "pct_copy": 100.0 * gbps / copy_gbps}


def columns(head: tuple[str, ...], body: list[tuple]) -> str:
    """Left-aligned fixed-width text table, two spaces between columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [head, *body])


def format_table(rows: list[dict]) -> str:
    """Text table of `make_row` rows."""
    head = ("shape", "dtype", "layout", "phase", "variant", "ms", "x torch", "GB/s", "% copy")
    body = [(r["shape"], r["dtype"], r["layout"], r["phase"], r["variant"], f"{r['ms']:.4f}",
             f"{r['x_torch']:.2f}", f"{r['gbps']:.3f}" if r["gbps"] < 10 else f"{r['gbps']:.0f}",
             f"{r['pct_copy']:.1f}") for r in rows]
    return columns(head, body)


def format_models(rows: list[dict]) -> str:
    """Text table of `run_models` rows (the small MLP / CNN training steps)."""
    lines = [f"{'model':6s} {'variant':16s} {'ms/step':>9s} {'x torch':>8s}"]
    lines += [f"{r['model']:6s} {r['variant']:16s} {r['ms']:9.3f} {r['x_torch']:8.2f}"
              for r in rows]
    return "\n".join(lines)


def format_vision_models(rows: list[dict]) -> str:
    """Text table of `run_vision_models` rows: torch BN against bnkit BN per model and phase."""
    head = ("model", "input", "phase", "torch ms", "bnkit ms", "x torch")
    body = [(r["model"], r["input"], r["phase"], f"{r['torch_ms']:.1f}", f"{r['bnkit_ms']:.1f}",
             f"{r['x_torch']:.2f}") for r in rows]
    return columns(head, body)


def format_first_call(result: dict) -> str:
    """Lines of a `first_call` result (or the reason it has no times)."""
    if "error" in result:
        return f"first call (fresh process, empty HOME): {result['error']}"
    return (f"first call (fresh process, empty HOME), backend {result['backend']}:\n"
            f"  import torch {result['import_torch_ms']:.0f} ms, import bnkit after it "
            f"{result['import_bnkit_ms']:.0f} ms\n"
            f"  first BatchNorm2d{tuple(result['shape'])} forward+backward "
            f"{result['first_call_ms']:.1f} ms, second {result['second_call_ms']:.1f} ms")


def format_fold(results: list[dict]) -> str:
    """Text table of `bench_fold` results (one per BN kind)."""
    head = ("BN", "folded", "unfolded ms", "folded ms", "speed-up", "max rel diff")
    body = [(r["norm"], f"{r['folded_pairs']}/{r['bn_layers']}", f"{r['unfolded_ms']:.2f}",
             f"{r['folded_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['max_rel_diff']:.2e}")
            for r in results]
    return columns(head, body)
