"""Benchmark bnkit's BN against torch's on this machine (CPU; --device cuda for the GPU).

For each case (shape, layout; float32) it times four phases: the training forward, the
backward, forward + backward and the eval forward, of `bnkit.functional.batch_norm` on each
available CPU backend, of `torch.nn.functional.batch_norm` and of `torch.compile` of the BN
formula. Every time is the median of interleaved rounds (each round runs every variant once,
in rotated order), so load from other processes hits all variants alike. The copy of an
x-sized tensor (`copy_` into a preallocated one) runs in the same rounds; each kernel's
effective bandwidth (the bytes a two-kernel BN must move, `PASSES` x-sized passes, over its
time) is reported as a percentage of that copy's. Then a training step of two small models
(the BN paper's sigmoid MLP and a 2-conv CNN) with bnkit's layers against torch's.

Example:
    $ bnkit bench --quick --threads 2 --json bench.json
    >>> from bnkit.bench import formula_bn
    >>> x = torch.randn(8, 3, 4)
    >>> torch.allclose(formula_bn(x, None, None, None, None, True),
    ...                torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
    True
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .argtypes import check_threads
from .bench_gpu import PASSES, format_table, interleaved_medians, make_row, parse_shape, perf_timer
from .bench_gpu import _phase_fn as gpu_phase_fn

CASES = (((64, 64, 56, 56), "nchw"), ((64, 64, 56, 56), "nhwc"), ((32, 256, 14, 14), "nchw"),
         ((256, 1024), "nc"), ((8192, 256), "nc"))
PHASES = ("forward", "backward", "fwd+bwd", "eval")
CACHE_BYTES = 64 << 20  # rotate inputs up to 64 MiB (2x the L3 here) so small cases hit DRAM
SAMPLE_MS = 3.0  # repeat fast calls within one timing sample up to about this long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bnkit bench` (CPU unless --device cuda, which runs bnkit.bench_gpu)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and numba) threads; default: torch's current setting")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--shapes", default=None,
                        help="e.g. 64x64x56x56,8192x256 (default: the five standard cases)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile variant")
    parser.add_argument("--no-models", dest="models", action="store_false",
                        help="skip the MLP / CNN training-step comparison")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results")


def main(args: argparse.Namespace) -> int:
    """Run the bench described by `args` (see `add_arguments`), print it, return 0."""
    if args.device == "cuda":
        return _run_gpu(args)
    repeats = _check_args(args)
    env = environment()
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    rows = []
    for shape, layout in _cases(args.shapes):
        rows += run_case(shape, layout, repeats, args.warmup, args.compile)
    print(format_table(rows), flush=True)
    models = run_models(repeats, args.warmup) if args.models else []
    if models:
        print(format_models(models))
    env["load_after"] = _load()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "passes": PASSES, "rows": rows, "models": models}, f,
                      indent=1)
    return 0


def _check_args(args) -> int:
    """Validate the numbers, apply --threads; returns the number of rounds."""
    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads))
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    if repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0 (got {repeats} and "
                         f"{args.warmup}); pass e.g. --repeats 15 --warmup 2")
    return repeats


def _run_gpu(args) -> int:
    """`--device cuda`: the GPU bench of bnkit.bench_gpu with the options given here."""
    from . import bench_gpu

    ns = argparse.Namespace(json=args.json, warmup=args.warmup, compile=args.compile)
    if args.repeats is not None or args.quick:
        ns.repeats = args.repeats or 5
    if args.shapes:
        ns.shapes = [parse_shape(s) for s in args.shapes.split(",")]
    print(bench_gpu.format_table(bench_gpu.run_gpu_bench(ns)))
    return 0


def _cases(spec: str | None) -> list[tuple[tuple[int, ...], str]]:
    """(shape, layout) pairs: the standard CASES, or each --shapes entry (4D/5D also NHWC)."""
    if spec is None:
        return list(CASES)
    out = []
    for shape in (parse_shape(s) for s in spec.split(",")):
        out.append((shape, "nc" if len(shape) == 2 else "nchw"))
        if len(shape) in (4, 5):
            out.append((shape, "nhwc"))
    return out


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def environment() -> dict:
    """The machine and software the numbers come from (printed and stored in the JSON)."""
    from . import __version__, kernels

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "torch": torch.__version__, "bnkit": __version__,
            "torch huge pages": _torch_huge_pages(),
            "backends": kernels.backend_status(), "load_before": _load()}


def _torch_huge_pages() -> str:
    """Whether torch's CPU allocator asks for huge pages (THP_MEM_ALLOC_ENABLE=1). Large
    fresh outputs cost 3-4x less with them, for torch and bnkit alike; bnkit advises huge
    pages on its own large outputs either way, so the ratios on large shapes depend on it
    (docs/performance.md)."""
    return "on (THP_MEM_ALLOC_ENABLE=1)" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" \
        else "off (set THP_MEM_ALLOC_ENABLE=1 to compare against torch with them)"


# ---- variants and phases -------------------------------------------------------------------

def formula_bn(x, rm, rv, w, b, training, momentum=0.1, eps=1e-5):
    """BN written as plain torch ops (what torch.compile fuses); no running-stat update.

    y = (x - mean) / sqrt(var + eps) * w + b over every dim but 1."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    else:
        mean, var = rm.view(shape), rv.view(shape)
    y = (x - mean) * torch.rsqrt(var + eps)
    return y if w is None else y * w.view(shape) + b.view(shape)


def cpu_backends() -> list[str]:
    """The available backends that run CPU tensors, slowest first."""
    from .kernels import available_backends

    return [n for n in available_backends() if n != "triton"]


def variants(compile_: bool = True) -> dict[str, tuple[Callable, str | None]]:
    """{name: (fwd(x, rm, rv, w, b, training), bnkit backend or None)}."""
    from .functional import batch_norm

    out = {f"bnkit {n}": (batch_norm, n) for n in cpu_backends()}
    out["torch"] = (F.batch_norm, None)
    if compile_:
        out["compile"] = (torch.compile(formula_bn, dynamic=False), None)
    return out


def _inputs(shape, layout):
    """Rotated inputs x (and dy) totalling >= CACHE_BYTES, and (w, b, rm, rv)."""
    nbytes = math.prod(shape) * 4
    n = max(1, min(16, math.ceil(CACHE_BYTES / nbytes)))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    xs = [torch.randn(shape).contiguous(memory_format=fmt) for _ in range(n)]
    dys = [torch.randn_like(x) for x in xs]
    c = shape[1]
    params = (torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True),
              torch.zeros(c), torch.ones(c))
    return xs, dys, params


def _phase_fn(fwd, backend, phase, xs, dys, params) -> Callable:
    """`bench_gpu._phase_fn` with bnkit's `backend` selected around every call."""
    return gpu_phase_fn(fwd, phase, xs, params, dys=dys, wrap=lambda fn: _on(backend, fn))


def _on(backend: str | None, fn: Callable) -> Callable:
    """fn run with bnkit's `backend` selected (the backward also asks for it), or as is."""
    if backend is None:
        return fn
    from .kernels import set_backend

    def run():
        set_backend(backend)
        return fn()
    return run


def time_all(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, float]:
    """{name: median ms} over interleaved rounds, after `warmup` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    fastest = min(perf_timer(1)(fn) for fn in fns.values())
    inner = max(1, min(50, math.ceil(SAMPLE_MS / max(fastest, 1e-3))))
    return interleaved_medians(fns, repeats, perf_timer(inner))


def run_case(shape, layout, repeats, warmup, compile_=True) -> list[dict]:
    """Table rows (`make_row`) of every phase and variant of one case, plus the copies."""
    from .kernels import get_backend, set_backend

    torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit reached
    xs, dys, params = _inputs(shape, layout)
    nbytes = xs[0].numel() * xs[0].element_size()
    rows, previous = [], get_backend()
    try:
        for phase in PHASES:
            fns = {name: _phase_fn(fwd, be, phase, xs, dys, params)
                   for name, (fwd, be) in variants(compile_).items()}
            fns.update(_copy_fns(xs))
            t = time_all(fns, repeats, warmup)
            rows += [make_row(shape, "float32", layout, phase, v, t[v], t["torch"], nbytes,
                              t["copy_"]) for v in fns if v not in ("copy_", "clone")]
    finally:
        set_backend(previous)
    rows += [make_row(shape, "float32", layout, "copy", v, t[v], t[v], nbytes, t["copy_"])
             for v in ("copy_", "clone")]
    return rows


def _copy_fns(xs) -> dict[str, Callable]:
    """copy_ into a preallocated buffer (DRAM bandwidth) and clone (plus a fresh allocation)."""
    dst = torch.empty_like(xs[0])
    turn = itertools.cycle(xs)
    return {"copy_": lambda: dst.copy_(next(turn)), "clone": lambda: next(turn).clone()}


# ---- model training steps ------------------------------------------------------------------

def mlp(bn1d) -> torch.nn.Module:
    """The BN paper's MNIST net: 784-100-100-100-10, sigmoid, BN before each sigmoid."""
    layers, width = [], 784
    for _ in range(3):
        layers += [torch.nn.Linear(width, 100), bn1d(100), torch.nn.Sigmoid()]
        width = 100
    return torch.nn.Sequential(*layers, torch.nn.Linear(100, 10))


def cnn(bn2d) -> torch.nn.Module:
    """Two 3x3 convs (16, 32 channels) each with BN, relu and 2x2 max-pool, then a linear."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), bn2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), bn2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def _step_fn(model, x, y) -> Callable:
    """One SGD training step: forward, cross-entropy, backward, update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def run_models(repeats: int, warmup: int) -> list[dict]:
    """ms per training step of the MLP (batch 60) and the CNN (batch 32, 28x28) with
    torch.nn BN layers and with bnkit.nn's on every CPU backend and 'auto'."""
    from . import nn as bnn
    from .kernels import get_backend, set_backend

    specs = {"mlp": (mlp, "BatchNorm1d", (60, 784)), "cnn": (cnn, "BatchNorm2d", (32, 1, 28, 28))}
    rows, previous = [], get_backend()
    try:
        for name, (build, layer, shape) in specs.items():
            x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
            fns = {"torch": _step_fn(build(getattr(torch.nn, layer)), x, y)}
            for be in ["auto", *cpu_backends()]:
                fns[f"bnkit {be}"] = _on(be, _step_fn(build(getattr(bnn, layer)), x, y))
            if "cpu" in cpu_backends():  # the same kernels through the Python Function
                fns["bnkit cpu, py op"] = _python_op(_step_fn(build(getattr(bnn, layer)), x, y))
            t = time_all(fns, repeats, warmup + 3)
            rows += [{"model": name, "variant": v, "ms": t[v], "x_torch": t["torch"] / t[v]}
                     for v in fns]
    finally:
        set_backend(previous)
    return rows


def _python_op(fn: Callable) -> Callable:
    """fn on the 'cpu' backend with the native C++ node off (the autograd.Function path)."""
    from .kernels import set_backend, use_native

    def run():
        set_backend("cpu")
        use_native(False)
        try:
            return fn()
        finally:
            use_native(True)
    return run


def format_models(rows: list[dict]) -> str:
    """Text table of `run_models` rows."""
    lines = [f"{'model':6s} {'variant':16s} {'ms/step':>9s} {'x torch':>8s}"]
    lines += [f"{r['model']:6s} {r['variant']:16s} {r['ms']:9.3f} {r['x_torch']:8.2f}"
              for r in rows]
    return "\n".join(lines)
