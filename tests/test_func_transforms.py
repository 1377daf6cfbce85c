"""torch.func transforms (grad, grad of grad, functional_call) through bnkit layers give
torch's own results, in the modes where torch supports them: eval, and training without
running statistics. Training with running statistics fails as torch's does (a transform
may not mutate captured buffers) and leaves the buffers untouched.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

import bnkit.nn as bnn


def pair(track=True, training=True):
    """bnkit and torch BatchNorm1d(4) in float64 with the same parameters and buffers."""
    g = torch.Generator().manual_seed(0)
    mods = [bnn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64),
            torch.nn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64)]
    state = {"weight": torch.rand(4, generator=g, dtype=torch.float64) + 0.5,
             "bias": torch.randn(4, generator=g, dtype=torch.float64)}
    if track:
        state |= {"running_mean": torch.randn(4, generator=g, dtype=torch.float64),
                  "running_var": torch.rand(4, generator=g, dtype=torch.float64) + 0.5}
    for m in mods:
        m.load_state_dict(state, strict=False)
        m.train(training)
    return mods


def x_input():
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("track,training", [(False, True), (True, False)],
                         ids=["train-no-running", "eval"])
def test_grad_and_grad_of_grad_match_torch(track, training):
    x = x_input()
    params = {"weight": torch.full((4,), 1.5, dtype=torch.float64),
              "bias": torch.full((4,), -0.25, dtype=torch.float64)}
    results = []
    for m in pair(track, training):
        loss = lambda p, x, m=m: functional_call(m, p, (x,)).pow(3).sum()
        g_params = grad(loss)(params, x)
        g_x = grad(lambda x, m=m: m(x).pow(3).sum())(x)
        gg_x = grad(lambda x, m=m: grad(lambda z: m(z).pow(3).sum())(x).sum())(x)
        results.append((g_params["weight"], g_params["bias"], g_x, gg_x))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_training_with_running_stats_fails_like_torch_and_touches_nothing():
    x = x_input()
    for m in pair(track=True, training=True):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError, match="captured"):
            grad(lambda x, m=m: m(x).sum())(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
