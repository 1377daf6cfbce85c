"""The Triton backend against the reference backend, and the GPU bench's CPU-testable logic.
The checks every backend passes are tests/test_kernels.py's conformance suite, run for Triton
in the same child process; under the interpreter this file adds only what that suite does
not cover (float16/bfloat16, masks, silu/gelu, the fused backward, layouts of dy, dispatch),
and on CUDA it runs every case.

Kernel tests run on CUDA when present ('cuda' ids), and always under Triton's interpreter on
small CPU tensors ('interp' ids). The interpreter is chosen when the kernels are defined, and
routing CPU tensors to it needs BNKIT_TRITON_ON_CPU=1, which must never leak into the other
test modules; so `test_interpreter_suite` runs the 'interp' tests in a child pytest process
with TRITON_INTERPRET=1 and BNKIT_TRITON_ON_CPU=1 set before anything imports Triton.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from argparse import ArgumentParser
from pathlib import Path

import pytest
import torch

import bnkit
from bnkit import kernels
from bnkit.bench import gpu as bench_gpu
from bnkit.bench import phases, report, timing
from bnkit.functional import batch_norm
from bnkit.functional.stats import mask_view
from bnkit.kernels import reference as ref
from bnkit.kernels import triton_layout as layout
from bnkit.kernels.triton_layout import Geometry

CHILD = os.environ.get("BNKIT_TRITON_CHILD") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]
DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(
        not CHILD, reason="runs under Triton's interpreter in a child process "
        "(test_interpreter_suite)")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        CHILD or not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")),
]
# (id, shape, channel axis, dtype, channels_last memory format)
CASES = [
    ("odd", (3, 5, 7), 1, torch.float32, False),
    ("c1", (2, 1, 3, 3), 1, torch.float32, False),
    ("two-values-cl", (2, 4), 1, torch.float32, False),
    ("two-values-cf", (1, 3, 2), 1, torch.float32, False),
    ("channels-last", (2, 3, 4, 5), 1, torch.float32, True),
    ("axis-last", (2, 4, 3), 2, torch.float32, False),
    ("float16", (3, 5, 7), 1, torch.float16, False),
    ("bfloat16-cl", (2, 5, 3, 2), 1, torch.bfloat16, True),  # two channel blocks
    ("float64", (3, 4, 5), 1, torch.float64, False),
]
CASE_IDS = [c[0] for c in CASES]
# tolerance of results in the input's dtype: one or two ulps (bfloat16: the interpreter
# rounds float32 -> bfloat16 towards zero, the GPU to nearest)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _backend():
    from bnkit.kernels import triton as tb
    return tb


def _data(case, device, seed=0):
    """(x, axis, mask with its channel axis) of one case: off-centre values, random mask."""
    _, shape, axis, dtype, cl = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    x = x.to(device, memory_format=torch.channels_last if cl else torch.preserve_format)
    mshape = [s for d, s in enumerate(shape) if d != axis]
    mask = torch.rand(mshape, generator=g) > 0.3
    mask.view(-1)[:2] = True  # at least two valid values per channel
    mask.view(-1)[2:3] = False  # and at least one padded one
    return x, axis, mask_view(mask.to(device), len(shape), axis)


def _close(a, b, tol, what=""):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=what)


def _params(x, axis, seed=1):
    c = x.shape[axis]
    g = torch.Generator().manual_seed(seed)
    st = ref.batch_stats(x, axis)
    w, b = (torch.randn(c, generator=g, dtype=x.dtype).to(x.device) for _ in range(2))
    return st, torch.rsqrt(st.var + 1e-5), w, b


def _dy(x, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)


# ---- the kernels against the reference backend ---------------------------------------------

MASKED = [CASES[i] for i in (0, 1, 4, 7)]  # CF, C = 1, CL, CL with two channel blocks
SHARED = (torch.float32, torch.float64)  # what tests/test_kernels.py already runs in the child


def grid(*variants):
    """(device, case, *rest) params for each variant (case, *rest, masked) on each device,
    without the interpreter runs that the conformance suite (tests/test_kernels.py, run in
    the same child) already makes: float32/float64 without a mask. Those stay on 'cuda'."""
    out = []
    for device in DEVICES:
        for case, *rest, masked in variants:
            if device.id == "interp" and case[3] in SHARED and not masked:
                continue
            tag = "-".join([case[0], *map(str, rest), *(["masked"] if masked else [])])
            out.append(pytest.param(device.values[0], case, *rest, masked,
                                    id=f"{device.id}-{tag}", marks=device.marks))
    return out


@pytest.mark.parametrize("device,case,masked",
                         grid(*[(c, False) for c in CASES], *[(c, True) for c in MASKED]))
def test_batch_stats(device, case, masked):
    x, axis, mask = _data(case, device)
    mask = mask if masked else None
    got, want = _backend().batch_stats(x, axis, mask), ref.batch_stats(x, axis, mask)
    assert got.mean.dtype == want.mean.dtype and got.var.dtype == want.var.dtype
    assert got.count.item() == want.count.item()
    tol = 1e-12 if x.dtype == torch.float64 else 1e-6  # float32 partials, float64 merge
    _close(got.mean, want.mean, tol, "mean")
    _close(got.var, want.var, tol, "var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_batch_stats_off_centre(device, channels_last):
    """|mean|/std = 1e4 in float32: the float64 oracle's mean and var to ~1e-7 relative."""
    g = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)).float().to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = _backend().batch_stats(x, 1)
    xd = x.double()
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    assert ((got.mean - mean).abs() / var.sqrt()).max() < 1e-6
    assert ((got.var - var).abs() / var).max() < 1e-6


@pytest.mark.parametrize("device,case,masked", grid(*[(c, False) for c in CASES]))
def test_normalize(device, case, masked):
    x, axis, _ = _data(case, device)
    st, invstd, w, b = _params(x, axis)
    got = _backend().normalize(x, st.mean, invstd, w, b, axis)
    assert got.dtype == x.dtype and got.stride() == x.stride()
    _close(got, ref.normalize(x, st.mean, invstd, w, b, axis), TOL[x.dtype])
    _close(_backend().normalize(x, st.mean, invstd, None, None, axis),
           ref.normalize(x, st.mean, invstd, None, None, axis), TOL[x.dtype], "no affine")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=[CASE_IDS[0], CASE_IDS[7]])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_activation_forward_and_derivative(device, case, act):
    x, axis, _ = _data(case, device)
    st, invstd, w, b = _params(x, axis)
    args = (x, st.mean, invstd, w, b, axis, act)
    _close(_backend().normalize(*args), ref.normalize(*args), TOL[x.dtype], "forward")
    dy = _dy(x)
    # the kernel takes f'(z) of the float32 z; the reference of z rounded to x's dtype
    tol = 2e-6 if x.dtype == torch.float32 else 3e-2
    _close(_backend().act_backward(dy, *args), ref.act_backward(dy, *args), tol, "dz")


@pytest.mark.parametrize("device,case,masked", grid(*[(c, False) for c in CASES]))
def test_backward_reduce(device, case, masked):
    x, axis, _ = _data(case, device)
    st = ref.batch_stats(x, axis)
    dy = _dy(x)
    got, want = _backend().backward_reduce(dy, x, st.mean, axis), ref.backward_reduce(
        dy, x, st.mean, axis)
    tol = 1e-12 if x.dtype == torch.float64 else 1e-5
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        _close(g, r, tol)


@pytest.mark.parametrize("device,case,training,masked",
                         grid(*[(c, t, False) for c in CASES for t in (True, False)],
                              *[(c, True, True) for c in MASKED]))
def test_backward_elemt(device, case, training, masked):
    x, axis, mask = _data(case, device)
    mask = mask if masked else None
    st, invstd, w, _ = _params(x, axis)
    dy = _dy(x)
    sums = ref.backward_reduce(dy, x, st.mean, axis)
    args = (dy, x, st.mean, invstd, w, *sums, st.count, axis, mask, training)
    got = _backend().backward_elemt(*args)
    assert got.dtype == dy.dtype
    _close(got, ref.backward_elemt(*args), TOL[x.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["identity", "relu", "silu", "gelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_backward(device, act, training):
    """One reduce + one elementwise pass equal act_backward, backward_reduce, backward_elemt."""
    x, axis, mask = _data(CASES[4], device)
    st, invstd, w, b = _params(x, axis)
    dy = _dy(x)
    dx, s_dy, s_dyx = _backend().fused_backward(dy, x, st.mean, invstd, w, b, st.count, axis,
                                                mask, training, act)
    dz = ref.act_backward(dy, x, st.mean, invstd, w, b, axis, act)
    r_dy, r_dyx = ref.backward_reduce(dz, x, st.mean, axis)
    want = ref.backward_elemt(dz, x, st.mean, invstd, w, r_dy, r_dyx, st.count, axis, mask,
                              training)
    _close(s_dy, r_dy, 1e-5, "sum_dy")
    _close(s_dyx, r_dyx, 1e-5, "sum_dy_xmu")
    _close(dx, want, 1e-5, "dx")


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_in_another_layout(device):
    """An expanded (stride 0) or contiguous dy for a channels-last x is copied, not misread."""
    x, axis, _ = _data(CASES[4], device)
    st, invstd, w, _ = _params(x, axis)
    for dy in (torch.ones(1, device=device).expand(x.shape), _dy(x).contiguous()):
        sums = _backend().backward_reduce(dy, x, st.mean, axis)
        for g, r in zip(sums, ref.backward_reduce(dy, x, st.mean, axis)):
            _close(g, r, 1e-5)
        args = (dy, x, st.mean, invstd, w, *sums, st.count, axis, None, True)
        _close(_backend().backward_elemt(*args), ref.backward_elemt(*args), 2e-6)


@pytest.fixture
def restore_backend():
    previous = kernels.get_backend()
    yield
    bnkit.set_backend(previous)


def _run_bn(backend, x, training, act):
    """(y, running_mean, running_var, dx, dweight, dbias) of batch_norm under `backend`."""
    bnkit.set_backend(backend)
    c = x.shape[1]
    g = torch.Generator().manual_seed(4)
    xr = x.detach().clone().requires_grad_()
    w = torch.randn(c, generator=g, dtype=x.dtype).to(x.device).requires_grad_()
    b = torch.randn(c, generator=g, dtype=x.dtype).to(x.device).requires_grad_()
    rm = torch.randn(c, generator=g, dtype=x.dtype).to(x.device)
    rv = torch.rand(c, generator=g, dtype=x.dtype).to(x.device) + 0.5
    y = batch_norm(xr, rm, rv, w, b, training=training, act=act)
    grads = torch.autograd.grad(y, (xr, w, b), _dy(x, seed=5))
    return (y, rm, rv, *grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_batch_norm_end_to_end(device, dtype, training, act, restore_backend):
    """bnkit.functional.batch_norm with the backend forced: outputs, running stats, grads."""
    x = _data(("e2e", (4, 3, 5), 1, dtype, False), device)[0]
    bnkit.set_backend("triton")
    assert kernels.select(x, 1, None).NAME == "triton"
    got = _run_bn("triton", x, training, act)
    want = _run_bn("reference", x, training, act)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, g, r in zip(("y", "running_mean", "running_var", "dx", "dw", "db"), got, want):
        _close(g, r, tol, name)


def _run_abn(backend, x, act, training, channels_last):
    """(y, running_var, dx, dweight, dbias) of InPlaceABN under `backend` (input overwritten)."""
    from bnkit.nn import InPlaceABN
    bnkit.set_backend(backend)
    c = x.shape[1]
    abn = InPlaceABN(c, act, 0.3).to(x.device).train(training)
    with torch.no_grad():
        abn.weight.copy_(torch.linspace(-1.5, 2.0, c))
        abn.bias.copy_(torch.linspace(0.4, -0.6, c))
    xr = x.clone().requires_grad_()
    h = xr * 1
    y = abn(h)
    assert y is h and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = _dy(x, seed=3)
    dx, dw, db = torch.autograd.grad(y, (xr, abn.weight, abn.bias), dy)
    return y.detach(), abn.running_var.clone(), dx, dw, db


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("float16", "bfloat16-cl",
                                                                "channels-last", "float64")],
                         ids=["channels-last", "float16", "bfloat16-cl", "float64"])
@pytest.mark.parametrize("act,training", [("leaky_relu", True), ("elu", False)])
def test_inplace_abn_kernels_in_every_dtype(device, case, act, training, restore_backend):
    """InPlaceABN on the triton kernels against the same layer on the reference backend
    (half precision computed in float32 on both): output, running variance, gradients."""
    x = _data(case, device)[0]
    bnkit.set_backend("triton")
    assert kernels.select(x, 1, None).NAME == "triton"
    got = _run_abn("triton", x, act, training, case[4])
    want = _run_abn("reference", x, act, training, case[4])
    tol = 4 * TOL[case[3]]
    for name, g, r in zip(("y", "running_var", "dx", "dw", "db"), got, want):
        _close(g, r, tol * (1 + r.abs().max().item()), name)


# ---- dispatch rules, status and errors -----------------------------------------------------

@pytest.mark.skipif(not CHILD, reason="needs the interpreter: runs in the child process")
def test_interp_supports_needs_the_opt_in(monkeypatch):
    """The interpreter runs CPU tensors only with BNKIT_TRITON_ON_CPU=1."""
    tb, x = _backend(), torch.randn(4, 3)
    assert tb.available() and tb.supports(x, 1, None)
    assert "interpreter" in tb.status() and "CPU tensors on" in tb.status()
    monkeypatch.delenv(tb.ON_CPU_ENV)
    assert not tb.supports(x, 1, None)
    assert kernels.select(x, 1, None).NAME != "triton"
    assert "set BNKIT_TRITON_ON_CPU=1" in tb.status()


@pytest.mark.skipif(not CHILD, reason="needs the interpreter: runs in the child process")
def test_interp_unsupported_inputs_route_elsewhere():
    tb = _backend()
    x = torch.randn(4, 3, 6)
    assert tb.supports(x, 1, torch.ones(4, 1, 6, dtype=torch.bool))
    assert not tb.supports(x, 1, torch.ones(4, 1, 6))  # a float mask
    assert not tb.supports(x.int(), 1, None)
    assert not tb.supports(torch.randn(0, 3), 1, None)
    sliced = x[:, :, ::2]  # not dense: neither NCHW-contiguous nor channels-last
    assert not tb.supports(sliced, 1, None)
    with pytest.raises(ValueError, match=r"dense NCHW-contiguous or channels-last.*strides "
                                         r"\(18, 6, 2\).*x.contiguous\(\)"):
        tb.batch_stats(sliced, 1)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        tb.normalize(x, torch.zeros(3), torch.ones(3), act="tanh")


@pytest.mark.skipif(CHILD or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="checks a process without the interpreter")
def test_cpu_runs_never_use_the_interpreter():
    x = torch.randn(4, 3, 5)
    assert kernels.select(x, 1, None).NAME != "triton"
    if HAS_TRITON:
        tb = _backend()
        assert not tb.supports(x, 1, None)
        assert tb.status().startswith("triton ")


@pytest.mark.skipif(CHILD or not HAS_TRITON, reason="the parent process starts the suite")
def test_interpreter_suite():
    """Run every 'interp' test in a child process with the interpreter enabled."""
    env = {k: v for k, v in os.environ.items() if k != "BNKIT_BACKEND"}
    env.update(TRITON_INTERPRET="1", BNKIT_TRITON_ON_CPU="1", BNKIT_TRITON_CHILD="1")
    conformance = str(ROOT / "tests" / "test_kernels.py")  # the suite every backend passes
    for path, key in ((__file__, "interp"), (conformance, "triton")):
        cmd = [sys.executable, "-m", "pytest", path, "-q", "-k", key, "-p",
               "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=900, check=False)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
        assert " passed" in res.stdout and "failed" not in res.stdout


_COMPILE = [  # (kernel, pointer dtypes, constexprs): one per kernel, the widest options
    ("stats_kernel", {"x_ptr": "*fp32", "m_ptr": "*u8", "pos_ptr": "*i64",
                      "part_ptr": "*fp32", "shift_ptr": "*fp32"},
     {"CL": True, "HAS_MASK": True, "BLOCK_R": 64, "BLOCK_K": 64}),
    ("reduce_kernel", {"x_ptr": "*bf16", "dy_ptr": "*bf16", "vec_ptr": "*fp32",
                       "part_ptr": "*fp32"},
     {"CL": False, "ACT": 3, "BLOCK_R": 4, "BLOCK_K": 1024}),
    ("elementwise_kernel", {"x_ptr": "*fp16", "dy_ptr": "*fp16", "m_ptr": "*u8",
                            "vec_ptr": "*fp32", "out_ptr": "*fp16"},
     {"CL": True, "OP": 2, "ACT": 2, "CORR": True, "HAS_MASK": True, "BLOCK_R": 64,
      "BLOCK_K": 64}),
    ("abn_forward_kernel", {"x_ptr": "*fp16", "out_ptr": "*fp16", "vec_ptr": "*fp32"},
     {"CL": False, "ACT": 2, "BLOCK_R": 4, "BLOCK_K": 1024}),
    ("abn_reduce_kernel", {"y_ptr": "*bf16", "dy_ptr": "*bf16", "vec_ptr": "*fp32",
                           "part_ptr": "*fp32"},
     {"CL": True, "ACT": 2, "BLOCK_R": 64, "BLOCK_K": 64}),
    ("abn_dx_kernel", {"y_ptr": "*fp64", "dy_ptr": "*fp64", "vec_ptr": "*fp64",
                       "out_ptr": "*fp64"},
     {"CL": False, "ACT": 1, "CORR": True, "BLOCK_R": 4, "BLOCK_K": 1024}),
]


@pytest.mark.skipif(CHILD or not HAS_TRITON, reason="compiles with Triton's CUDA compiler")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name,pointers,constants", _COMPILE, ids=[c[0] for c in _COMPILE])
def test_kernels_compile_for_hopper_without_a_gpu(name, pointers, constants):
    """The real compiler path (to a cubin for sm_90), which the interpreter never takes."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {err}")
    fn = getattr(__import__("bnkit.kernels.triton_kernels", fromlist=["x"]), name)
    if not hasattr(fn, "arg_names"):
        pytest.skip("kernels were defined for the interpreter in this process")
    sig = {a: pointers.get(a, "constexpr" if a in constants else "i32") for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "ld.global" in compiled.asm["ptx"] and compiled.asm["cubin"]


# ---- layout: how tensors fold into the kernels' 2-D views ----------------------------------

def _geom(t, axis=1):
    return layout.geometry(t.shape, t.stride(), axis)


def test_geometry_of_common_layouts():
    x = torch.empty(2, 3, 4, 5)
    assert _geom(x) == Geometry(False, 2, 20, 3, 60, 20)
    assert _geom(x.to(memory_format=torch.channels_last)) == Geometry(True, 40, 3, 3, 3, 1)
    assert _geom(torch.empty(6, 5)) == Geometry(True, 6, 5, 5, 5, 1)
    assert _geom(torch.empty(2, 1, 3, 3)) == Geometry(False, 1, 18, 1, 0, 0)  # C=1: one row
    assert _geom(torch.empty(2, 4, 3), axis=2) == Geometry(True, 8, 3, 3, 3, 1)
    assert _geom(torch.empty(2, 4, 3), axis=-1) == Geometry(True, 8, 3, 3, 3, 1)
    assert _geom(torch.empty(4, 3, 1, 1)) == Geometry(True, 4, 3, 3, 3, 1)
    assert _geom(torch.empty(3, 6).t()) == Geometry(False, 1, 6, 3, 0, 6)  # (N, C), rows contiguous
    assert _geom(torch.empty(2, 3, 8)[:, :, ::2]) is None
    assert _geom(torch.empty(2, 3, 4, 5).permute(0, 2, 1, 3)) is None  # (N, H, C, W) strides


def test_geometry_mask_strides_follow_logical_order():
    assert Geometry(False, 2, 20, 3, 60, 20).mask_strides == (20, 1)
    assert Geometry(True, 40, 3, 3, 3, 1).mask_strides == (1, 0)


def test_is_dense():
    x = torch.empty(2, 3, 4, 5)
    assert layout.is_dense(x.shape, x.stride())
    cl = x.to(memory_format=torch.channels_last)
    assert layout.is_dense(cl.shape, cl.stride())
    assert not layout.is_dense((2, 3, 4), x[:, :, ::2, 0].stride())
    assert not layout.is_dense((2, 3), (0, 1))  # expanded


@pytest.mark.parametrize("g", [Geometry(False, 37, 1000, 5, 5000, 1000),
                               Geometry(True, 1001, 70, 70, 70, 1),
                               Geometry(False, 1, 7, 1, 0, 0)], ids=["cf", "cl", "tiny"])
@pytest.mark.parametrize("limits", [(4, 8, 15), (1024, 4096, 528), (64, 4096, 528)])
def test_plan_covers_every_row_and_column_once(g, limits):
    p = layout.plan(g, *limits)
    assert p.block_k & (p.block_k - 1) == 0 and p.block_k <= max(limits[0], 1)
    assert p.rows_per % p.block_r == 0 and p.cols_per % p.block_k == 0
    assert p.rows_per * p.splits_r >= g.rows > p.rows_per * (p.splits_r - 1)
    if g.channels_last:
        assert p.splits_k == 1 and p.lanes * p.block_k >= g.channels
    else:
        assert p.cols_per * p.splits_k >= g.cols > p.cols_per * (p.splits_k - 1)
        assert p.lanes == g.channels
    assert p.parts == p.splits_r * p.splits_k


# ---- the GPU bench: logic testable without a GPU -------------------------------------------

def test_interleaved_medians_rotates_the_order():
    calls, times = [], {"a": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 30.0, 20.0])}

    def timer(fn):
        calls.append(fn())
        return next(times[calls[-1]])
    got = timing.interleaved_medians({"a": lambda: "a", "b": lambda: "b"}, 3, timer)
    assert got == {"a": 2.0, "b": 20.0}
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_make_row_bandwidth_and_percentage():
    nbytes = 64 * 2**20
    row = report.make_row((4096, 4096), "float32", "nchw", "fwd+bwd", "bnkit", ms=0.4,
                             torch_ms=0.5, nbytes=nbytes, copy_ms=0.05)
    gbps = 8 * nbytes / 0.4e6  # 8 tensor passes in 0.4 ms
    assert row["gbps"] == pytest.approx(gbps)
    assert row["pct_copy"] == pytest.approx(100 * gbps / (2 * nbytes / 0.05e6))
    assert row["x_torch"] == pytest.approx(1.25) and row["shape"] == "4096x4096"
    text = report.format_table([row, dict(row, variant="torch", ms=0.5, x_torch=1.0)])
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["shape", "dtype", "layout", "phase", "variant"]
    assert lines[1].split() == ["4096x4096", "float32", "nchw", "fwd+bwd", "bnkit", "0.4000",
                                "1.25", f"{gbps:.0f}", f"{row['pct_copy']:.1f}"]
    assert lines[2].split()[4:7] == ["torch", "0.5000", "1.00"]


def test_cases_and_shapes():
    got = bench_gpu.cases([(2, 3, 4, 5), (8, 4)], ["float32"], ["nchw", "channels_last"])
    assert got == [((2, 3, 4, 5), "float32", "nchw"), ((2, 3, 4, 5), "float32", "channels_last"),
                   ((8, 4), "float32", "nchw")]
    assert phases.parse_shape("64x256x56x56") == (64, 256, 56, 56)
    with pytest.raises(ValueError, match=r"at least N and C.*got '64'.*4096x4096"):
        phases.parse_shape("64")
    with pytest.raises(ValueError, match=r"got '8xa'"):
        phases.parse_shape("8xa")


def test_gpu_bench_case_logic_on_cpu(restore_backend):
    """Every phase and variant of one case runs (reference backend, host clock) and the
    rows compare each variant with its baseline."""
    args = bench_gpu.add_gpu_arguments(ArgumentParser()).parse_args(
        ["--repeats", "2", "--warmup", "1", "--no-compile"])
    before = kernels.get_backend()
    rows = bench_gpu.run_case((4, 3, 2, 2), torch.float32, "channels_last", args, device="cpu",
                              backend="reference", make_timer=lambda inner: timing.perf_timer())
    assert [(r["phase"], r["variant"]) for r in rows] == (
        [(p, v) for p in phases.PHASES for v in ("bnkit", "torch")]
        + [(p, v) for p in ("forward", "fwd+bwd") for v in bench_gpu.ACT_VARIANTS])
    assert all(r["ms"] > 0 and r["pct_copy"] > 0 for r in rows)
    assert all(r["x_torch"] == 1.0 for r in rows if r["variant"] in ("torch", "torch bn, relu"))
    assert kernels.get_backend() == before  # the bench restores the selected backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_gpu_bench_without_cuda_says_why(capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"needs a CUDA device.*is_available\(\) is False.*"
                                         r"--device cpu"):
        bench_gpu.run_gpu_bench(bench_gpu.add_gpu_arguments(ArgumentParser()).parse_args([]))
    script = ROOT / "benchmarks" / "bench_gpu.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--shapes", "8x4"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2 and "needs a CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON or CHILD,
                    reason="needs CUDA and Triton")
def test_gpu_bench_tiny_run(tmp_path):
    args = bench_gpu.add_gpu_arguments(ArgumentParser()).parse_args(
        ["--shapes", "8x4x4x4", "--dtypes", "float32", "--repeats", "2", "--warmup", "1",
         "--no-compile", "--json", str(tmp_path / "b.json")])
    rows = bench_gpu.run_gpu_bench(args)
    assert len(rows) == 2 * (4 * 2 + 2 * 3)  # 2 layouts x (4 phases x 2 + 2 act phases x 3)
    assert all(r["ms"] > 0 and r["pct_copy"] > 0 for r in rows)
    assert (tmp_path / "b.json").exists()
