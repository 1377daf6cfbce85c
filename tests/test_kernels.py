"""One conformance suite for every available backend (bnkit.kernels.contract): each
primitive against the reference backend (the oracle), the numerical guarantees, the
layouts, gradients through the backend's fast path (gradcheck, gradgradcheck) and
torch.compile.

Backends: 'cpu' (bnkit._C) where it is built; 'triton' where it runs CPU tensors, i.e. in
the child process that tests/test_kernels_triton.py starts with Triton's interpreter
(`-k triton`). Tolerances: float64 within 1e-10 and float32 within 1e-5 relative to the
largest reference value (Triton's float32 partial sums: within 2e-6 of that).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import bnkit.functional as BF
from bnkit import kernels
from bnkit.kernels import contract
from bnkit.kernels import reference as ref

EPS32 = torch.finfo(torch.float32).eps
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
CHILD = os.environ.get("BNKIT_TRITON_CHILD") == "1"  # Triton's interpreter on CPU tensors
# (shape, axis, channels-last memory format?)
CASES = [((6, 1, 7), 1, False), ((2, 3), 1, False), ((1, 5, 2), 1, False),
         ((3, 5, 7, 11), 1, False), ((3, 4099), 1, False), ((2, 4099, 3), 1, False),
         ((4, 6, 5, 3), 1, True), ((2, 4, 3, 5, 2), 1, True), ((4, 7, 6), 2, False),
         ((5, 3, 4), 0, False), ((3, 2, 20000), 1, False), ((1, 1, 70001), 1, False),
         ((40000, 3), 1, False), ((8, 16, 24, 24), 1, True), ((4, 32, 6, 6), 1, False)]
if CHILD:  # the interpreter is slow: the smallest cases
    CASES = [c for c in CASES if math.prod(c[0]) <= 200]


def _runs_cpu_tensors(name) -> bool:
    mod = kernels._load(name)
    return mod is not None and mod.supports(torch.randn(4, 3, 5), 1, None)


BACKENDS = [n for n in kernels.BACKENDS if n != "reference" and _runs_cpu_tensors(n)]


@pytest.fixture(params=BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no backend but 'reference' runs CPU tensors here"))])
def be(request):
    """The backend module under test, selected by name for the calls through the core;
    'auto' after."""
    kernels.set_backend(request.param)
    yield kernels._load(request.param)
    kernels.set_backend("auto")


def make(shape, axis, cl, dtype, seed=0, loc=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    return x.contiguous(memory_format=CL[len(shape)]) if cl else x


def close(got, want, dtype, scale=None):
    """|got - want| <= tol * scale, scale = max|want| unless given (same dtype and shape)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.abs().max().item() if scale is None else scale
    assert (got - want).abs().max().item() <= TOL[dtype] * max(scale, 1e-30)


def vectors(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(c, generator=g, dtype=torch.float64).to(dtype))


def _dx_scale(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count, axis):
    """Largest term of dx = a dy + k (x - mean) + c: dx itself can cancel to ~0 (e.g. two
    values per channel), so rounding is bounded relative to the terms."""
    a = invstd * (1 if w is None else w.double())
    n = count.item()
    k, c = a * invstd ** 2 * sum_dy_xmu / n, a * sum_dy / n
    view = [1] * x.dim()
    view[axis] = -1
    xmu = x.double() - mean.view(view)
    terms = (dy.double() * a.view(view)).abs() + (xmu * k.view(view)).abs() + c.abs().view(view)
    return terms.max().item()


# ---- the contract ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(kernels.BACKENDS))
def test_every_registered_backend_meets_the_contract(name):
    import importlib
    try:
        mod = importlib.import_module(f"bnkit.kernels.{name}")
    except ImportError as err:  # an optional dependency is missing: nothing to check
        pytest.skip(str(err))
    assert contract.conforms(mod) == []
    assert isinstance(mod, contract.Backend) and mod.NAME == name


# ---- every primitive equals the reference ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_forward_primitives_match_reference(be, shape, axis, cl, dtype):
    x = make(shape, axis, cl, dtype)
    assert be.supports(x, axis, None)  # the kernels really run
    got, want = be.batch_stats(x, axis), ref.batch_stats(x, axis)
    assert got.count.item() == want.count.item() and got.count.dtype == torch.float64
    close(got.mean, want.mean, dtype)
    close(got.var, want.var, dtype)
    invstd = torch.rsqrt(want.var + 1e-5)
    for w, b in [(None, None), vectors(shape[axis], dtype)]:
        for act in ("identity", "relu"):
            y = be.normalize(x, want.mean, invstd, w, b, axis, act)
            close(y, ref.normalize(x, want.mean, invstd, w, b, axis, act), dtype)
            assert y.stride() == x.stride()  # memory format kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_backward_primitives_match_reference(be, shape, axis, cl, dtype):
    x = make(shape, axis, cl, dtype)
    dy = make(shape, axis, cl, dtype, seed=5, loc=0.1, scale=1.0)
    count, mean, var = ref.batch_stats(x, axis)
    invstd = torch.rsqrt(var + 1e-5)
    sums = be.backward_reduce(dy, x, mean, axis)
    for got, want in zip(sums, ref.backward_reduce(dy, x, mean, axis)):
        close(got, want, dtype)
    for w, b in [(None, None), vectors(shape[axis], dtype)]:
        for training in (True, False):
            dx = be.backward_elemt(dy, x, mean, invstd, w, *sums, count, axis, None, training)
            want = ref.backward_elemt(dy, x, mean, invstd, w, *sums, count, axis, None,
                                      training)
            close(dx, want, dtype, _dx_scale(dy, x, mean, invstd, w, *sums, count, axis))
            assert dx.stride() == x.stride()
        dz = be.act_backward(dy, x, mean, invstd, w, b, axis, "relu")
        close(dz, ref.act_backward(dy, x, mean, invstd, w, b, axis, "relu"), dtype)
    assert be.act_backward(dy, x, mean, invstd, None, None, axis, "identity") is dy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_one_call_ops_match_the_reference_steps(be, shape, axis, cl, dtype):
    """The optional one-call forward / backward (when the backend has them) equal the
    reference primitives in turn, relu's derivative included."""
    if not hasattr(be, "fused_forward") and not hasattr(be, "fused_backward_op"):
        pytest.skip(f"{be.NAME} has no one-call ops")
    x = make(shape, axis, cl, dtype)
    dy = make(shape, axis, cl, dtype, seed=7, loc=-0.2, scale=1.5)
    count, mean, var = ref.batch_stats(x, axis)
    invstd = torch.rsqrt(var + 1e-5)
    for (w, b), training, act in [((None, None), True, "identity"),
                                  (vectors(shape[axis], dtype), True, "identity"),
                                  (vectors(shape[axis], dtype), False, "identity"),
                                  (vectors(shape[axis], dtype), True, "relu")]:
        rm, rv = mean.to(dtype), var.to(dtype)
        y, _, _, _ = be.fused_forward(x, w, b, rm, rv, None, training, 1e-5, axis, act)
        close(y, ref.normalize(x, mean, invstd, w, b, axis, act), dtype)
        dx, _, db = be.fused_backward_op(dy, x, w, b, mean, var, count, None, training, 1e-5,
                                          axis, act)
        dz = ref.act_backward(dy, x, mean, invstd, w, b, axis, act)
        sums = ref.backward_reduce(dz, x, mean, axis)
        close(db.double(), sums[0], torch.float64 if dtype == torch.float64 else dtype,
              sums[0].abs().max().item())
        want = ref.backward_elemt(dz, x, mean, invstd, w, *sums, count, axis, None, training)
        close(dx, want, dtype, _dx_scale(dz, x, mean, invstd, w, *sums, count, axis))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_delegated_cases_match_reference(be, dtype):
    """Masks, silu/gelu and a dy laid out unlike x still give the reference's answer."""
    x = make((4, 3, 10), 1, False, dtype)
    mask = (torch.arange(10) < 7).expand(4, 10).unsqueeze(1)
    got, want = be.batch_stats(x, 1, mask), ref.batch_stats(x, 1, mask)
    assert got.count.item() == want.count.item() == 28
    close(got.mean, want.mean, dtype)
    count, mean, var = want
    invstd = torch.rsqrt(var + 1e-5)
    for act in ("silu", "gelu"):
        close(be.normalize(x, mean, invstd, None, None, 1, act),
              ref.normalize(x, mean, invstd, None, None, 1, act), dtype)
    dy = torch.ones(1, 1, 1, dtype=dtype).expand_as(x)  # stride 0, as from y.sum()
    sums = be.backward_reduce(dy, x, mean, 1)
    close(sums[1], ref.backward_reduce(dy, x, mean, 1)[1], dtype)
    dx = be.backward_elemt(dy, x, mean, invstd, None, *sums, count, 1, mask, True)
    close(dx, ref.backward_elemt(dy, x, mean, invstd, None, *sums, count, 1, mask, True), dtype)


def test_large_output_keeps_format_and_values(be):
    """Outputs past the huge-page threshold (8 MiB) are ordinary tensors with x's strides."""
    if CHILD:
        pytest.skip("too large for the interpreter")
    x = make((8, 64, 64, 64), 1, True, torch.float32)
    _count, mean, var = ref.batch_stats(x, 1)
    invstd = torch.rsqrt(var + 1e-5)
    y = be.normalize(x, mean, invstd)
    assert y.nbytes >= 8 << 20 and y.stride() == x.stride()
    close(y, ref.normalize(x, mean, invstd), torch.float32)


# ---- through the core: gradients, torch values, compile -----------------------------------

def test_end_to_end_matches_torch_float64(be):
    """bnkit.functional.batch_norm on the backend: output, gradients and running stats equal
    torch.nn.functional.batch_norm's in float64."""
    x = make((4, 3, 6, 5), 1, True, torch.float64).requires_grad_()
    assert kernels.select(x, 1) is be
    w, b = (v.requires_grad_() for v in vectors(3, torch.float64))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, training=True)
    y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training=True)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), dy),
                         torch.autograd.grad(y2, (x, w, b), dy)):
        close(got, want, torch.float64)
    close(y, y2, torch.float64)
    close(rm, rm2, torch.float64)
    close(rv, rv2, torch.float64)


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("cl,axis", [(False, 1), (True, 1), (False, -1)])
def test_gradcheck_and_gradgradcheck(be, python_ops, cl, axis, act):
    """The backend's forward and backward through the core's autograd.Function (the C++
    node: tests/test_native.py), and double backward through the differentiable formulas."""
    if CHILD:
        pytest.skip("too many calls for the interpreter")
    x = make((3, 4, 3, 2), axis, cl, torch.float64).requires_grad_()
    assert kernels.select(x, axis % 4) is be
    c = x.shape[axis]
    w, b = (v.requires_grad_() for v in vectors(c, torch.float64))

    def f(x, w, b):
        return BF.batch_norm(x, None, None, w, b, training=True, axis=axis, act=act)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_equals_eager(be):
    """torch.compile(fullgraph=True) runs the backend inside the graph (the custom ops are
    opaque to it): the same output and gradients as eager."""
    if CHILD:
        pytest.skip("compile is not run under the interpreter")
    x = make((8, 4, 5, 5), 1, False, torch.float32).requires_grad_()
    w, b = (v.requires_grad_() for v in vectors(4, torch.float32))

    def f(x, w, b):
        return BF.batch_norm(x, None, None, w, b, training=True, act="relu")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, yc = f(x, w, b), compiled(x, w, b)
    close(yc, y, torch.float32)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(yc, (x, w, b), dy),
                         torch.autograd.grad(y, (x, w, b), dy)):
        close(got, want, torch.float32)


# ---- numerical guarantees on each backend ---------------------------------------------------

@pytest.mark.parametrize("shape,cl", [((4096, 4), False), ((16, 4, 16, 16), False),
                                      ((16, 4, 16, 16), True), ((2, 2, 70000), False)],
                         ids=str)
def test_off_centre_float32_within_one_ulp_of_the_mean(be, shape, cl):
    if CHILD and math.prod(shape) > 5000:
        pytest.skip("too large for the interpreter")
    x = make(shape, 1, cl, torch.float32, seed=3, loc=1e4, scale=1.0)
    assert kernels.select(x, 1) is be
    y = BF.batch_norm(x, training=True)
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    mean = xd.mean(dims, keepdim=True)
    want = (xd - mean) / torch.sqrt(((xd - mean) ** 2).mean(dims, keepdim=True) + 1e-5)
    err = (y.double() - want).abs().max().item()
    assert err <= EPS32 * 2 ** math.floor(math.log2(1e4))  # one float32 ulp of the mean
    assert err <= 4 * EPS32 * want.abs().max().item()  # in fact the output's own rounding


@pytest.mark.parametrize("value", [1e7, -3.5, 123.456])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,cl", [((4, 3, 5, 5), False), ((4, 3, 5, 5), True),
                                      ((2, 3, 40000), False)], ids=str)
def test_constant_input_gives_exactly_the_bias(be, value, dtype, shape, cl):
    if CHILD and (math.prod(shape) > 5000 or value != -3.5):
        pytest.skip("too large for the interpreter")
    x = torch.full(shape, value, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    w = torch.tensor([0.5, 2.0, -1.0], dtype=dtype)
    b = torch.tensor([0.25, -3.0, 7.5], dtype=dtype)
    y = BF.batch_norm(x, None, None, w, b, training=True)
    view = [1, 3] + [1] * (len(shape) - 2)
    assert torch.equal(y, b.view(view).expand_as(x))


# ---- InPlaceABN's kernels (optional: abn_forward, abn_backward_reduce / _elemt) ------------

ABN_ACTS = [("leaky_relu", 0.1), ("elu", 0.7), ("identity", 0.01)]


def _abn_oracle(x, dy, w, b, axis, act, p, training, rm, rv, eps=1e-5):
    """BN then the activation, in float64 with torch's own functions: (y, sum dz,
    sum dz (x - mu), dx, dx's term scale, mean, var) (training: batch statistics; eval: the
    running ones)."""
    f = torch.nn.functional
    xd = x.double().movedim(axis, 1).requires_grad_()
    act_fn = {"leaky_relu": lambda z: f.leaky_relu(z, p), "elu": lambda z: f.elu(z, p),
              "identity": lambda z: z}[act]
    zd = f.batch_norm(xd, rm.double().clone(), rv.double().clone(), w.double(), b.double(),
                      training, 0.0, eps)
    z = zd.detach().requires_grad_()
    y = act_fn(z)
    g = dy.double().movedim(axis, 1)
    dz, = torch.autograd.grad(y, z, g)
    dx, = torch.autograd.grad(zd, xd, dz)
    dims = [d for d in range(x.dim()) if d != 1]
    if training:
        mean, var = xd.detach().mean(dims), xd.detach().var(dims, unbiased=False)
    else:
        mean, var = rm.double(), rv.double()
    view = [1, -1] + [1] * (x.dim() - 2)
    xmu = xd.detach() - mean.view(view)
    scale = (dz.abs() * (w.double().abs() * (var + eps).rsqrt()).view(view)).max().item()
    back = lambda t: t.movedim(1, axis)
    return (back(y.detach()), dz.sum(dims), (dz * xmu).sum(dims), back(dx), scale,
            (dz.abs() * xmu.abs()).sum(dims).max().item(), mean, var)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_inplace_abn_kernels_match_bn_then_activation(be, shape, axis, cl, dtype):
    """y written in place and out of place, the statistics and the running blend, the sums
    and dx from y alone: BN + leaky_relu / elu / identity in float64 (weights of both signs)."""
    if not hasattr(be, "abn_forward"):
        pytest.skip(f"{be.NAME} has no InPlaceABN kernels")
    x = make(shape, axis, cl, dtype)
    dy = make(shape, axis, cl, dtype, seed=5, loc=0.1, scale=1.0)
    c = shape[axis]
    w, b = vectors(c, dtype)
    w = torch.where(w < 0, w - 0.3, w + 0.3)  # mixed signs, away from 0 (near zero: the layer)
    count = torch.tensor(float(x.numel() // c), dtype=torch.float64)
    runs = [(a, p, t) for a, p in ABN_ACTS for t in (True, False)]
    if CHILD:  # the interpreter is slow: each activation once, eval once
        runs = [runs[0], runs[2], runs[5]]
    for act, p, training in runs:
        rm, rv = vectors(c, dtype, seed=2)
        rv = rv.abs() + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        y_w, sdz_w, sdzx_w, dx_w, dx_scale, sum_scale, mean_w, var_w = _abn_oracle(
            x, dy, w, b, axis, act, p, training, rm0, rv0)
        out = torch.empty_like(x)
        mean, var, invstd, blended = be.abn_forward(
            x, out, w, b, rm, rv, None, training, 1e-5, axis, act, p,
            0.1 if training else None)
        close(out.double(), y_w, dtype)
        assert out.stride() == x.stride()
        close(mean.double(), mean_w, dtype, mean_w.abs().max().item() + 1)
        close(var.double(), var_w, dtype)
        close(invstd.double(), (var_w + 1e-5).rsqrt(), dtype)
        n = x.numel() // c
        if blended:
            close(rm.double(), rm0.double() * 0.9 + 0.1 * mean_w, dtype)
            close(rv.double(), rv0.double() * 0.9 + 0.1 * var_w * n / (n - 1), dtype)
        else:
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        inplace = x.clone()
        be.abn_forward(inplace, inplace, w, b, rm0, rv0, (mean, var), training, 1e-5, axis,
                       act, p, None)
        assert torch.equal(inplace, out)  # in place: the same values
        sums = be.abn_backward_reduce(dy, out, w, b, invstd, axis, act, p)
        close(sums[0].double(), sdz_w, dtype, sum_scale)
        close(sums[1].double(), sdzx_w, dtype, sum_scale)
        dx = be.abn_backward_elemt(dy, out, w, b, invstd, *sums, count, axis, act, p,
                                   training)
        assert dx.dtype == dtype and dx.stride() == x.stride()
        close(dx.double(), dx_w, dtype, dx_scale)


@pytest.mark.parametrize("act,p", [("leaky_relu", 0.2), ("elu", 1.0)])
def test_inplace_abn_layer_on_the_backend(be, act, p):
    """InPlaceABN through its Function on the backend (input overwritten): output, input /
    weight / bias gradients and running statistics equal torch's BN + activation in float64."""
    from bnkit.nn import InPlaceABN
    f = torch.nn.functional
    x = make((4, 3, 5), 1, False, torch.float64).requires_grad_()
    dy = make((4, 3, 5), 1, False, torch.float64, seed=4)
    w, b = vectors(3, torch.float64)
    abn = InPlaceABN(3, act, p, dtype=torch.float64)
    with torch.no_grad():
        abn.weight.copy_(w)
        abn.bias.copy_(b)
    h = x * 1
    assert kernels.select(h, 1) is be
    y = abn(h)
    assert y is h
    (y * dy).sum().backward()
    xr = x.detach().clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    z = f.batch_norm(xr, rm, rv, wr, br, True)
    yr = f.leaky_relu(z, p) if act == "leaky_relu" else f.elu(z, p)
    (yr * dy).sum().backward()
    for got, want in ((y, yr), (x.grad, xr.grad), (abn.weight.grad, wr.grad),
                      (abn.bias.grad, br.grad), (abn.running_mean, rm), (abn.running_var, rv)):
        close(got.detach(), want.detach(), torch.float64)
