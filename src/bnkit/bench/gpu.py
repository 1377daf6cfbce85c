"""GPU benchmark (`bnkit bench --device cuda`): the Triton backend against torch's own BN.

For each shape, dtype and layout it times the training forward, the backward, forward +
backward and the eval forward of `bnkit.functional.batch_norm` (backend 'triton'), of
`torch.nn.functional.batch_norm` (cuDNN) and of `torch.compile(F.batch_norm)`, and
BatchNormAct: bnkit's fused bn + relu against BN followed by the activation. Each time is
the median of interleaved runs timed with CUDA events; the device-to-device copy of a
tensor of the same size is timed in the same rounds, and each kernel is reported as a
percentage of that copy bandwidth, counting `PASSES` full-tensor passes per phase.

Example:
    >>> from bnkit.bench.gpu import cases
    >>> cases([(8, 4, 2, 2), (8, 4)], ["float32"], ["nchw", "channels_last"])[-1]
    ((8, 4), 'float32', 'nchw')
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch

from .backends import available, restored_backend, use
from .phases import PASSES, PHASES, parse_shape, phase_fn
from .report import format_table, make_row
from .timing import copy_fns, cuda_timer, inner_calls, interleaved_medians, warm

SHAPES = ((256, 64, 112, 112), (64, 256, 56, 56), (128, 512, 28, 28), (4096, 4096))
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")
VARIANTS = ("bnkit", "torch", "compile")
ACT_VARIANTS = ("bnkit bn+relu fused", "bnkit bn, relu", "torch bn, relu")


def cases(shapes, dtypes, layouts) -> list[tuple[tuple[int, ...], str, str]]:
    """(shape, dtype, layout) to run; channels_last only exists for 4D shapes."""
    return [(s, d, lay) for s in shapes for d in dtypes for lay in layouts
            if lay == "nchw" or len(s) == 4]


def check_gpu() -> None:
    """Raise a ValueError naming what is missing when the GPU bench cannot run here."""
    if not torch.cuda.is_available():
        raise ValueError(f"the GPU benchmark needs a CUDA device (torch {torch.__version__} "
                         "sees none: torch.cuda.is_available() is False); run it on a machine "
                         "with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    if "triton" not in available():
        raise ValueError("the GPU benchmark needs the 'triton' backend (available here: "
                         f"{available()}); install it with pip install 'bnkit[gpu]'")


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

    from .. import __version__
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "bnkit": __version__}


def _forward_fn(variant: str) -> Callable:
    """f(x, rm, rv, w, b, training) -> y for one variant."""
    import torch.nn.functional as F

    from ..functional import batch_norm

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


def _time_phase(phase, variants, xs, params, args, make_timer):
    """{variant: median ms} and the copy's, all measured in the same interleaved rounds."""
    fns = {v: phase_fn(_forward_fn(v), phase, xs, params) for v in variants}
    fns["copy"] = copy_fns(xs)["copy_"]
    warm(fns, getattr(args, "warmup", 3))
    if xs[0].is_cuda:
        torch.cuda.synchronize()
    # enough back-to-back calls per sample to last about 0.5 ms (event resolution)
    inner = inner_calls(make_timer(1)(fns["copy"]), 0.5)
    return interleaved_medians(fns, getattr(args, "repeats", 25), make_timer(inner))


def run_case(shape, dtype, layout, args, device="cuda", backend="triton",
             make_timer=cuda_timer) -> list[dict]:
    """Rows of one (shape, dtype, layout): every phase of the BN variants, then BN + relu.

    `device`, `backend` and `make_timer` exist so the logic can run on CPU (e.g. with the
    reference backend and `timing.perf_timer`).
    """
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
    rows = []
    with restored_backend():
        use(backend)
        for phase, group, base in groups:
            t = _time_phase(phase, group, xs, params, args, make_timer)
            rows += [make_row(shape, name, layout, phase, v, t[v], t[base], nbytes, t["copy"])
                     for v in group]
    return rows
