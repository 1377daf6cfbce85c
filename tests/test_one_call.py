"""The 'cpu' backend's one-call ops (`fused_forward`, `fused_backward_op`, bnkit._C): the
same outputs, gradients and running statistics as the reference backend on one thread
(serial loops) and on two (the parallel kernels), and the core's numerical guarantees
(off-centre float32 data, constant input) on inputs that take them.
"""
from __future__ import annotations

import math

import pytest
import torch
from oracles import bn_train_oracle as oracle

import bnkit
import bnkit.functional as BF
from bnkit import kernels
from bnkit.functional import autograd as A

cpu = pytest.importorskip("bnkit.kernels.cpu")

EPS32 = torch.finfo(torch.float32).eps
# (shape, axis, channels_last): N from 2 to 64, C from 1 to 300, ranks 2 to 4
SHAPES = [((60, 100), 1, False), ((2, 1), 1, False), ((64, 300), 1, False),
          ((5, 7, 3), 1, False), ((3, 4, 9), 2, False), ((32, 16, 4, 4), 1, False),
          ((6, 3, 5, 4), 1, True), ((2, 300, 3), 1, False)]
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12},
       torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


@pytest.fixture(autouse=True, params=["native", "python"])
def path(request, one_thread, monkeypatch):
    """Every test twice: layer calls through the native C++ node, and through the Python
    autograd.Function (both run the same one-call ops). One thread (the serial loops)
    unless a test asks for two; 'auto' backend after."""
    if request.param == "python":
        monkeypatch.setattr(kernels, "_native", None)
    elif kernels.native_module() is None:
        from bnkit.kernels import native
        pytest.skip(f"native op unavailable: {native.status()}")
    yield request.param
    kernels.set_backend("auto")



def make(shape, axis, cl, dtype, seed=0, loc=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def params(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return w, torch.randn(c, generator=g, dtype=torch.float64).to(dtype)


def close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def on_reference(op, *args):
    """The core's forward or backward op run on the reference backend (the oracle)."""
    kernels.set_backend("reference")
    try:
        return op(*args)
    finally:
        kernels.set_backend("auto")


def reference_forward(*args):
    return on_reference(A._forward_impl, *args)


def reference_backward(*args):
    return on_reference(A._backward_impl, *args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", SHAPES, ids=str)
def test_fused_forward_and_backward_equal_the_reference(shape, axis, cl, dtype):
    x = make(shape, axis, cl, dtype)
    c = shape[axis]
    w, b = params(c, dtype)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    dy = make(shape, axis, cl, dtype, seed=3, loc=-0.2)
    for (wt, bt), training in [((w, b), True), ((None, None), True), ((w, None), False),
                               ((w, b), False)]:
        args = (x, wt, bt, rm, rv, None, training, 1e-5, axis, "identity")
        got = cpu.fused_forward(*args)
        want = reference_forward(*args)
        assert got is not None
        for g, r in zip(got, want):
            close(g, r, dtype)
        assert got[0].stride() == x.stride()
        for act in ("identity", "relu"):
            bargs = (dy, x, wt, bt, *want[1:], None, training, 1e-5, axis, act)
            got_b = cpu.fused_backward_op(*bargs)
            want_b = reference_backward(*bargs)
            assert got_b is not None
            for g, r in zip(got_b, want_b):
                close(g, r, dtype)


def test_backward_takes_an_expanded_dy():
    """y.sum().backward() hands an expanded (stride 0) dy: copied, same result."""
    x = make((8, 5), 1, False, torch.float64)
    _, mean, var, count = cpu.fused_forward(x, None, None, None, None, None, True, 1e-5, 1)
    dy = torch.ones(()).double().expand(8, 5)
    got = cpu.fused_backward_op(dy, x, None, None, mean, var, count, None, True, 1e-5, 1)
    want = reference_backward(dy, x, None, None, mean, var, count, None, True, 1e-5, 1)
    for g, r in zip(got, want):
        close(g, r, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(60, 100), (48, 4, 5, 5), (64, 16, 4, 4)], ids=str)
def test_layer_matches_the_reference_backend(shape, dtype):
    """Two training steps and an eval step of BatchNorm: outputs, grads, running stats."""
    mods = {}
    assert kernels.select(make(shape, 1, False, dtype), 1) is cpu  # big enough for it
    for name in ("cpu", "reference"):
        kernels.set_backend(name)
        torch.manual_seed(0)
        m = bnkit.nn.BatchNorm(shape[1], dtype=dtype)
        outs = []
        for step in range(3):
            m.train(step < 2)
            x = make(shape, 1, False, dtype, seed=step).requires_grad_()
            y = m(x)
            (y * make(shape, 1, False, dtype, seed=9)).sum().backward()
            outs += [y.detach(), x.grad]
        mods[name] = (m, outs)
    (mc, oc), (mr, orf) = mods["cpu"], mods["reference"]
    for g, r in zip(oc, orf):
        close(g, r, dtype)
    for name in ("running_mean", "running_var", "weight", "bias"):
        close(getattr(mc, name).detach(), getattr(mr, name).detach(), dtype)
    close(mc.weight.grad, mr.weight.grad, dtype)
    close(mc.bias.grad, mr.bias.grad, dtype)


def test_layer_uses_the_one_call_kernels(monkeypatch, path):
    calls = []
    real_ops = cpu._ops

    class Ops:  # records the compiled ops the Python path calls
        def __getattr__(self, name):
            real = getattr(real_ops, name)
            return lambda *a, **k: (calls.append(name), real(*a, **k))[1]

    monkeypatch.setattr(cpu, "_ops", Ops())
    if path == "native":  # the node calls the C++ functions directly, not the ops
        from bnkit.kernels import native
        real_call = native.call
        monkeypatch.setattr(native, "call", lambda *a: (calls.append("native"),
                                                        real_call(*a))[1])
    m = bnkit.nn.BatchNorm1d(100)
    x = torch.randn(60, 100, requires_grad=True)
    assert kernels.select(x, 1) is cpu
    m(x).sum().backward()
    assert calls == (["native"] if path == "native" else ["forward", "backward"])


def test_inputs_that_need_the_primitives_get_none():
    x = torch.randn(60, 100)
    mask = torch.ones(60, 1, dtype=torch.bool)
    assert cpu.fused_forward(x, None, None, None, None, mask, True, 1e-5, 1) is None
    assert cpu.fused_forward(x, None, None, None, None, None, True, 1e-5, 1, "silu") is None
    assert cpu.fused_forward(x.t(), None, None, None, None, None, True, 1e-5, 1) is None
    half = torch.zeros(100, dtype=torch.float16)  # buffers the kernel cannot blend
    assert cpu.fused_forward(x, None, None, half, half, None, True, 1e-5, 1, "identity",
                             0.1) is None
    args = (x, x, None, None, torch.zeros(100).double(), torch.ones(100).double(),
            torch.tensor(60.0).double())
    assert cpu.fused_backward_op(*args, mask, True, 1e-5, 1) is None
    assert cpu.fused_backward_op(*args, None, True, 1e-5, 1, "silu") is None


# (shape, axis, channels_last) large enough for the parallel kernels on 2 threads: cf with
# the per-channel fused backward, cf split into chunks (C = 1), and cl
PAR_SHAPES = [((16, 8, 32, 32), 1, False), ((4, 1, 70000), 1, False),
              ((4096, 24), 1, False), ((8, 6, 40, 40), 1, True), ((6, 7, 2000), 1, False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", PAR_SHAPES, ids=str)
def test_parallel_ops_equal_the_reference(shape, axis, cl, dtype):
    torch.set_num_threads(2)
    x = make(shape, axis, cl, dtype)
    assert torch.get_num_threads() == 2 and x.numel() >= 32768  # the parallel kernels
    c = shape[axis]
    w, b = params(c, dtype)
    dy = make(shape, axis, cl, dtype, seed=3, loc=-0.2)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    for act in ("identity", "relu"):
        for training in (True, False):
            args = (x, w, b, rm, rv, None, training, 1e-5, axis, act)
            got, want = cpu.fused_forward(*args), reference_forward(*args)
            for g, r in zip(got, want):
                close(g, r, dtype)
            assert got[0].stride() == x.stride()
    for training in (True, False):
        stats = reference_forward(x, w, b, rm, rv, None, training, 1e-5, axis)[1:]
        for act in ("identity", "relu"):
            bargs = (dy, x, w, b, *stats, None, training, 1e-5, axis, act)
            for g, r in zip(cpu.fused_backward_op(*bargs), reference_backward(*bargs)):
                close(g, r, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_running_blend_equals_update_running(threads, dtype):
    """fused_forward with a momentum blends the buffers as update_running does (bit for
    bit), in place, and advances their version counters (autograd's in-place check sees
    the change)."""
    torch.set_num_threads(threads)
    x = make((64, 40, 3), 1, False, dtype) if threads == 1 else make((64, 40, 30), 1, False,
                                                                      dtype)
    rm, rv = torch.randn(40, dtype=dtype), torch.rand(40, dtype=dtype) + 0.5
    want_m, want_v = rm.clone(), rv.clone()
    ptr, version = rm.data_ptr(), rm._version
    _, mean, var, count = cpu.fused_forward(x, None, None, rm, rv, None, True, 1e-5, 1,
                                            "identity", 0.3)
    BF.update_running(want_m, want_v, mean, var, count, 0.3)
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)  # the same float64 arithmetic
    assert rm.data_ptr() == ptr and rm._version > version and rv._version > 0


def test_inference_builds_no_graph():
    """Nothing requires grad: no autograd node, the same output as with one."""
    m = bnkit.nn.BatchNorm1d(100).eval()
    x = torch.randn(60, 100)
    with torch.no_grad():
        y = m(x)
    assert y.grad_fn is None
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(m(xg).detach(), y, rtol=0, atol=0)


@pytest.mark.parametrize("mean", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("shape", [(60, 4), (8, 4, 8, 8)], ids=str)
def test_off_centre_float32_within_one_ulp_of_the_mean(mean, shape):
    g = torch.Generator().manual_seed(int(mean))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + mean).float()
    assert cpu.fused_forward(x, None, None, None, None, None, True, 1e-5, 1) is not None
    y = BF.batch_norm(x, training=True)
    err = (y.double() - oracle(x)).abs().max().item()
    assert err <= EPS32 * 2 ** math.floor(math.log2(mean))
    assert err <= 4 * EPS32 * oracle(x).abs().max().item()  # the output's own rounding


@pytest.mark.parametrize("value", [1e7, -3.5, 0.0, 123.456])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(60, 3), (4, 3, 5, 5)], ids=str)
def test_constant_input_gives_exactly_the_bias(value, dtype, shape):
    x = torch.full(shape, value, dtype=dtype)
    w, b = params(3, dtype)
    _, mean, var, _ = cpu.fused_forward(x, w, b, None, None, None, True, 1e-5, 1)
    assert torch.equal(mean, torch.full((3,), value, dtype=torch.float64).to(dtype).double())
    assert torch.equal(var, torch.zeros(3, dtype=torch.float64))
    y = BF.batch_norm(x, weight=w, bias=b, training=True)
    assert torch.equal(y, b.view(1, 3, *[1] * (x.dim() - 2)).expand(shape))


@pytest.mark.parametrize("threads", [1, 2])
def test_parameters_and_buffers_of_other_dtypes(threads):
    """float64 parameters on float32 input, weight and bias of different dtypes, and float64
    buffers: read through float64 copies or in place, the reference's results."""
    torch.set_num_threads(threads)
    shape = (64, 40, 3) if threads == 1 else (64, 40, 30)
    x, dy = make(shape, 1, False, torch.float32), make(shape, 1, False, torch.float32, seed=5)
    w64, b64 = params(40, torch.float64)
    for w, b in [(w64, b64), (w64.float(), b64), (w64, None)]:
        for training in (True, False):
            rm, rv = torch.randn(40, dtype=torch.float64), torch.rand(40).double() + 0.5
            args = (x, w, b, rm, rv, None, training, 1e-5, 1, "identity")
            got, want = cpu.fused_forward(*args), reference_forward(*args)
            for g, r in zip(got, want):
                close(g, r, torch.float32 if g.dtype == torch.float32 else torch.float64)
            bargs = (dy, x, w, b, *want[1:], None, training, 1e-5, 1, "identity")
            for g, r in zip(cpu.fused_backward_op(*bargs), reference_backward(*bargs)):
                assert g.dtype == r.dtype
                close(g, r, torch.float32)


def test_failed_call_leaves_inference_buffers_untouched():
    """Buffers made under torch.inference_mode cannot be updated outside it: the call fails
    as torch's does and the buffers keep their values (no in-kernel blend first)."""
    with torch.inference_mode():
        m = bnkit.nn.BatchNorm1d(100)
        m.running_mean.fill_(0.25)
    x = torch.randn(60, 100)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        m(x)
    assert torch.equal(m.running_mean, torch.full((100,), 0.25))
    assert torch.equal(m.running_var, torch.ones(100)) and int(m.num_batches_tracked) == 0
