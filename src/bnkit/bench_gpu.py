"""GPU benchmark (`bnkit bench --device cuda`): the Triton backend against torch's own BN.

For each shape, dtype and layout it times the training forward, the backward, forward +
backward and the eval forward of `bnkit.functional.batch_norm` (backend 'triton'), of
`torch.nn.functional.batch_norm` (cuDNN) and of `torch.compile(F.batch_norm)`, and
BatchNormAct: bnkit's fused bn + relu against BN followed by the activation. Each time is
the median of interleaved runs timed with CUDA events; the device-to-device copy of a
tensor of the same size is timed in the same rounds, and each kernel is reported as a
percentage of that copy bandwidth, counting `PASSES` full-tensor passes per phase.

Example:
    >>> from bnkit.bench_gpu import format_table, make_row
    >>> row = make_row((4096, 4096), "float32", "nchw", "eval", "bnkit", ms=0.05,
    ...                torch_ms=0.06, nbytes=4096 * 4096 * 4, copy_ms=0.04)
    >>> print(format_table([row]))
    shape      dtype    layout  phase  variant  ms      x torch  GB/s  % copy
    4096x4096  float32  nchw    eval   bnkit    0.0500  1.20     2684  80.0
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = ((256, 64, 112, 112), (64, 256, 56, 56), (128, 512, 28, 28), (4096, 4096))
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")
PHASES = ("forward", "backward", "fwd+bwd", "eval")
VARIANTS = ("bnkit", "torch", "compile")
ACT_VARIANTS = ("bnkit bn+relu fused", "bnkit bn, relu", "torch bn, relu")
# full-tensor passes of a two-kernel BN (reads + writes of x-sized tensors):
# forward: stats read x, normalize reads x, writes y; eval: read x, write y;
# backward: reduce reads dy, x; elementwise reads dy, x, writes dx.
PASSES = {"forward": 3, "eval": 2, "backward": 5, "fwd+bwd": 8, "copy": 2}


def parse_shape(text: str) -> tuple[int, ...]:
    """'256x64x112x112' -> (256, 64, 112, 112)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"a shape is sizes joined by 'x' with at least N and C, all >= 1 "
                         f"(got {text!r}); write e.g. 64x256x56x56 or 4096x4096")
    return shape


def cases(shapes, dtypes, layouts) -> list[tuple[tuple[int, ...], str, str]]:
    """(shape, dtype, layout) to run; channels_last only exists for 4D shapes."""
    return [(s, d, lay) for s in shapes for d in dtypes for lay in layouts
            if lay == "nchw" or len(s) == 4]


def interleaved_medians(fns: dict[str, Callable], repeats: int,
                        timer: Callable[[Callable], float]) -> dict[str, float]:
    """Median time of each fn over `repeats` rounds; each round runs every fn once, in an
    order rotated by one per round so that drift (clocks, heat) hits all of them alike."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timer(fns[name]))
    return {n: statistics.median(v) for n, v in samples.items()}


def make_row(shape, dtype, layout, phase, variant, ms, torch_ms, nbytes, copy_ms) -> dict:
    """One table row: time, speed-up over torch, effective GB/s and % of the copy's GB/s."""
    gbps = PASSES.get(phase, 0) * nbytes / (ms * 1e6)
    copy_gbps = PASSES["copy"] * nbytes / (copy_ms * 1e6)
    return {"shape": "x".join(map(str, shape)), "dtype": dtype, "layout": layout,
            "phase": phase, "variant": variant, "ms": ms, "x_torch": torch_ms / ms,
            "gbps": gbps, "pct_copy": 100.0 * gbps / copy_gbps}


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of `make_row` rows."""
    head = ("shape", "dtype", "layout", "phase", "variant", "ms", "x torch", "GB/s", "% copy")
    body = [(r["shape"], r["dtype"], r["layout"], r["phase"], r["variant"], f"{r['ms']:.4f}",
             f"{r['x_torch']:.2f}", f"{r['gbps']:.3f}" if r["gbps"] < 10 else f"{r['gbps']:.0f}",
             f"{r['pct_copy']:.1f}") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [head, *body])


def check_gpu() -> None:
    """Raise a ValueError naming what is missing when the GPU bench cannot run here."""
    if not torch.cuda.is_available():
        raise ValueError(f"the GPU benchmark needs a CUDA device (torch {torch.__version__} "
                         "sees none: torch.cuda.is_available() is False); run it on a machine "
                         "with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    from .kernels import available_backends
    if "triton" not in available_backends():
        raise ValueError("the GPU benchmark needs the 'triton' backend (available here: "
                         f"{available_backends()}); install it with pip install 'bnkit[gpu]'")


def cuda_timer(inner: int = 1) -> Callable[[Callable], float]:
    """Timer in ms per call: CUDA events around `inner` back-to-back calls."""
    def timer(fn):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    return timer


def perf_timer(inner: int = 1) -> Callable[[Callable], float]:
    """Timer in ms per call from the host clock (CPU runs, and tests of the bench logic)."""
    def timer(fn):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner
    return timer


def add_gpu_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The GPU bench's options (shared by `bnkit bench --device cuda` and the script)."""
    parser.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")],
                        default=list(SHAPES), help="e.g. 64x256x56x56,4096x4096")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES))
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=25, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile variant")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser


def run_gpu_bench(args) -> list[dict]:
    """Run every case (see `add_gpu_arguments`) and return the table rows (`make_row`).

    Raises ValueError without CUDA or Triton. Writes `args.json` when given.
    """
    check_gpu()
    rows = []
    for shape, dtype, layout in cases(getattr(args, "shapes", SHAPES),
                                      getattr(args, "dtypes", DTYPES),
                                      getattr(args, "layouts", LAYOUTS)):
        rows += run_case(shape, getattr(torch, dtype), layout, args)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "passes": PASSES, "rows": rows}, f, indent=1)
    return rows


def main(argv=None) -> int:
    """Entry point of benchmarks/bench_gpu.py: prints the table, or the reason it cannot."""
    args = add_gpu_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = args.parse_args(argv)
    try:
        rows = run_gpu_bench(args)
    except ValueError as err:
        print(f"bench_gpu: {err}")
        return 2
    print(format_table(rows))
    return 0


# ---- one case: inputs, variants and phases ------------------------------------------------

def environment() -> dict:
    """Versions and device of the run (stored with the JSON rows)."""
    import triton

    from . import __version__
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "bnkit": __version__}


def _forward_fn(variant: str) -> Callable:
    """f(x, rm, rv, w, b, training) -> y for one variant."""
    import torch.nn.functional as F

    from .functional import batch_norm

    def bnkit_bn(x, rm, rv, w, b, t, act="identity"):
        return batch_norm(x, rm, rv, w, b, training=t, act=act)
    if variant == "compile":
        return torch.compile(F.batch_norm, dynamic=False)
    return {
        "bnkit": bnkit_bn,
        "torch": F.batch_norm,
        "bnkit bn+relu fused": lambda *a: bnkit_bn(*a, act="relu"),
        "bnkit bn, relu": lambda *a: F.relu(bnkit_bn(*a)),
        "torch bn, relu": lambda *a: F.relu(F.batch_norm(*a)),
    }[variant]


def _inputs(shape, dtype, layout, device) -> list[torch.Tensor]:
    """Random inputs: several when small, rotated, so that timings are not cache hits."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    n = min(8, max(1, math.ceil(256e6 / nbytes)))
    return [torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
            for _ in range(n)]


def _phase_fn(fwd: Callable, phase: str, xs, params, dys=None,
              wrap: Callable[[Callable], Callable] | None = None) -> Callable:
    """A no-argument callable running `phase` of `fwd` on the next input in turn.

    `dys` are the output gradients (random when None); `wrap(fn)` returns fn run under some
    setting (the CPU bench selects a bnkit backend with it), also while graphs are built.
    """
    wrap = wrap or (lambda fn: fn)
    w, b, rm, rv = params
    turn = itertools.cycle(range(len(xs)))
    if phase in ("forward", "eval"):
        def run():
            with torch.no_grad():
                fwd(xs[next(turn)], rm, rv, w, b, phase == "forward")
        return wrap(run)
    xr = [x.detach().requires_grad_() for x in xs]
    dys = dys if dys is not None else [torch.randn_like(x) for x in xs]
    if phase == "fwd+bwd":
        def run():
            i = next(turn)
            torch.autograd.grad(fwd(xr[i], rm, rv, w, b, True), (xr[i], w, b), dys[i])
        return wrap(run)
    wrap(lambda: None)()
    ys = [fwd(x, rm, rv, w, b, True) for x in xr]  # backward: graphs built once, untimed

    def run():
        i = next(turn)
        torch.autograd.grad(ys[i], (xr[i], w, b), dys[i], retain_graph=True)
    return wrap(run)


def _copy_fn(xs) -> Callable:
    """Device-to-device copy of an x-sized buffer (reads + writes 2 * nbytes)."""
    dst = torch.empty_like(xs[0])
    turn = itertools.cycle(xs)
    return lambda: dst.copy_(next(turn))


def _time_phase(phase, variants, xs, params, args, make_timer):
    """{variant: median ms} and the copy's, all measured in the same interleaved rounds."""
    fns = {v: _phase_fn(_forward_fn(v), phase, xs, params) for v in variants}
    fns["copy"] = _copy_fn(xs)
    for fn in fns.values():
        for _ in range(getattr(args, "warmup", 3)):
            fn()
    if xs[0].is_cuda:
        torch.cuda.synchronize()
    # enough back-to-back calls per sample to last about 0.5 ms (event resolution)
    inner = max(1, min(50, math.ceil(0.5 / max(make_timer(1)(fns["copy"]), 1e-3))))
    return interleaved_medians(fns, getattr(args, "repeats", 25), make_timer(inner))


def run_case(shape, dtype, layout, args, device="cuda", backend="triton",
             make_timer=cuda_timer) -> list[dict]:
    """Rows of one (shape, dtype, layout): every phase of the BN variants, then BN + relu.

    `device`, `backend` and `make_timer` exist so the logic can run on CPU (e.g. with the
    reference backend and `perf_timer`).
    """
    import bnkit

    xs = _inputs(shape, dtype, layout, device)
    c = shape[1]
    params = (torch.randn(c, device=device, requires_grad=True),
              torch.randn(c, device=device, requires_grad=True),
              torch.zeros(c, device=device), torch.ones(c, device=device))
    variants = [v for v in VARIANTS if v != "compile" or getattr(args, "compile", True)]
    nbytes = xs[0].numel() * xs[0].element_size()
    name = str(dtype).replace("torch.", "")
    groups = ([(p, variants, "torch") for p in PHASES]
              + [(p, ACT_VARIANTS, "torch bn, relu") for p in ("forward", "fwd+bwd")])
    rows, previous = [], bnkit.get_backend()
    bnkit.set_backend(backend)
    try:
        for phase, group, base in groups:
            t = _time_phase(phase, group, xs, params, args, make_timer)
            rows += [make_row(shape, name, layout, phase, v, t[v], t[base], nbytes, t["copy"])
                     for v in group]
    finally:
        bnkit.set_backend(previous)
    return rows
