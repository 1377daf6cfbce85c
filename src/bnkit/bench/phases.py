"""What one timed call of a BN kernel table runs: the phases, their memory traffic, shapes.

Phases: `forward` = training forward (batch statistics, running-stat update, output) under
`no_grad`; `backward` = `torch.autograd.grad` of a graph built once; `fwd+bwd` = both;
`eval` = forward with the running statistics. `PASSES` counts the x-sized passes a
two-kernel BN must make in each (reads + writes), from which the tables derive GB/s.

Example:
    >>> import torch
    >>> from bnkit.bench.phases import formula_bn
    >>> x = torch.randn(8, 3, 4)
    >>> torch.allclose(formula_bn(x, None, None, None, None, True),
    ...                torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
    True
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

PHASES = ("forward", "backward", "fwd+bwd", "eval")
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


def phase_fn(fwd: Callable, phase: str, xs, params, dys=None,
             wrap: Callable[[Callable], Callable] | None = None) -> Callable:
    """A no-argument callable running `phase` of `fwd(x, rm, rv, w, b, training)` on the
    next input of `xs` in turn; `params` is (w, b, rm, rv).

    `dys` are the output gradients (random when None); `wrap(fn)` returns fn run under some
    setting (the CPU table selects a bnkit backend with it), also while graphs are built.
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
