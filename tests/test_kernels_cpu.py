"""The 'cpu' (numba) backend against the reference backend, and the dispatch around it.

Every primitive is compared with the reference primitive (the oracle) on the same inputs:
float64 within 1e-10 and float32 within 1e-5, relative to the largest reference value.
Shapes cover C = 1, two values per channel, odd sizes, C = 4099, channels-last 4D/5D,
other channel axes, inputs large enough for the multi-thread and chunk-merge paths, and
inputs the backend does not take (they must still come out right, via the reference).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("numba")

import bnkit
import bnkit.functional as BF
from bnkit import kernels
from bnkit.kernels import cpu, cpu_cache, cpu_layout
from bnkit.kernels import reference as ref

EPS32 = torch.finfo(torch.float32).eps
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, axis, channels-last memory format?)
CASES = [((6, 1, 7), 1, False), ((2, 3), 1, False), ((1, 5, 2), 1, False),
         ((3, 5, 7, 11), 1, False), ((3, 4099), 1, False), ((2, 4099, 3), 1, False),
         ((4, 6, 5, 3), 1, True), ((2, 4, 3, 5, 2), 1, True), ((4, 7, 6), 2, False),
         ((5, 3, 4), 0, False), ((3, 2, 20000), 1, False), ((1, 1, 70001), 1, False),
         ((40000, 3), 1, False), ((8, 16, 24, 24), 1, True)]


@pytest.fixture(autouse=True)
def _auto_backend_after():
    yield
    kernels.set_backend("auto")


@pytest.fixture
def fast_small(monkeypatch):
    """Let dispatch pick the cpu backend even for tiny inputs."""
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)


def make(shape, axis, cl, dtype, seed=0, loc=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    return x.contiguous(memory_format=CL[len(shape)]) if cl else x


def close(got, want, dtype, scale=None):
    """|got - want| <= tol * scale, scale = max|want| unless given (same dtype and shape)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.abs().max().item() if scale is None else scale
    bound = TOL[dtype] * max(scale, 1e-30)
    assert (got - want).abs().max().item() <= bound


def vectors(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(c, generator=g, dtype=torch.float64).to(dtype))


# ---- every primitive equals the reference ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_forward_primitives_match_reference(shape, axis, cl, dtype):
    x = make(shape, axis, cl, dtype)
    assert cpu_layout.resolve(x, axis) is not None  # the kernels really run
    got, want = cpu.batch_stats(x, axis), ref.batch_stats(x, axis)
    assert got.count.item() == want.count.item() and got.count.dtype == torch.float64
    close(got.mean, want.mean, dtype)
    close(got.var, want.var, dtype)
    invstd = torch.rsqrt(want.var + 1e-5)
    for w, b in [(None, None), vectors(shape[axis], dtype)]:
        for act in ("identity", "relu"):
            y = cpu.normalize(x, want.mean, invstd, w, b, axis, act)
            close(y, ref.normalize(x, want.mean, invstd, w, b, axis, act), dtype)
            assert y.stride() == x.stride()  # memory format kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_backward_primitives_match_reference(shape, axis, cl, dtype):
    x = make(shape, axis, cl, dtype)
    dy = make(shape, axis, cl, dtype, seed=5, loc=0.1, scale=1.0)
    count, mean, var = ref.batch_stats(x, axis)
    invstd = torch.rsqrt(var + 1e-5)
    sums = cpu.backward_reduce(dy, x, mean, axis)
    for got, want in zip(sums, ref.backward_reduce(dy, x, mean, axis)):
        close(got, want, dtype)
    for w, b in [(None, None), vectors(shape[axis], dtype)]:
        for training in (True, False):
            dx = cpu.backward_elemt(dy, x, mean, invstd, w, *sums, count, axis, None, training)
            want = ref.backward_elemt(dy, x, mean, invstd, w, *sums, count, axis, None,
                                      training)
            close(dx, want, dtype, _dx_scale(dy, x, mean, invstd, w, *sums, count))
            assert dx.stride() == x.stride()
        dz = cpu.act_backward(dy, x, mean, invstd, w, b, axis, "relu")
        close(dz, ref.act_backward(dy, x, mean, invstd, w, b, axis, "relu"), dtype)
    assert cpu.act_backward(dy, x, mean, invstd, None, None, axis, "identity") is dy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis,cl", CASES, ids=str)
def test_fused_backward_matches_three_reference_steps(shape, axis, cl, dtype):
    x = make(shape, axis, cl, dtype)
    dy = make(shape, axis, cl, dtype, seed=7, loc=-0.2, scale=1.5)
    count, mean, var = ref.batch_stats(x, axis)
    invstd = torch.rsqrt(var + 1e-5)
    for (w, b), training, act in [((None, None), True, "identity"),
                                  (vectors(shape[axis], dtype), True, "identity"),
                                  (vectors(shape[axis], dtype), False, "identity"),
                                  (vectors(shape[axis], dtype), True, "relu")]:
        dx, s_dy, s_dyx = cpu.fused_backward(dy, x, mean, invstd, w, b, count, axis, None,
                                             training, act)
        dz = ref.act_backward(dy, x, mean, invstd, w, b, axis, act)
        sums = ref.backward_reduce(dz, x, mean, axis)
        close(s_dy, sums[0], dtype)
        close(s_dyx, sums[1], dtype)
        want = ref.backward_elemt(dz, x, mean, invstd, w, *sums, count, axis, None, training)
        close(dx, want, dtype, _dx_scale(dz, x, mean, invstd, w, *sums, count))


def test_fused_backward_takes_the_one_kernel_path_for_nchw(monkeypatch):
    x, dy = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    lay = cpu_layout.resolve(x, 1)
    assert cpu._fusable(lay, 2, 4) and not cpu._fusable(lay, 3, 4)  # 8 channels, 3 threads
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert not cpu._fusable(cpu_layout.resolve(nhwc, 1), 2, 4)
    calls = []
    real = cpu.K.cf_fused_bwd
    monkeypatch.setattr(cpu.K, "cf_fused_bwd", lambda *a: (calls.append(1), real(*a))[1])
    count, mean, var = ref.batch_stats(x, 1)
    invstd = torch.rsqrt(var + 1e-5)
    for training, act, used in [(True, "identity", 1), (False, "identity", 0),
                                (True, "relu", 0)]:
        calls.clear()
        cpu.fused_backward(dy, x, mean, invstd, None, None, count, 1, None, training, act)
        assert len(calls) == used, (training, act)


def _dx_scale(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count):
    """Largest term of dx = a dy + k (x - mean) + c: dx itself can cancel to ~0 (e.g. two
    values per channel), so rounding is bounded relative to the terms."""
    a = invstd * (1 if w is None else w.double())
    n = count.item()
    k, c = a * invstd ** 2 * sum_dy_xmu / n, a * sum_dy / n
    axis = next(d for d in range(x.dim()) if x.shape[d] == a.shape[0])
    view = [1] * x.dim()
    view[axis] = -1
    xmu = x.double() - mean.view(view)
    terms = (dy.double() * a.view(view)).abs() + (xmu * k.view(view)).abs() + c.abs().view(view)
    return terms.max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_delegated_cases_match_reference(dtype):
    """Masks, silu/gelu and a dy laid out unlike x run on the reference inside the call."""
    x = make((4, 3, 10), 1, False, dtype)
    mask = (torch.arange(10) < 7).expand(4, 10).unsqueeze(1)
    got, want = cpu.batch_stats(x, 1, mask), ref.batch_stats(x, 1, mask)
    assert got.count.item() == want.count.item() == 28
    close(got.mean, want.mean, dtype)
    count, mean, var = want
    invstd = torch.rsqrt(var + 1e-5)
    for act in ("silu", "gelu"):
        close(cpu.normalize(x, mean, invstd, None, None, 1, act),
              ref.normalize(x, mean, invstd, None, None, 1, act), dtype)
    dy = torch.ones(1, 1, 1, dtype=dtype).expand_as(x)  # stride 0, as from y.sum()
    sums = cpu.backward_reduce(dy, x, mean, 1)
    close(sums[1], ref.backward_reduce(dy, x, mean, 1)[1], dtype)
    dx = cpu.backward_elemt(dy, x, mean, invstd, None, *sums, count, 1, mask, True)
    close(dx, ref.backward_elemt(dy, x, mean, invstd, None, *sums, count, 1, mask, True), dtype)


@pytest.mark.parametrize("view", ["transpose", "slice", "expand"])
def test_non_contiguous_routes_to_reference_and_is_right(view):
    base = make((6, 4, 9), 1, False, torch.float64)
    x = {"transpose": base.transpose(0, 2), "slice": base[:, :, ::2],
         "expand": base[:1].expand(5, 4, 9)}[view]
    assert not cpu.supports(x, 1, None) and cpu_layout.resolve(x, 1) is None
    assert kernels.select(x, 1) is ref
    got, want = cpu.batch_stats(x, 1), ref.batch_stats(x, 1)
    close(got.var, want.var, torch.float64)
    invstd = torch.rsqrt(want.var + 1e-5)
    close(cpu.normalize(x, want.mean, invstd), ref.normalize(x, want.mean, invstd),
          torch.float64)


def test_end_to_end_matches_torch_float64(fast_small):
    """bnkit.functional.batch_norm on the cpu backend: output, gradients and running stats
    equal torch.nn.functional.batch_norm's in float64."""
    kernels.set_backend("cpu")
    x = make((4, 3, 6, 5), 1, True, torch.float64).requires_grad_()
    assert kernels.select(x, 1) is cpu
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
def test_gradcheck_through_fast_path(fast_small, python_ops, monkeypatch, cl, axis, act):
    """The one-call forward and backward, relu's derivative included (the Python
    autograd.Function path; tests/test_native.py checks the native node)."""
    kernels.set_backend("cpu")
    calls = []
    for name in ("fused_forward", "fused_backward_op", "backward_reduce", "backward_elemt"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _f=real, _n=name, **k: (calls.append(_n),
                                                                         _f(*a, **k))[1])
    x = make((3, 4, 3, 2), axis, cl, torch.float64).requires_grad_()
    c = x.shape[axis]
    w, b = (v.requires_grad_() for v in vectors(c, torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True, axis=axis, act=act),
        (x, w, b))
    assert {"fused_forward", "fused_backward_op"} <= set(calls)
    assert not {"backward_reduce", "backward_elemt"} & set(calls)  # relu's too: one call


# ---- numerical guarantees on this backend ---------------------------------------------------

@pytest.mark.parametrize("shape,cl", [((4096, 4), False), ((16, 4, 16, 16), False),
                                      ((16, 4, 16, 16), True), ((2, 2, 70000), False)],
                         ids=str)
def test_off_centre_float32_within_one_ulp_of_the_mean(fast_small, shape, cl):
    kernels.set_backend("cpu")
    x = make(shape, 1, cl, torch.float32, seed=3, loc=1e4, scale=1.0)
    assert kernels.select(x, 1) is cpu
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
def test_constant_input_gives_exactly_the_bias(fast_small, value, dtype, shape, cl):
    kernels.set_backend("cpu")
    x = torch.full(shape, value, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    w, b = torch.tensor([0.5, 2.0, -1.0], dtype=dtype), torch.tensor([0.25, -3.0, 7.5],
                                                                     dtype=dtype)
    y = BF.batch_norm(x, None, None, w, b, training=True)
    view = [1, 3] + [1] * (len(shape) - 2)
    assert torch.equal(y, b.view(view).expand_as(x))


# ---- dispatch ------------------------------------------------------------------------------

def test_supports_and_auto_routing():
    big = torch.randn(8, 4, 16, 16)
    assert cpu.supports(big, 1, None) and kernels.select(big, 1) is cpu
    assert cpu.supports(big.contiguous(memory_format=torch.channels_last), 1, None)
    assert cpu.supports(big, 1, torch.ones(8, 16, 16, dtype=torch.bool))  # masks delegated
    tiny = torch.randn(4, 3)  # the one-call ops are faster than the reference even here
    assert cpu.supports(tiny, 1, None) and kernels.select(tiny, 1) is cpu
    assert not cpu.supports(torch.randn(0, 3), 1, None)
    for dtype in (torch.float16, torch.bfloat16):
        assert not cpu.supports(big.to(dtype), 1, None)
        assert kernels.select(big.to(dtype), 1) is ref
    meta = torch.empty(8, 4, 16, 16, device="meta")
    assert not cpu.supports(meta, 1, None) and kernels.select(meta, 1) is ref
    nhwc_axis3 = big.contiguous(memory_format=torch.channels_last)
    assert cpu_layout.resolve(nhwc_axis3, 3) is None  # channels-last buffer, other axis


def test_named_backend_falls_back_to_reference_for_unsupported(fast_small):
    kernels.set_backend("cpu")
    x = torch.randn(4, 3, 5, dtype=torch.float16)
    assert kernels.select(x, 1) is ref
    y = BF.batch_norm(x, training=True)
    want = torch.nn.functional.batch_norm(x.float(), None, None, training=True).half()
    torch.testing.assert_close(y, want, atol=2e-3, rtol=0)


def test_resolve_layouts():
    assert cpu_layout.resolve(torch.empty(2, 3, 4, 5), 1) == ("cf", 2, 3, 20)
    assert cpu_layout.resolve(torch.empty(2, 3, 4, 5), 3) == ("cl", 24, 5, 1)
    assert cpu_layout.resolve(torch.empty(6, 3), 1) == ("cl", 6, 3, 1)
    nhwc = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert cpu_layout.resolve(nhwc, 1) == ("cl", 40, 3, 1)
    ndhwc = torch.empty(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    assert cpu_layout.resolve(ndhwc, 1) == ("cl", 240, 3, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_float32_statistics_with_outliers_in_first_rows(threads, monkeypatch):
    """The one-pass (M, C) float32 statistics shift by each chunk's first row: outliers
    placed exactly there (1e4 std away, 1e6 off-centre data) still give float64-accurate
    mean and variance, whatever the chunk size."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(40000, 3, generator=g, dtype=torch.float64) + 1e6).float()
    rows = cpu_layout.cl_rows(40000, 3, threads)
    x[::rows] += 1e4  # the first row of every chunk
    got, want = cpu.batch_stats(x, 1), ref.batch_stats(x, 1)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(got.var, want.var, rtol=1e-9, atol=0)


def test_resolve_agrees_with_torch_contiguity():
    """The cached, stride-only resolve() says dense exactly when torch's is_contiguous does
    (size-1 dims, permutations, slices, expands, channels-last 4D/5D)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        nd = int(torch.randint(2, 6, (1,), generator=g))
        shape = [int(s) for s in torch.randint(1, 4, (nd,), generator=g)]
        base = torch.empty(shape)
        perm = torch.randperm(nd, generator=g).tolist()
        views = [base, base.permute(perm), base.permute(perm).contiguous().permute(
            sorted(range(nd), key=perm.__getitem__))]
        if shape[-1] > 1:
            views.append(base[..., ::2])
        views.append(base[:1].expand(3, *shape[1:]))
        for x in views:
            for axis in range(x.dim()):
                fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
                dense = x.is_contiguous() or (axis == 1 and fmt is not None
                                              and x.is_contiguous(memory_format=fmt))
                assert (cpu_layout.resolve(x, axis) is not None) == dense, (x.shape,
                                                                            x.stride(), axis)


def test_large_output_keeps_format_and_values():
    """Outputs past the huge-page threshold (8 MiB) are ordinary tensors with x's strides."""
    x = make((8, 64, 64, 64), 1, True, torch.float32)
    _count, mean, var = ref.batch_stats(x, 1)
    invstd = torch.rsqrt(var + 1e-5)
    y = cpu.normalize(x, mean, invstd)
    assert y.nbytes >= 8 << 20 and y.stride() == x.stride()
    close(y, ref.normalize(x, mean, invstd), torch.float32)


def test_follows_torch_thread_count():
    import numba

    x = torch.randn(4, 8, 64, 64)
    old = torch.get_num_threads()
    try:
        for n in (1, old):
            torch.set_num_threads(n)
            cpu.batch_stats(x, 1)
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(old)


def test_set_backend_errors_leave_selection_unchanged():
    kernels.set_backend("reference")
    with pytest.raises(ValueError, match=r"unknown backend 'numba' from set_backend\(\).*'cpu'"):
        kernels.set_backend("numba")
    with pytest.raises(ValueError, match="unknown backend 3"):
        kernels.set_backend(3)
    assert kernels.get_backend() == "reference"
    bnkit.set_backend("cpu")
    assert bnkit.get_backend() == "cpu" and "cpu" in bnkit.available_backends()


@pytest.mark.skipif("triton" in kernels.available_backends(), reason="triton is available")
def test_unavailable_backend_error_names_the_fix():
    with pytest.raises(ValueError, match=r"'triton' from set_backend\(\) is not available.*"
                                         r"bnkit\[gpu\]"):
        kernels.set_backend("triton")
    assert kernels.get_backend() == "auto"


@pytest.mark.parametrize("raw,want", [("cpu", "cpu"), (" CPU ", "cpu"), ("", "auto"),
                                      ("reference", "reference"), ("auto", "auto")])
def test_env_var_selects_backend(monkeypatch, raw, want):
    monkeypatch.setenv("BNKIT_BACKEND", raw)
    monkeypatch.setattr(kernels, "_current", None)  # as in a fresh process
    assert kernels.get_backend() == want


def test_invalid_env_var_errors_on_first_use(monkeypatch):
    monkeypatch.setenv("BNKIT_BACKEND", "gpu")
    monkeypatch.setattr(kernels, "_current", None)
    x = torch.randn(8, 4, 16, 16)
    with pytest.raises(ValueError, match="unknown backend 'gpu' from the BNKIT_BACKEND "
                                         "environment variable"):
        BF.batch_norm(x, training=True)
    with pytest.raises(ValueError, match="BNKIT_BACKEND"):
        kernels.get_backend()
    kernels.set_backend("cpu")  # an explicit choice overrides the bad variable
    assert kernels.select(x, 1) is cpu


def test_status_and_warmup():
    text = cpu.warmup()
    assert text.startswith("numba ") and "compiled in this process" in text
    assert kernels.backend_status()["cpu"] == text


class _Stub:
    """Stand-in for a numba dispatcher, for cache_report's three states."""

    def __init__(self, signatures):
        self.signatures = signatures


def test_cache_report_states():
    assert cpu_cache.cache_report([_Stub([1, 2])]) == "compiled in this process"
    cold = cpu_cache.cache_report([_Stub([]), _Stub([])])
    assert cold.startswith("cold: first call compiles (~") and "warmup()" in cold
    assert str(cpu_cache.COMPILE_S) in cold


def test_package_works_without_numba():
    """With numba unimportable, bnkit imports, runs on 'reference' and names the fix."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch, bnkit\n"
        "assert bnkit.available_backends() == ['reference'], bnkit.available_backends()\n"
        "x = torch.randn(16, 4, 8, 8)\n"
        "y = bnkit.functional.batch_norm(x, training=True)\n"
        "want = torch.nn.functional.batch_norm(x, None, None, training=True)\n"
        "assert (y - want).abs().max() < 1e-5\n"
        "try:\n"
        "    bnkit.set_backend('cpu')\n"
        "except ValueError as err:\n"
        "    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'cpu' from set_backend() is not available" in out.stdout
    assert "bnkit[fast] (numba)" in out.stdout
