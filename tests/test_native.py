"""The native C++ autograd node (`bnkit.kernels.native`): it runs the same compiled one-call
ops as the Python path, so a layer's outputs, gradients, running statistics and step count
must match that path bit for bit; double backward, version counters, the inputs it leaves
to the Python path, and its on/off switch.
"""
from __future__ import annotations

import pytest
import torch

import bnkit
from bnkit import kernels

cpu = pytest.importorskip("bnkit.kernels.cpu")
native = pytest.importorskip("bnkit.kernels.native")


@pytest.fixture(autouse=True)
def _needs_native():
    if kernels.native_module() is None:
        pytest.skip(f"native op unavailable: {native.status()}")


def spy(monkeypatch):
    """Count the calls the native op took (it returns (None, None) for those it declines)."""
    calls, real = [], native.call

    def counted(*a):
        out = real(*a)
        if out[0] is not None:
            calls.append(1)
        return out
    monkeypatch.setattr(native, "call", counted)
    return calls


def step(m, x, dy):
    """One forward and backward: (y, x.grad, param grads, buffers, step count)."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    grads = [p.grad.clone() for p in m.parameters()]
    bufs = [b.clone() for b in m.buffers()]
    return [y.detach(), x.grad, *grads, *bufs]


# (make layer, input shape, channels_last, dtype, threads)
CASES = {
    "mlp": (lambda: bnkit.nn.BatchNorm1d(100), (60, 100), False, torch.float32, 1),
    "f64": (lambda: bnkit.nn.BatchNorm1d(7, dtype=torch.float64), (5, 7, 3), False,
            torch.float64, 1),
    "nhwc": (lambda: bnkit.nn.BatchNorm2d(3), (6, 3, 5, 4), True, torch.float32, 1),
    "axis-1": (lambda: bnkit.nn.BatchNorm(9, axis=-1), (3, 4, 9), False, torch.float32, 1),
    "relu": (lambda: bnkit.nn.BatchNormAct(16, act="relu"), (32, 16, 4, 4), False,
             torch.float32, 1),
    "no-affine": (lambda: bnkit.nn.BatchNorm1d(10, affine=False), (8, 10), False,
                  torch.float32, 1),
    "scale-only": (lambda: bnkit.nn.BatchNorm1d(10, bias=False), (8, 10), False,
                   torch.float32, 1),
    "batch-stats-only": (lambda: bnkit.nn.BatchNorm1d(10, track_running_stats=False),
                         (8, 10), False, torch.float32, 1),
    "cumulative": (lambda: bnkit.nn.BatchNorm1d(10, momentum=None), (8, 10), False,
                   torch.float32, 1),
    "parallel-fused": (lambda: bnkit.nn.BatchNorm2d(8), (16, 8, 32, 32), False,
                       torch.float32, 2),
    "parallel-relu": (lambda: bnkit.nn.BatchNormAct(8, act="relu"), (16, 8, 32, 32), False,
                      torch.float32, 2),
    "parallel-nhwc": (lambda: bnkit.nn.BatchNorm2d(8), (16, 8, 32, 32), True, torch.float32,
                      2),
}


@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_the_python_path_bit_for_bit(monkeypatch, case, eval_mode):
    make, shape, cl, dtype, threads = CASES[case]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        x = torch.randn(shape, dtype=torch.float64).mul(3).add(2).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, dtype=dtype)
        m = make().to(dtype)
        with torch.no_grad():  # non-trivial parameters and buffers
            for t in [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]:
                t.uniform_(0.5, 1.5)
        m2 = make().to(dtype)
        m2.load_state_dict(m.state_dict())
        for layer in (m, m2):
            layer.train(not eval_mode)
        calls = spy(monkeypatch)
        got = [t for _ in range(2) for t in step(m, x, dy)]  # two steps: blend twice
        assert len(calls) == 2
        monkeypatch.setattr(kernels, "_native", None)
        want = [t for _ in range(2) for t in step(m2, x, dy)]
    finally:
        torch.set_num_threads(before)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        assert torch.equal(g, w)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_input_grad"])
@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("case", ["mlp", "nhwc", "relu", "cumulative", "parallel-fused"])
def test_calls_without_a_graph_match_the_python_path(monkeypatch, case, eval_mode, context):
    """Without a graph to record (no_grad, inference_mode, or grad mode on with nothing
    requiring grad) the node runs its forward alone: output, buffers and the step count are
    still the Python path's bit for bit, and nothing requires grad."""
    make, shape, cl, dtype, threads = CASES[case]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_input_grad": torch.enable_grad}[context]
    try:
        torch.manual_seed(0)
        x = torch.randn(shape, dtype=torch.float64).mul(3).add(2).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        layers = [make().to(dtype), make().to(dtype)]
        with torch.no_grad():
            for t in [*layers[0].parameters(),
                      *(b for b in layers[0].buffers() if b.is_floating_point())]:
                t.uniform_(0.5, 1.5)
        layers[1].load_state_dict(layers[0].state_dict())
        for layer in layers:
            layer.train(not eval_mode)
            if context == "no_input_grad":
                layer.requires_grad_(False)
        calls = spy(monkeypatch)
        with ctx():
            got = [layers[0](x) for _ in range(2)]
        assert len(calls) == 2
        monkeypatch.setattr(kernels, "_native", None)
        with ctx():
            want = [layers[1](x) for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    for g, w in zip([*got, *layers[0].buffers()], [*want, *layers[1].buffers()], strict=True):
        assert g.dtype == w.dtype and g.stride() == w.stride() and not g.requires_grad
        assert torch.equal(g, w)


def test_layer_values_match_torch_in_float64():
    """The oracle: torch's own layer in float64 (same step count, buffers, gradients)."""
    torch.manual_seed(1)
    x = (torch.randn(40, 6, 5, dtype=torch.float64) * 4 + 3).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    m, t = bnkit.nn.BatchNorm1d(6).double(), torch.nn.BatchNorm1d(6).double()
    dy = torch.randn_like(x)
    m(x).backward(dy)
    y = t(x2)
    y.backward(dy)
    torch.testing.assert_close(m(x.detach()), t(x2.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip([*m.parameters(), *m.buffers()], [*t.parameters(), *t.buffers()]):
        torch.testing.assert_close(a.grad if a.requires_grad else a,
                                   b.grad if b.requires_grad else b, rtol=1e-10, atol=1e-12)


def test_expanded_upstream_gradient(monkeypatch):
    """y.sum() sends back an expanded dy (stride 0): copied into x's layout first."""
    x = torch.randn(16, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    m, m2 = bnkit.nn.BatchNorm2d(4), bnkit.nn.BatchNorm2d(4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    calls = spy(monkeypatch)
    (m(xa) * 1).sum().backward()
    assert calls
    monkeypatch.setattr(kernels, "_native", None)
    (m2(xb) * 1).sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(m.weight.grad, m2.weight.grad)


def test_double_backward(monkeypatch):
    """create_graph=True: the node's backward runs the core's differentiable formulas."""
    calls = spy(monkeypatch)
    for act in ("identity", "relu"):
        m = bnkit.nn.BatchNormAct(3, act=act).double()
        x = (torch.randn(6, 3, 2, dtype=torch.float64) + 1).requires_grad_()
        assert torch.autograd.gradcheck(m, (x,))
        assert torch.autograd.gradgradcheck(m, (x,))
        m.eval()
        assert torch.autograd.gradgradcheck(m, (x,))
    assert calls


def test_version_counters():
    """The blended buffers and the step counter advance their versions; an input changed
    in place before backward is caught as for any torch op."""
    m = bnkit.nn.BatchNorm1d(5)
    x = torch.randn(8, 5, requires_grad=True)
    h = x * 1
    versions = (m.running_mean._version, m.running_var._version,
                m.num_batches_tracked._version)
    y = m(h)
    assert m.running_mean._version > versions[0] and m.running_var._version > versions[1]
    assert m.num_batches_tracked._version > versions[2] and int(m.num_batches_tracked) == 1
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def declined(monkeypatch, make, x, **kw):
    """Run a layer; True when the native op did not take the call."""
    calls = spy(monkeypatch)
    make()(x, **kw)
    return not calls


def test_inputs_left_to_the_python_path(monkeypatch):
    x = torch.randn(6, 4, 5)
    assert not declined(monkeypatch, lambda: bnkit.nn.BatchNorm1d(4), x)
    assert declined(monkeypatch, lambda: bnkit.nn.BatchNorm1d(4), x.double())  # mixed dtypes
    assert declined(monkeypatch, lambda: bnkit.nn.BatchNormAct(4, act="silu"), x)
    assert declined(monkeypatch, lambda: bnkit.nn.BatchNorm1d(4).half(), x.half())
    assert declined(monkeypatch, lambda: bnkit.nn.BatchNorm1d(4), x,
                    mask=torch.ones(6, 5, dtype=torch.bool))
    assert declined(monkeypatch, lambda: bnkit.nn.BatchNorm1d(4),
                    torch.randn(6, 5, 4).transpose(1, 2))  # not dense along the channels
    big = torch.randn(4, 8, 256, 260)  # 8.5 MB: huge-page outputs, still the node
    assert not declined(monkeypatch, lambda: bnkit.nn.BatchNorm2d(8), big)


def test_inference_mode_buffers_fail_untouched(monkeypatch):
    """Buffers created under inference_mode cannot be updated outside it: the call is left
    to the core, which raises before anything changes."""
    with torch.inference_mode():
        m = bnkit.nn.BatchNorm1d(4)
    calls = spy(monkeypatch)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        m(torch.randn(6, 4))
    assert not calls
    assert torch.equal(m.running_mean, torch.zeros(4)) and int(m.num_batches_tracked) == 0


def test_switched_off_and_on():
    """use_native(False) sends layer calls to the Python autograd.Function path."""
    try:
        kernels.use_native(False)
        assert kernels.native_module() is None
    finally:
        kernels.use_native(True)
    assert kernels.native_module() is native


# call the node does not run in place -> the arguments it changes from a valid training
# call (the core validates every call before the node sees it: tests/test_errors.py)
BAD = {"weight size": {"w": torch.ones(5)},
       "weight dtype": {"w": torch.ones(4, dtype=torch.float64)},
       "running_var missing": {"rv": None},
       "eval without buffers": {"training": False, "rm": None, "rv": None},
       "running_var requires grad": {"rv": torch.ones(4, requires_grad=True)},
       "expanded running_var": {"rv": torch.ones(1).expand(4)},
       "half input": {"x": torch.randn(8, 4).half()},
       "not dense": {"x": torch.randn(4, 8).t()}}


@pytest.mark.parametrize("bad", list(BAD))
def test_the_op_declines_untouched(bad):
    """The node returns (None, None) and touches nothing for a call its kernels cannot run in
    place, so the Python path runs it."""
    rm, rv = torch.zeros(4), torch.ones(4)
    a = {"x": torch.randn(8, 4), "w": torch.ones(4), "b": torch.zeros(4), "rm": rm, "rv": rv,
         "training": True, "eps": 1e-5, "momentum": 0.1, **BAD[bad]}
    update = a["training"] and a["rm"] is not None
    out = native.call(a["x"], a["w"], a["b"], a["rm"], a["rv"], a["training"], a["eps"],
                      a["momentum"], update, False, 1)
    assert out == (None, None)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_nonfinite_statistics_come_back_from_the_node(monkeypatch):
    """The node's blend leaves a channel with non-finite batch statistics as it was and
    returns the statistics, so Python warns (bnkit.functional.running)."""
    calls = spy(monkeypatch)
    m = bnkit.nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    x[3, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) 2 \(1 of 4\)"):
        m(x)
    assert calls == [1]
    assert m.running_mean[2] == 0 and m.running_var[2] == 1 and int(m.num_batches_tracked) == 1
    torch.testing.assert_close(m.running_mean[[0, 1, 3]], 0.1 * x[:, [0, 1, 3]].mean(0))
    y, stats = native.call(x, None, None, m.running_mean, m.running_var, True, 1e-5, 0.1,
                           True, False, 1)
    assert y.shape == x.shape and stats.shape == (8,) and not torch.isfinite(stats[2])
    _, stats = native.call(x.nan_to_num(posinf=0.0), None, None, None, None, True, 1e-5,
                           0.1, False, False, 1)
    assert stats is None  # finite statistics: nothing comes back
