"""InPlaceABN: against torch's BN followed by the activation in float64, the overwrite rules,
the sync variant on 2 gloo processes, convert round trips, state dicts and the saved-bytes
count (tools/memory.py)."""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnkit
from bnkit import kernels
from bnkit.bench.memory import MemoryRow, format_report, memory_report, resnet_style
from bnkit.errors import BNShapeError, BNValueError
from bnkit.functional.inplace_abn import inplace_abn
from bnkit.nn import BatchNormAct, InPlaceABN, InPlaceABNSync, load_inplace_abn_state_dict
from bnkit.tools.memory import saved_tensor_bytes

F = torch.nn.functional
D = torch.float64
ACTS = [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 1.0), ("elu", 0.5),
        ("identity", 0.01)]
# (shape, axis): ranks 2..5, channels first, channels last, a middle axis
LAYOUTS = [((7, 4), 1), ((5, 4, 6), 1), ((3, 4, 3, 5), 1), ((3, 3, 5, 4), -1),
           ((2, 4, 3, 2, 2), 1), ((3, 5, 4, 2), 2)]


def torch_act(z, act, p):
    if act == "leaky_relu":
        return F.leaky_relu(z, p)
    return F.elu(z, p) if act == "elu" else z


def oracle(x, weight, bias, rm, rv, training, momentum, eps, axis, act, p):
    """torch's batch_norm with channels moved to dim 1, then torch's activation."""
    xm = x.movedim(axis, 1)
    z = F.batch_norm(xm, rm, rv, weight, bias, training, momentum, eps)
    return torch_act(z, act, p).movedim(1, axis)


def params(c, near_zero=False):
    """Weights of mixed signs (and, with near_zero, w = 0, 1e-9 and -1e-7 beside a bias)."""
    g = torch.Generator().manual_seed(c)
    w = torch.randn(c, generator=g, dtype=D) + 0.2
    w[1::2] = -w[1::2].abs()
    b = torch.randn(c, generator=g, dtype=D) * 0.5
    if near_zero:
        w[0], w[1], w[-1] = 0.0, 1e-9, -1e-7
        b[0], b[1], b[-1] = 0.7, -0.3, 0.4
    return w, b


def run_pair(shape, axis, act, p, training=True, near_zero=False, momentum=0.1, steps=2):
    """Two steps of InPlaceABN and the oracle on the same data; returns (got, want) pairs."""
    c = shape[axis]
    w, b = params(c, near_zero)
    abn = InPlaceABN(c, act, p, momentum=momentum, axis=axis, dtype=D)
    with torch.no_grad():
        abn.weight.copy_(w)
        abn.bias.copy_(b)
        abn.running_mean.uniform_(-1, 1)
        abn.running_var.uniform_(0.5, 2)
    abn.train(training)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = abn.running_mean.clone(), abn.running_var.clone()
    pairs = []
    g = torch.Generator().manual_seed(sum(shape))
    for step in range(steps):
        x = (torch.randn(shape, generator=g, dtype=D) * 2 + 1).requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=D)
        h = x * 1.0  # a non-leaf: InPlaceABN overwrites it
        y = abn(h)
        assert y is h
        (y * dy).sum().backward()
        xr = x.detach().clone().requires_grad_()
        mom = momentum if momentum is not None else 1.0 / (step + 1)
        yr = oracle(xr, wr, br, rm, rv, training, mom, abn.eps, axis, act, p)
        (yr * dy).sum().backward()
        pairs += [(y.detach(), yr.detach()), (x.grad, xr.grad)]
    pairs += [(abn.weight.grad, wr.grad), (abn.bias.grad, br.grad),
              (abn.running_mean, rm), (abn.running_var, rv)]
    if training:
        assert int(abn.num_batches_tracked) == steps
    return pairs


def assert_pairs(pairs, tol=1e-10):
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in bnkit.available_backends(), reason="the cpu backend needs bnkit._C"))]


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request):
    """Every test on each backend that runs CPU tensors: 'reference' (the inversion in torch
    operations over the primitives) and 'cpu' (the C++ kernels bnkit_cpu::abn_*)."""
    before = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(before)


# ----------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("act,p", ACTS)
def test_training_matches_bn_then_activation(shape, axis, act, p):
    assert_pairs(run_pair(shape, axis, act, p))


@pytest.mark.parametrize("act,p", ACTS)
@pytest.mark.parametrize("training", [True, False])
def test_near_zero_weights_stay_exact(act, p, training):
    """w = 0 (y holds no trace of x) and w = 1e-9, -1e-7 next to a bias: those channels keep
    their input, so dw is still exact."""
    assert_pairs(run_pair((6, 5, 4), 1, act, p, training=training, near_zero=True))


@pytest.mark.parametrize("act,p", ACTS)
def test_eval_matches_bn_then_activation(act, p):
    assert_pairs(run_pair((3, 4, 3, 5), 1, act, p, training=False))


def test_cumulative_momentum_and_channels_last():
    assert_pairs(run_pair((3, 3, 5, 4), -1, "leaky_relu", 0.01, momentum=None, steps=3))


def test_cpu_backend_runs_its_kernels(backend, monkeypatch):
    """On 'cpu' the forward and the backward run the C++ operators (none declines); with a
    near-zero weight the forward still does, and the backward takes the torch path, which
    reads those channels' saved input."""
    if backend != "cpu":
        pytest.skip("checks the cpu backend's kernels")
    from bnkit.kernels import cpu
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            calls.append((name, out is not None))
            return out
        return wrapped

    for name in ("abn_forward", "abn_backward_reduce", "abn_backward_elemt"):
        monkeypatch.setattr(cpu, name, spy(name, getattr(cpu, name)))
    assert_pairs(run_pair((4, 6, 5, 3), 1, "leaky_relu", 0.1, steps=1))
    assert calls == [("abn_forward", True), ("abn_backward_reduce", True),
                     ("abn_backward_elemt", True)]
    calls.clear()
    assert_pairs(run_pair((4, 6, 5, 3), 1, "elu", 0.5, near_zero=True, steps=1))
    assert calls == [("abn_forward", True)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_model_equals_eager(backend):
    """torch.compile runs the layer (graph breaks; the torch operations are traced where the
    kernels would write into their arguments): output, gradients and running statistics
    equal the eager model's."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), InPlaceABN(4, "elu", 0.5, dtype=torch.float32),
                          nn.Conv2d(4, 2, 1))
    twin = nn.Sequential(nn.Conv2d(3, 4, 3), InPlaceABN(4, "elu", 0.5), nn.Conv2d(4, 2, 1))
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    y, yc = eager(x), compiled(x)
    y.pow(2).sum().backward()
    yc.pow(2).sum().backward()
    for got, want in ((yc, y), (twin[0].weight.grad, eager[0].weight.grad),
                      (twin[1].weight.grad, eager[1].weight.grad),
                      (twin[1].running_var, eager[1].running_var)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_traced_scripted_and_exported_eval_model_equal_eager(backend):
    """torch.jit.trace and torch.export record the torch operations (the kernels return an
    int the tracer cannot record), torch.jit.script compiles the layer's lowering: each
    gives the eager eval model's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), InPlaceABN(4, "elu", 0.5), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
        traced = torch.jit.trace(model, x)
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(traced(x), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(exported(x), want, rtol=1e-6, atol=1e-6)
        for cls in (InPlaceABN, InPlaceABNSync):
            model[1] = cls(4, "elu", 0.5).eval()
            want = model(x)
            torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act,p", ACTS)
def test_gradcheck(act, p):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 2, generator=g, dtype=D, requires_grad=True)
    w = torch.tensor([1.2, -0.7, 0.4], dtype=D, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=D, requires_grad=True)

    def fn(x, w, b):  # x * 1: a non-leaf, so the in-place path is the one checked
        return inplace_abn(x * 1, None, None, w, b, True, act=act, act_param=p)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D) * 2

    def fn_eval(x, w, b):
        return inplace_abn(x * 1, rm, rv, w, b, False, act=act, act_param=p)

    assert torch.autograd.gradcheck(fn_eval, (x, w, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-7), (torch.bfloat16, 8e-3),
                                       (torch.float16, 1e-3)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_low_precision_and_channels_last_memory(dtype, tol, memory_format):
    """float32/half/bfloat16 input (statistics in float64/float32) against the float64
    oracle of the same input values, also in channels_last memory format."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 6, 5, 3, generator=g) * 2 + 1).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(4, 6, 5, 3, generator=g).to(dtype)
    w, b = params(6)
    abn = InPlaceABN(6, act_param=0.1)
    with torch.no_grad():
        abn.weight.copy_(w)
        abn.bias.copy_(b)
    h = x * 1
    y = abn(h)
    assert y is h and y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    (y * dy).float().sum().backward()
    xr = x.detach().double().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    yr = F.leaky_relu(F.batch_norm(xr, None, None, wr, br, True), 0.1)
    (yr * dy.double()).sum().backward()
    for got, want in ((y, yr), (x.grad, xr.grad), (abn.weight.grad, wr.grad),
                      (abn.bias.grad, br.grad)):
        err = (got.detach().double() - want.detach()).abs().max() / (1 + want.abs().max())
        assert err < tol, (err, tol)
    assert x.grad.dtype == dtype


def test_affine_false_and_bias_false():
    x = torch.randn(6, 3, 4, dtype=D, requires_grad=True)
    for abn, w, b in ((InPlaceABN(3, affine=False, dtype=D), None, None),
                      (InPlaceABN(3, bias=False, dtype=D), torch.ones(3, dtype=D), None)):
        y = abn(x * 1)
        y.sum().backward()
        dx = x.grad.clone()
        x.grad = None
        xr = x.detach().clone().requires_grad_()
        yr = F.leaky_relu(F.batch_norm(xr, None, None, w, b, True), 0.01)
        yr.sum().backward()
        assert_pairs([(y.detach(), yr.detach()), (dx, xr.grad)])


# ----------------------------------------------------------------------------- overwriting
def test_non_leaf_input_is_overwritten_and_its_version_advances():
    x = torch.randn(4, 3, 5, requires_grad=True)
    h = x * 2
    v = h._version
    y = InPlaceABN(3)(h)
    assert y is h and h._version > v
    assert y.grad_fn is not None and "InPlaceABN" in type(y.grad_fn).__name__


@pytest.mark.parametrize("case", ["leaf_requires_grad", "data", "view", "inplace_false",
                                  "no_grad"])
def test_input_is_kept_when_overwriting_is_unsafe(case):
    base = torch.randn(4, 3, 5)
    abn = InPlaceABN(3, inplace=case != "inplace_false")
    if case == "leaf_requires_grad":
        x = base.clone().requires_grad_()
    elif case == "view":
        x = (torch.randn(4, 3, 10, requires_grad=True) * 1)[..., :5]
        base = x.detach().clone()
    else:
        x = base.clone() * 1 if case != "data" else base.clone()
        if case == "inplace_false":
            x = base.clone().requires_grad_() * 1
    if case == "no_grad":
        with torch.no_grad():
            y = abn(x)
    else:
        y = abn(x)
    assert y is not x
    torch.testing.assert_close(x.detach(), base, rtol=0, atol=0)
    want = F.leaky_relu(F.batch_norm(base.double(), None, None, abn.weight.double(),
                                     abn.bias.double(), True), 0.01)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)


def test_input_saved_by_another_op_raises_torchs_inplace_error():
    """x feeds a multiplication that saved it, then InPlaceABN overwrites it: the backward
    raises torch's own error instead of computing with the overwritten values."""
    w = torch.randn(4, 3, 5, requires_grad=True)
    h = torch.randn(4, 3, 5, requires_grad=True) * 1
    other = h * w  # saves h for dw
    y = InPlaceABN(3)(h)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + other.sum()).backward()


@pytest.mark.parametrize("producer", ["sigmoid", "exp", "inplace_abn"])
def test_output_saved_by_its_producer_is_not_overwritten(producer):
    """sigmoid, exp and InPlaceABN keep their output for their backward: a following
    InPlaceABN computes out of place, and the gradients are BN + act's."""
    x = torch.randn(6, 3, 4, dtype=D, requires_grad=True)
    first = InPlaceABN(3, "elu", 1.0, dtype=D)
    make = {"sigmoid": torch.sigmoid, "exp": torch.exp, "inplace_abn": first}[producer]
    h = make(x * 1)
    y = InPlaceABN(3, dtype=D)(h)
    assert y is not h
    y.pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    if producer == "inplace_abn":
        hr = F.elu(F.batch_norm(xr, None, None, torch.ones(3, dtype=D),
                                torch.zeros(3, dtype=D), True), 1.0)
    else:
        hr = make(xr)
    yr = F.leaky_relu(F.batch_norm(hr, None, None, torch.ones(3, dtype=D),
                                   torch.zeros(3, dtype=D), True), 0.01)
    yr.pow(2).sum().backward()
    assert_pairs([(y.detach(), yr.detach()), (x.grad, xr.grad)])


def test_input_used_twice_with_inplace_false_keeps_bn_semantics():
    """A pre-activation shortcut: with inplace=False, h still holds the input afterwards,
    and the gradients are those of BN + act + identity."""
    x = torch.randn(4, 3, 5, dtype=D, requires_grad=True)
    abn = InPlaceABN(3, inplace=False, dtype=D)
    h = x * 1
    out = abn(h) + h
    out.pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    outr = F.leaky_relu(F.batch_norm(xr, None, None, torch.ones(3, dtype=D),
                                     torch.zeros(3, dtype=D), True), 0.01) + xr
    outr.pow(2).sum().backward()
    assert_pairs([(out.detach(), outr.detach()), (x.grad, xr.grad)])


def test_only_the_output_is_saved():
    """Out of place or in place, the layer saves y and per-channel vectors only: the bytes
    counted equal y's plus (mean, invstd in float64, the count)."""
    c, shape = 3, (4, 3, 5)
    abn = InPlaceABN(c)
    per_channel = 2 * c * 8 + 8
    y_bytes = 4 * 3 * 5 * 4
    leaf = torch.randn(shape, requires_grad=True)
    got = saved_tensor_bytes(lambda: abn(leaf), exclude=abn.parameters())
    assert got == y_bytes + per_channel
    # a non-leaf: overwritten, and still y alone (the multiplication by a Python number
    # saves nothing)
    got = saved_tensor_bytes(lambda: abn(leaf * 2), exclude=abn.parameters())
    assert got == y_bytes + per_channel


def test_near_zero_channels_save_their_input_only():
    abn = InPlaceABN(3)
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([1.0, 0.0, 2.0]))
        abn.bias.fill_(0.5)
    x = torch.randn(4, 3, 5, requires_grad=True)
    got = saved_tensor_bytes(lambda: abn(x), exclude=abn.parameters())
    # y + 1 channel of x (4*5 float32) + its index (one int64) + mean, invstd, count
    assert got == 4 * 3 * 5 * 4 + 4 * 5 * 4 + 8 + 2 * 3 * 8 + 8


# ----------------------------------------------------------------------------- errors
def test_relu_is_refused_with_the_reason():
    with pytest.raises(BNValueError, match="ReLU maps every negative value to 0"):
        InPlaceABN(3, act="relu")
    with pytest.raises(BNValueError, match="one of"):
        InPlaceABN(3, act="silu")
    for act in ("leaky_relu", "elu"):
        with pytest.raises(BNValueError, match="must be a number > 0"):
            InPlaceABN(3, act=act, act_param=0.0)


def test_failed_call_leaves_state_and_input_untouched():
    abn = InPlaceABN(3)
    before = [t.clone() for t in (abn.running_mean, abn.running_var, abn.num_batches_tracked)]
    h = torch.randn(4, 5, 2, requires_grad=True) * 1
    keep = h.detach().clone()
    with pytest.raises(BNShapeError):
        abn(h)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        abn(torch.randn(1, 3, requires_grad=True) * 1)
    after = (abn.running_mean, abn.running_var, abn.num_batches_tracked)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert torch.equal(h.detach(), keep)


def _bad_calls():
    """(name, call) pairs that must raise before anything runs, and the running buffers
    they were given."""
    x = torch.randn(4, 3, 5, requires_grad=True) * 1
    rm, rv = torch.zeros(3), torch.ones(3)  # never changed: every call below fails

    def call(**kw):
        args = {"input": x, "running_mean": rm, "running_var": rv, "weight": torch.ones(3),
                "bias": torch.zeros(3), "training": True, "momentum": 0.1, "eps": 1e-5}
        args.update(kw)
        return lambda: inplace_abn(**args)

    return (rm, rv), [("channels", call(input=torch.randn(4, 5, 2) * 1)),
        ("one value", call(input=torch.randn(1, 3) * 1)),
        ("weight shape", call(weight=torch.ones(4))),
        ("eps", call(eps=-1.0)), ("momentum", call(momentum=1.5)),
        ("relu", call(act="relu")), ("slope", call(act_param=0.0)),
        ("dtype", call(input=torch.ones(4, 3, 5, dtype=torch.int64))),
        ("axis", call(axis=3)), ("inference buffer", call(running_var=_inference_ones(3))),
        ("eval without buffers", call(training=False, running_mean=None, running_var=None))]


def _inference_ones(c):
    with torch.inference_mode():
        return torch.ones(c)


def test_errors_are_the_same_on_every_backend():
    """Validation runs in Python before any kernel: each bad call raises the same error on
    every backend and leaves the buffers untouched."""
    seen = {}
    for name in bnkit.available_backends():
        if name == "triton":
            continue
        kernels.set_backend(name)
        (rm, rv), calls = _bad_calls()
        for what, fn in calls:
            with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
                fn()
            seen.setdefault(what, set()).add((type(err.value), str(err.value)))
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert len(seen) == len(calls)
    assert all(len(v) == 1 for v in seen.values()), seen


def test_non_finite_channel_keeps_its_running_statistics_and_warns():
    """A NaN in one channel: that channel's running statistics stay as they were (with the
    core's warning), the others are blended, on every backend alike."""
    abn = InPlaceABN(3)
    x = torch.randn(4, 3, 5)
    x[1, 1, 2] = float("nan")
    want = nn.BatchNorm2d(3)  # the blend torch gives the finite channels
    want.train()(x.unsqueeze(-1))
    with pytest.warns(RuntimeWarning, match="not finite"):
        abn(x)
    assert abn.running_mean[1] == 0 and abn.running_var[1] == 1
    for c in (0, 2):
        torch.testing.assert_close(abn.running_mean[c], want.running_mean[c])
        torch.testing.assert_close(abn.running_var[c], want.running_var[c])


def test_empty_batch_changes_nothing():
    abn = InPlaceABN(3)
    y = abn(torch.empty(0, 3, 4))
    assert y.shape == (0, 3, 4)
    assert int(abn.num_batches_tracked) == 0 and torch.equal(abn.running_var, torch.ones(3))


# ----------------------------------------------------------------------------- state dicts
def test_state_dict_both_ways_with_batchnorm2d():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3]))
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    abn = InPlaceABN(4, act="elu", act_param=0.7)
    abn.load_state_dict(bn.state_dict())
    assert list(abn.state_dict()) == list(bn.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(abn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(abn.eval()(x), F.elu(bn.eval()(x), 0.7))


def test_inplace_abn_package_state_dict_keeps_its_function():
    """The `inplace_abn` package scales by |w| + eps: loading through
    load_inplace_abn_state_dict gives the same outputs as its formula."""
    w = torch.tensor([1.0, -0.5, 0.0], dtype=D)
    sd = {"weight": w, "bias": torch.tensor([0.1, 0.2, -0.3], dtype=D),
          "running_mean": torch.tensor([0.5, -0.5, 0.0], dtype=D),
          "running_var": torch.tensor([1.5, 0.5, 2.0], dtype=D),
          "num_batches_tracked": torch.tensor(3)}
    abn = InPlaceABN(3, dtype=D).eval()
    load_inplace_abn_state_dict(abn, sd)
    x = torch.randn(4, 3, 2, dtype=D)
    xhat = (x - sd["running_mean"][:, None]) / (sd["running_var"][:, None] + 1e-5).sqrt()
    want = F.leaky_relu(xhat * (w.abs() + 1e-5)[:, None] + sd["bias"][:, None], 0.01)
    torch.testing.assert_close(abn(x), want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- convert
class TimmBatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for timm's BatchNormAct2d: a BatchNorm2d with `drop` and `act` children."""

    def __init__(self, c, act=None, drop=None):
        super().__init__(c)
        self.drop = drop or nn.Identity()
        self.act = act or nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                      nn.Conv2d(4, 4, 1), BatchNormAct(4, act=nn.ELU(0.5)),
                      TimmBatchNormAct2d(4, nn.LeakyReLU(0.2)),
                      TimmBatchNormAct2d(4, nn.LeakyReLU(0.2), nn.Dropout(0.0)),
                      nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    for m_ in m.modules():
        if isinstance(m_, (nn.BatchNorm2d, BatchNormAct)):
            with torch.no_grad():
                m_.weight.uniform_(-1, 1)
                m_.running_var.uniform_(0.5, 2)
    return m


def test_convert_to_inplace_abn_and_back():
    m = _model().eval()
    x = torch.randn(2, 3, 6, 6)
    ref = m(x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    bnkit.convert(m, "inplace_abn")
    kinds = [type(c).__name__ for c in m]
    assert kinds == ["Conv2d", "InPlaceABN", "Identity", "Conv2d", "InPlaceABN", "InPlaceABN",
                     "TimmBatchNormAct2d", "BatchNorm2d", "ReLU", "BatchNorm2d"]
    assert (m[1].activation, m[1].act_param) == ("leaky_relu", 0.1)
    assert (m[4].activation, m[4].act_param) == ("elu", 0.5)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    assert list(m.state_dict()) == list(sd)
    bnkit.convert(m, "torch")
    assert [type(c).__name__ for c in m][:3] == ["Conv2d", "BatchNorm2d", "LeakyReLU"]
    assert type(m[5]).__name__ == "Sequential" and type(m[5][0]) is nn.BatchNorm2d
    assert not any(isinstance(c, InPlaceABN) for c in m.modules())
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    for k in ("1.weight", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(m.state_dict()[k], sd[k])


def test_convert_back_to_bnkit_and_training_equals_torch():
    m = _model().train()
    twin = _model().train()
    bnkit.convert(twin, "inplace_abn")
    x = torch.randn(4, 3, 6, 6, dtype=torch.float32)
    torch.testing.assert_close(twin(x), m(x), rtol=1e-5, atol=1e-5)
    bnkit.convert(twin, "bnkit")
    assert type(twin[1]).__name__ == "BatchNorm2d" and type(twin[2]) is nn.LeakyReLU
    assert type(twin[4]) is BatchNormAct and isinstance(twin[4].act, nn.ELU)
    assert not any(isinstance(c, InPlaceABN) for c in twin.modules())
    for k in ("1.running_mean", "4.running_var"):
        torch.testing.assert_close(twin.state_dict()[k], m.state_dict()[k])


def test_convert_keeps_synchronization():
    m = nn.Sequential(nn.SyncBatchNorm(4), nn.LeakyReLU(0.1),
                      bnkit.nn.SyncBatchNorm(4), nn.ELU())
    bnkit.convert(m, "inplace_abn")
    assert [type(c) for c in m] == [InPlaceABNSync, nn.Identity, InPlaceABNSync, nn.Identity]
    assert m[2].process_group is None and m[2].activation == "elu"


# ----------------------------------------------------------------------------- memory
def test_saved_bytes_counted_exactly_on_a_tiny_model():
    """conv -> InPlaceABN -> conv: the first conv keeps the image, InPlaceABN keeps y (the
    conv output's storage, overwritten), the second conv keeps y too (counted once), plus
    mean, invstd (float64) and the count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), InPlaceABN(3),
                          nn.Conv2d(3, 2, 1))
    x = torch.randn(4, 2, 5, 5)
    got = saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters())
    assert got == x.numel() * 4 + 4 * 3 * 5 * 5 * 4 + 2 * 3 * 8 + 8
    torch_model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.LeakyReLU(0.01),
                                nn.Conv2d(3, 2, 1))
    got = saved_tensor_bytes(lambda: torch_model(x).sum(), exclude=torch_model.parameters())
    assert got == x.numel() * 4 + 2 * (4 * 3 * 5 * 5 * 4)  # conv out (act) + act out (conv)


def test_resnet_style_saves_over_35_percent_less_than_bn_leaky_relu():
    rows = memory_report(lambda na: resnet_style(na, width=4, blocks=1), batch=4, image=8,
                         steps=1)
    by = {r.variant: r.saved_bytes for r in rows}
    assert by["InPlaceABN"] <= 0.65 * by["torch BN + LeakyReLU"]
    assert by["InPlaceABN"] < by["torch BN + LeakyReLU_"] < by["torch BN + LeakyReLU"]


def test_memory_table_gives_ratios_to_torch_and_to_batchnormact():
    rows = [MemoryRow("torch BN + LeakyReLU", 4 << 20, 0.200),
            MemoryRow("bnkit BatchNormAct", 4 << 20, 0.160),
            MemoryRow("InPlaceABN", 1 << 20, 0.176)]
    lines = format_report(rows).splitlines()
    assert lines[0].split()[-1] == "BNAct"
    assert lines[3].split()[-5:] == ["1.00", "0.250", "176.0", "0.880", "1.100"]
    assert "BNAct" not in format_report(rows[:1])


# ----------------------------------------------------------------------------- sync
WORLD = 2
SIZES = (3, 5)


def _full(step):
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(sum(SIZES), 4, 3, generator=g, dtype=D) * 2 + 1
    return x, torch.randn(x.shape, generator=g, dtype=D)


def _rows(rank):
    return slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))


def _layer(cls):
    abn = cls(4, "leaky_relu", 0.2, dtype=D)
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([1.0, -0.6, 0.0, 2.0], dtype=D))
        abn.bias.copy_(torch.tensor([0.1, 0.3, 0.5, -0.2], dtype=D))
    return abn


def sync_worker(rank, store, out_dir, backend):
    torch.set_num_threads(1)
    kernels.set_backend(backend)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    abn = _layer(InPlaceABNSync)
    steps = []
    for step in range(2):
        x, g = _full(step)
        xr = x[_rows(rank)].clone().requires_grad_()
        h = xr * 1
        y = abn(h)
        steps.append({"overwritten": y is h, "y": y.detach().clone()})
        (y * g[_rows(rank)]).sum().backward()
        steps[-1]["dx"] = xr.grad.clone()
    out = {"steps": steps, "dw": abn.weight.grad, "db": abn.bias.grad,
           "buffers": [abn.running_mean, abn.running_var, abn.num_batches_tracked]}
    # rank 0 empty: still joins every collective; the result is rank 1's batch alone
    empty = _layer(InPlaceABNSync)
    x, g = _full(0)
    xr = (x[:0] if rank == 0 else x).clone().requires_grad_()
    y = empty(xr * 1)
    (y * (g[:0] if rank == 0 else g)).sum().backward()
    out["empty_rank"] = {"y": y.detach(), "dx": xr.grad, "dw": empty.weight.grad,
                         "running_var": empty.running_var.clone()}
    # a rank whose input is rejected makes the other raise too, instead of waiting
    bad = torch.randn(4, 4, 3, dtype=D) if rank == 0 else torch.randn(3, 2, dtype=D)
    try:
        _layer(InPlaceABNSync)(bad)
        out["rejected"] = None
    except ValueError as err:
        out["rejected"] = str(err)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sync_two_ranks_equal_single_process(tmp_path, backend):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=sync_worker, args=(r, str(tmp_path / "store"), str(tmp_path),
                                                   backend))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "sync workers hung"
    ranks = [torch.load(Path(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    single = _layer(InPlaceABN)
    for step in range(2):
        x, g = _full(step)
        xs = x.clone().requires_grad_()
        y = single(xs * 1)
        (y * g).sum().backward()
        for r in range(WORLD):
            got = ranks[r]["steps"][step]
            assert got["overwritten"]
            assert_pairs([(got["y"], y.detach()[_rows(r)]), (got["dx"], xs.grad[_rows(r)])])
    # weight/bias gradients are each rank's share: their sum is the single-process one
    assert_pairs([(ranks[0]["dw"] + ranks[1]["dw"], single.weight.grad),
                  (ranks[0]["db"] + ranks[1]["db"], single.bias.grad)])
    for r in range(WORLD):
        assert_pairs(zip(ranks[r]["buffers"][:2], [single.running_mean, single.running_var]))
        assert int(ranks[r]["buffers"][2]) == 2
    alone = _layer(InPlaceABN)
    x, g = _full(0)
    xs = x.clone().requires_grad_()
    y = alone(xs * 1)
    (y * g).sum().backward()
    e0, e1 = ranks[0]["empty_rank"], ranks[1]["empty_rank"]
    assert e0["y"].shape == (0, 4, 3)
    assert_pairs([(e1["y"], y.detach()), (e1["dx"], xs.grad),
                  (e0["dw"] + e1["dw"], alone.weight.grad),
                  (e0["running_var"], alone.running_var), (e1["running_var"], alone.running_var)])
    assert "one value per channel" in ranks[1]["rejected"]
    assert "rank 1 rejected its input" in ranks[0]["rejected"]
