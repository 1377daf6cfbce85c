"""Generic layer tests driven by one spec table: bnkit.nn vs torch.nn, float64 oracle.

Every spec names a bnkit layer, an input shape and its channel axis. The oracle is the
torch.nn.BatchNorm{1,2,3}d of the same rank applied to the input with its channel axis moved
to dim 1 (x.movedim(axis, 1)), so BatchNorm(C, axis=k) is checked against torch too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from bnkit import nn as bnn

C = 3
TORCH_BY_RANK = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                 5: torch.nn.BatchNorm3d}


@dataclass(frozen=True)
class Spec:
    """A bnkit layer factory `make(C, **kw)`, an input shape (C at `axis`) and the axis."""

    name: str
    make: Callable
    shape: tuple
    axis: int = 1

    def torch_layer(self, **kw) -> torch.nn.Module:
        return TORCH_BY_RANK[len(self.shape)](C, **kw)

    def torch_forward(self, layer, x):
        """The oracle: torch's layer on x with channels moved to dim 1, moved back."""
        return layer(x.movedim(self.axis, 1)).movedim(1, self.axis)


SPECS = [
    Spec("BatchNorm1d-2D", bnn.BatchNorm1d, (8, C)),
    Spec("BatchNorm1d-3D", bnn.BatchNorm1d, (4, C, 5)),
    Spec("BatchNorm2d", bnn.BatchNorm2d, (3, C, 4, 3)),
    Spec("BatchNorm3d", bnn.BatchNorm3d, (2, C, 3, 2, 3)),
    Spec("BatchNorm-axis1-4D", partial(bnn.BatchNorm, axis=1), (3, C, 4, 3)),
    Spec("BatchNorm-axis-1-2D", partial(bnn.BatchNorm, axis=-1), (8, C), -1),
    Spec("BatchNorm-axis-1-3D", partial(bnn.BatchNorm, axis=-1), (4, 5, C), -1),
    Spec("BatchNorm-axis-1-4D", partial(bnn.BatchNorm, axis=-1), (3, 4, 3, C), -1),
    Spec("BatchNorm-axis-1-5D", partial(bnn.BatchNorm, axis=-1), (2, 3, 2, 3, C), -1),
    Spec("BatchNorm-axis0-3D", partial(bnn.BatchNorm, axis=0), (C, 6, 2), 0),
    Spec("BatchNorm-axis2-5D", partial(bnn.BatchNorm, axis=2), (2, 3, C, 2, 3), 2),
    Spec("BatchNorm-axis-2-4D", partial(bnn.BatchNorm, axis=-2), (3, 4, C, 2), -2),
]
FIXED_RANK = [s for s in SPECS if s.make in (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d)]
# (affine, bias) as torch accepts them: bias=False keeps only the learned scale
AFFINE = [(True, True), (True, False), (False, True)]

by_spec = pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)


def make_pair(spec, dtype=torch.float64, **kw):
    """(bnkit layer, torch layer) with identical non-trivial parameters and buffers."""
    tm = spec.torch_layer(**kw).to(dtype)
    bk = spec.make(C, **kw).to(dtype)
    with torch.no_grad():
        for p in tm.parameters():
            p.uniform_(0.5, 1.5)
        if tm.running_mean is not None:
            tm.running_mean.uniform_(-1, 1)
            tm.running_var.uniform_(0.5, 2)
        for name, t in list(tm.named_parameters()) + list(tm.named_buffers()):
            getattr(bk, name).copy_(t)
    return bk, tm


def check_step(spec, bk, tm, x, atol=1e-12, rtol=1e-10):
    """One forward/backward through both layers; compare outputs, grads and buffers."""
    for m in (bk, tm):
        m.zero_grad(set_to_none=True)
    xb, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yb, yt = bk(xb), spec.torch_forward(tm, xt)
    g = torch.randn_like(yt)
    yb.backward(g)
    yt.backward(g)
    torch.testing.assert_close(yb, yt, atol=atol, rtol=rtol)
    torch.testing.assert_close(xb.grad, xt.grad, atol=atol, rtol=rtol)
    compare_state(bk, tm, atol, rtol)


def compare_state(bk, tm, atol=1e-12, rtol=1e-10):
    """Parameters, their gradients and every buffer (num_batches_tracked exactly)."""
    for name, p in tm.named_parameters():
        q = getattr(bk, name)
        torch.testing.assert_close(q, p, atol=atol, rtol=rtol)
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol)
    assert sorted(n for n, _ in bk.named_parameters()) == sorted(
        n for n, _ in tm.named_parameters())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(bk, name), getattr(tm, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def batch(spec, step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(spec.shape, generator=g, dtype=dtype) * (1 + step) + step - 1


@by_spec
@pytest.mark.parametrize("affine,bias", AFFINE)
# momentum is unused without running statistics: (False, None) would repeat (False, 0.1)
@pytest.mark.parametrize("track,momentum", [(True, 0.1), (True, None), (False, 0.1)])
def test_parity_train_eval_train(spec, affine, bias, track, momentum):
    """Two training steps (cumulative average needs two), eval, then training again."""
    torch.manual_seed(0)
    bk, tm = make_pair(spec, affine=affine, bias=bias, track_running_stats=track,
                       momentum=momentum)
    for step in range(2):
        check_step(spec, bk, tm, batch(spec, step))
    bk.eval()
    tm.eval()
    check_step(spec, bk, tm, batch(spec, 2))
    bk.train()
    tm.train()
    check_step(spec, bk, tm, batch(spec, 3))
    if track:
        assert int(bk.num_batches_tracked) == 3


@by_spec
def test_reset_running_stats_and_parameters(spec):
    bk, tm = make_pair(spec)
    for step in range(2):
        check_step(spec, bk, tm, batch(spec, step))
    for m in (bk, tm):
        m.zero_grad(set_to_none=True)
        m.reset_running_stats()
    compare_state(bk, tm, atol=0, rtol=0)
    assert torch.equal(bk.running_var, torch.ones(C, dtype=torch.float64))
    check_step(spec, bk, tm, batch(spec, 2))
    weight = bk.weight
    for m in (bk, tm):
        m.zero_grad(set_to_none=True)
        m.reset_parameters()
    assert bk.weight is weight  # reset in place, optimizers keep their references
    compare_state(bk, tm, atol=0, rtol=0)
    assert torch.equal(bk.weight, torch.ones(C, dtype=torch.float64))
    assert int(bk.num_batches_tracked) == 0


@pytest.mark.parametrize("spec", FIXED_RANK, ids=lambda s: s.name)
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"bias": False}, {"momentum": None},
                                {"eps": 1e-3, "track_running_stats": False}])
def test_repr_equals_torch(spec, kw):
    assert repr(spec.make(C, **kw)) == repr(spec.torch_layer(**kw))


@by_spec
def test_extra_repr_names_the_axis(spec):
    bk, tm = spec.make(C, momentum=0.2), spec.torch_layer(momentum=0.2)
    suffix = "" if spec.axis == 1 else f", axis={spec.axis}"
    assert bk.extra_repr() == tm.extra_repr() + suffix


def test_bias_false_has_no_bias_parameter_like_torch():
    bk, tm = bnn.BatchNorm2d(C, bias=False), torch.nn.BatchNorm2d(C, bias=False)
    assert bk.bias is None and tm.bias is None
    assert list(bk.state_dict()) == list(tm.state_dict())



@by_spec
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_input_float32_parameters(spec, dtype):
    """Half/bfloat16 input with float32 layers: output in the input's dtype, within one ulp
    of the float64 oracle run on the same rounded values; running buffers stay float32."""
    bk, tm = make_pair(spec, dtype=torch.float32)
    tm = tm.double()
    eps = torch.finfo(dtype).eps
    for step in range(2):
        x = batch(spec, step).to(dtype)
        for mode in (True, False):
            bk.train(mode)
            tm.train(mode)
            xb, xt = x.clone().requires_grad_(), x.double().requires_grad_()
            yb, yt = bk(xb), spec.torch_forward(tm, xt)
            assert yb.dtype == dtype
            torch.testing.assert_close(yb.double(), yt, atol=eps, rtol=eps)
            g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
            yb.backward(g)
            yt.backward(g.double())
            assert xb.grad.dtype == dtype
            torch.testing.assert_close(xb.grad.double(), xt.grad, atol=2 * eps, rtol=2 * eps)
            for name, p in tm.named_parameters():
                q = getattr(bk, name)
                assert q.grad.dtype == torch.float32
                torch.testing.assert_close(q.grad.double(), p.grad, atol=1e-4, rtol=1e-4)
                q.grad, p.grad = None, None
    for name in ("running_mean", "running_var"):
        a, b = getattr(bk, name), getattr(tm, name)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6)
    assert int(bk.num_batches_tracked) == int(tm.num_batches_tracked) == 2
