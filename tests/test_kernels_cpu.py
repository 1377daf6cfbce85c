"""What is specific to the 'cpu' backend (bnkit._C) and the dispatch around it: layouts,
routing, the channels-last one-pass statistics, status and a package without the
extension. The checks every backend passes (parity with the reference, numerics,
gradients, compile) are in tests/test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

import bnkit
import bnkit.functional as BF
from bnkit import kernels
from bnkit.kernels import cpu_layout
from bnkit.kernels import reference as ref

cpu = pytest.importorskip("bnkit.kernels.cpu")

from test_kernels import close, make  # the conformance suite's cases and tolerances


@pytest.fixture(autouse=True)
def _auto_backend_after():
    yield
    kernels.set_backend("auto")


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


def test_named_backend_falls_back_to_reference_for_unsupported():
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


def test_channels_first_float32_statistics_with_outliers_at_every_shift():
    """The one-pass channels-first float32 statistics shift each group of at most 4096
    values by its first value. (2, 2, 70000) splits each row into two chunks of 35000 values
    (one or two threads), each into groups of 4096: an outlier 1e4 std away exactly at every
    group's first value of 1e6 off-centre data is the worst case for the shift, and mean and
    variance still come out float64-accurate (plain sums of x and x^2 would not)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 2, 70000, generator=g, dtype=torch.float64) + 1e6).float()
    for start in (0, 35000):
        x[..., start:start + 35000:4096] += 1e4
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


def test_status():
    text = cpu.status()
    assert text.startswith("C++ extension bnkit._C") and "threads" in text
    assert kernels.backend_status()["cpu"] == text


def test_package_works_without_the_extension():
    """With bnkit._C unimportable, bnkit imports, runs on 'reference' and says why, with the
    fix, in `bnkit info` and in set_backend's error."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['bnkit._C'] = None\n"
        "import torch, bnkit\n"
        "assert bnkit.available_backends() == ['reference'], bnkit.available_backends()\n"
        "x = torch.randn(16, 4, 8, 8)\n"
        "m = bnkit.nn.BatchNorm2d(4)\n"
        "y = m(x.requires_grad_())\n"
        "y.sum().backward()\n"
        "want = torch.nn.functional.batch_norm(x, None, None, training=True)\n"
        "assert (y - want).abs().max() < 1e-5 and int(m.num_batches_tracked) == 1\n"
        "from bnkit import cli\n"
        "cli.main(['info'])\n"
        "try:\n"
        "    bnkit.set_backend('cpu')\n"
        "except ValueError as err:\n"
        "    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'cpu' from set_backend() is not available" in out.stdout
    assert "bnkit._C" in out.stdout and "pip install --no-build-isolation" in out.stdout
    assert "cpu: unavailable: import failed:" in out.stdout  # bnkit info names the reason



# ---- InPlaceABN's operators --------------------------------------------------------------

def test_abn_operators_meta_kernels_give_shapes_and_dtypes():
    """The bnkit_cpu::abn_* operators trace on meta tensors (torch.compile's fake mode)."""
    ops = torch.ops.bnkit_cpu
    x = torch.empty(4, 6, 5, 5, device="meta")
    mean, var, invstd, _ = ops.abn_forward(x, x, None, None, None, None, None, None, True,
                                           1e-5, 1, "leaky_relu", 0.01, None)
    assert [t.shape for t in (mean, var, invstd)] == [(6,)] * 3 and mean.dtype == torch.float64
    s_dz, s_dzx = ops.abn_backward_reduce(x, x, None, None, invstd, 1, "elu", 1.0)
    assert s_dz.shape == s_dzx.shape == (6,) and s_dz.dtype == torch.float64
    dx = ops.abn_backward_elemt(x, x, None, None, invstd, s_dz, s_dzx, 100.0, True, 1,
                                "identity", 0.01)
    assert dx.shape == x.shape and dx.dtype == x.dtype


def test_abn_operators_refuse_what_python_routes_elsewhere():
    """cpu.abn_* decline non-dense input (the layer then runs the torch path); the operators
    themselves reject an unknown activation and an `out` laid out unlike x."""
    x = make((6, 4, 9), 1, False, torch.float64).transpose(0, 2)
    out = torch.empty_like(x)
    assert cpu.abn_forward(x, out, None, None, None, None, None, True, 1e-5, 1) is None
    assert cpu.abn_backward_reduce(x, x, None, None, torch.ones(4), 1) is None
    dense = make((6, 4, 9), 1, False, torch.float64)
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.bnkit_cpu.abn_backward_reduce(dense, dense, None, None, torch.ones(4), 1,
                                                "relu", 0.0)
    with pytest.raises(RuntimeError, match="shape, strides and dtype"):
        torch.ops.bnkit_cpu.abn_forward(dense, dense.float(), None, None, None, None, None,
                                        None, True, 1e-5, 1, "identity", 0.01, None)


def test_inplace_abn_on_a_transposed_input_runs_the_torch_path():
    from bnkit.nn import InPlaceABN
    kernels.set_backend("cpu")
    base = make((6, 4, 9), 1, False, torch.float64).requires_grad_()
    x = base.transpose(0, 2)  # (9, 4, 6), channels at 1, not dense along it for the kernels
    abn = InPlaceABN(4, "elu", 0.5, dtype=torch.float64)
    y = abn(x)
    y.pow(2).sum().backward()
    xr = base.detach().clone().requires_grad_()
    yr = torch.nn.functional.elu(torch.nn.functional.batch_norm(
        xr.transpose(0, 2), None, None, torch.ones(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64), True), 0.5)
    yr.pow(2).sum().backward()
    close(y.detach(), yr.detach(), torch.float64)
    close(base.grad, xr.grad, torch.float64)
