"""torch.compile(fullgraph=True) of a model with bnkit.nn.BatchNorm2d matches eager mode.

The core runs as opaque torch.library custom ops and the running-stat update is plain
in-place torch code, so the whole model compiles without graph breaks. `aot_eager` checks
the tracing and functionalization quickly; `inductor` (the default backend, which compiles
C++ and takes ~30-40 s on two cores) is marked slow.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit.nn as bnn


def small_model(norm=lambda c: bnn.BatchNorm2d(c)):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_state_close(a, b, atol, rtol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=rtol, msg=k)


def run_against_eager(backend, atol, rtol, norm=lambda c: bnn.BatchNorm2d(c)):
    torch._dynamo.reset()
    eager = small_model(norm)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # two steps: the second reads the running stats the first wrote
        x = torch.randn(4, 3, 6, 6, generator=g) * (step + 1) + step
        for m in (eager, compiled_model):
            m.zero_grad(set_to_none=True)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, atol=atol, rtol=rtol)
        (ye ** 2).sum().backward()
        (yc ** 2).sum().backward()
        ge, gc = grads(eager), grads(compiled_model)
        for k in ge:
            torch.testing.assert_close(gc[k], ge[k], atol=atol, rtol=rtol, msg=k)
        assert_state_close(compiled_model, eager, atol, rtol)
    assert int(compiled_model[1].num_batches_tracked) == 2
    assert not torch.equal(compiled_model[1].running_mean, torch.zeros(4))
    eager.eval()
    compiled_model.eval()
    x = torch.randn(4, 3, 6, 6, generator=g) + 2
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=atol, rtol=rtol)
    assert_state_close(compiled_model, eager, atol, rtol)  # eval updates nothing


def test_compile_fullgraph_aot_eager_matches_eager():
    run_against_eager("aot_eager", atol=0, rtol=0)


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "identity"])
def test_compiled_inplace_abn_matches_eager(act):
    """InPlaceABN compiles as BN + activation through the core (the compiler decides what
    the backward keeps): outputs, gradients, running statistics and the step count equal
    eager InPlaceABN's, which keeps only y, to float32 rounding."""
    run_against_eager("aot_eager", atol=1e-5, rtol=1e-5,
                      norm=lambda c: bnn.InPlaceABN(c, act=act, act_param=0.5))


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager():
    # inductor fuses conv/linear epilogues differently: float32 rounding-level differences
    run_against_eager("inductor", atol=1e-5, rtol=1e-5)
