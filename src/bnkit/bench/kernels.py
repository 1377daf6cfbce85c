"""The CPU kernel table: bnkit's BN against torch's on tensors of a few standard shapes.

For each case (shape, layout; float32) it times the four phases (`phases.PHASES`) of
`bnkit.functional.batch_norm` on each available CPU backend, of
`torch.nn.functional.batch_norm` and of `torch.compile` of the BN formula
(`phases.formula_bn`), with `copy_` and `clone` of an x-sized tensor in the same rounds
(`timing.copy_fns`). Each kernel's effective bandwidth (the bytes a two-kernel BN must
move, `phases.PASSES` x-sized passes, over its time) is reported as a percentage of the
copy's (`report.make_row`).

Example:
    >>> from bnkit.bench.kernels import cases
    >>> cases("8x4x5x5")
    [((8, 4, 5, 5), 'nchw'), ((8, 4, 5, 5), 'nhwc')]
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import backends
from .phases import PHASES, formula_bn, parse_shape, phase_fn
from .report import make_row
from .timing import copy_fns, time_all

CASES = (((64, 64, 56, 56), "nchw"), ((64, 64, 56, 56), "nhwc"), ((32, 256, 14, 14), "nchw"),
         ((256, 1024), "nc"), ((8192, 256), "nc"))
CACHE_BYTES = 64 << 20  # rotate inputs up to 64 MiB (2x the L3 here) so small cases hit DRAM


def cases(spec: str | None) -> list[tuple[tuple[int, ...], str]]:
    """(shape, layout) pairs: the standard CASES, or each --shapes entry (4D/5D also NHWC)."""
    if spec is None:
        return list(CASES)
    out = []
    for shape in (parse_shape(s) for s in spec.split(",")):
        out.append((shape, "nc" if len(shape) == 2 else "nchw"))
        if len(shape) in (4, 5):
            out.append((shape, "nhwc"))
    return out


def variants(compile_: bool = True) -> dict[str, tuple[Callable, str | None]]:
    """{name: (fwd(x, rm, rv, w, b, training), bnkit backend or None)}."""
    from ..functional import batch_norm

    out = {f"bnkit {n}": (batch_norm, n) for n in backends.cpu_backends()}
    out["torch"] = (F.batch_norm, None)
    if compile_:
        out["compile"] = (torch.compile(formula_bn, dynamic=False), None)
    return out


def inputs(shape, layout):
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


def run_case(shape, layout, repeats, warmup, compile_=True) -> list[dict]:
    """Table rows (`report.make_row`) of every phase and variant of one case, plus the copies."""
    torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit reached
    xs, dys, params = inputs(shape, layout)
    nbytes = xs[0].numel() * xs[0].element_size()
    rows = []
    with backends.restored_backend():
        for phase in PHASES:
            fns = {name: phase_fn(fwd, phase, xs, params, dys=dys,
                                  wrap=lambda fn, be=be: backends.on(be, fn))
                   for name, (fwd, be) in variants(compile_).items()}
            fns.update(copy_fns(xs))
            t = time_all(fns, repeats, warmup)
            rows += [make_row(shape, "float32", layout, phase, v, t[v], t["torch"], nbytes,
                              t["copy_"]) for v in fns if v not in ("copy_", "clone")]
    rows += [make_row(shape, "float32", layout, "copy", v, t[v], t[v], nbytes, t["copy_"])
             for v in ("copy_", "clone")]
    return rows
