"""Numerical guarantees of the core: off-centre data and constant inputs.

Off-centre: float32 inputs with |mean|/std up to 1e5 normalize to within one float32 ulp of
the mean, and in fact to the precision of the output itself. torch's own kernel fails this
bound: measured with torch 2.13 (CPU) on exactly the inputs below,
torch.nn.functional.batch_norm's max error is 10.3, 9.6 and 3.0 ulps of the mean (6.3e-4,
9.4e-3, 2.3e-2) for the (4096, 4) inputs at mean 1e3, 1e4, 1e5; on the (16, 4, 16, 16)
inputs it stays inside, at 0.53-0.55 ulp (5.4e-4 at mean 1e4; up to 0.97 ulp on other
seeds). bnkit's error is 1.5e-7 to 3.3e-7 on all of them, the rounding of the float32 output.

Constant input: every value equal gives x - mean == 0 exactly, so the output is exactly
the bias; torch gives -105.1 for a constant 1e7 (and -1.5e-5 for -3.5).

Both guarantees are checked on every backend available here (the inputs are large enough
for the 'cpu' backend to take them).
"""
from __future__ import annotations

import math

import pytest
import torch
from oracles import bn_train_oracle as oracle

import bnkit
import bnkit.functional as BF
from bnkit.nn import BatchNorm1d, BatchNorm2d

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(params=bnkit.available_backends())
def backend(request):
    """Run the test on one backend, then restore the previous selection."""
    before = bnkit.get_backend()
    bnkit.set_backend(request.param)
    yield request.param
    bnkit.set_backend(before)


@pytest.mark.parametrize("mean", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("shape", [(4096, 4), (16, 4, 16, 16)], ids=str)
def test_off_centre_float32_within_one_ulp_of_the_mean(backend, mean, shape):
    g = torch.Generator().manual_seed(int(mean))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + mean).float()
    y = BF.batch_norm(x, training=True)
    assert y.dtype == torch.float32
    want = oracle(x)
    err = (y.double() - want).abs().max().item()
    ulp_of_mean = EPS32 * 2 ** math.floor(math.log2(mean))
    assert err <= ulp_of_mean
    # stronger: the error is that of rounding the output (|y| <~ 5) to float32
    assert err <= 4 * EPS32 * want.abs().max().item()


@pytest.mark.parametrize("mean", [1e4, -1e5])
def test_off_centre_module_train_then_eval(backend, mean):
    """The layer too, and eval mode with the learned float32 running mean."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 3, 16, generator=g, dtype=torch.float64) * 2 + mean).float()
    bn = BatchNorm1d(3, momentum=1.0)  # running stats become the batch stats
    y = bn(x)
    assert (y.double() - oracle(x)).abs().max().item() <= 4 * EPS32 * 5
    bn.eval()
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    want = (x.double() - rm[:, None]) / torch.sqrt(rv[:, None] + bn.eps)
    err = (bn(x).double() - want).abs().max().item()
    assert err <= 4 * EPS32 * want.abs().max().item()


@pytest.mark.parametrize("value", [1e7, -3.5, 0.0, 123.456])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_constant_input_gives_exactly_the_bias(backend, value, dtype):
    bn = BatchNorm2d(3, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.25, -3.0, 7.5]))
    x = torch.full((4, 3, 32, 32), value, dtype=dtype)
    y = bn(x)
    assert torch.equal(y, bn.bias.detach()[:, None, None].expand_as(x))
    torch.testing.assert_close(bn.running_mean, torch.full((3,), 0.1 * value, dtype=dtype))
    assert torch.equal(bn.running_var, torch.full((3,), 0.9, dtype=dtype))  # 0.9*1 + 0.1*0


@pytest.mark.parametrize("value", [-3.5, 0.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_constant_low_precision_input_gives_exactly_the_bias(value, dtype):
    bias = torch.tensor([0.25, -3.0, 7.5])
    x = torch.full((6, 3, 4), value, dtype=dtype)
    y = BF.batch_norm(x, None, None, torch.ones(3), bias, True)
    assert y.dtype == dtype
    assert torch.equal(y, bias.to(dtype)[:, None].expand_as(x))


def test_constant_channels_last_and_masked(backend):
    x = torch.full((64, 32, 3), 1e7)
    x[40:, 1, :] = 12345.0  # padded positions hold something else
    mask = torch.zeros(64, 32, dtype=torch.bool)
    mask[:40] = True
    bias = torch.tensor([1.0, -2.0, 3.0])
    y = BF.batch_norm(x, None, None, None, bias, True, axis=-1, mask=mask)
    assert torch.equal(y[:40], bias.expand(40, 32, 3))


# ------------------------------------------------------------------ eps = 0

# (shape, channels_last): serial and parallel kernels, (N, C) and (N, C, H, W) layouts
EPS0_SHAPES = [((60, 3), False), ((4, 3, 5, 5), False), ((16, 3, 64, 64), False),
               ((16, 3, 64, 64), True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,cl", EPS0_SHAPES, ids=str)
def test_eps_zero_on_a_constant_channel_gives_exactly_the_bias(bn_path, shape, cl, dtype):
    """eps=0 and a zero-variance channel: x - mean is exactly 0 there, so x_hat is taken as
    0 and the output is exactly the bias (was 0/0 = NaN), with zero gradients for x and
    weight; the other channels are torch's eps=0 BN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    x[:, 1] = 2.5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.tensor([0.5, 2.0, -1.0], dtype=dtype, requires_grad=True)
    b = torch.tensor([0.25, -3.0, 7.5], dtype=dtype, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    y = BF.batch_norm(x, rm, rv, w, b, True, 0.1, 0.0)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], -3.0))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad[:, 1], torch.zeros_like(x.grad[:, 1]))
    assert w.grad[1] == 0 and b.grad[1] == x[:, 1].numel()
    view = [1, 3] + [1] * (x.dim() - 2)  # torch refuses eps=0 in training: the formula
    want = oracle(x.detach(), eps=0.0) * w.detach().double().view(view) \
        + b.detach().double().view(view)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.detach().double()[:, [0, 2]], want[:, [0, 2]], rtol=tol,
                               atol=tol)
    assert rv[1] == 0.9 and rm[1] == torch.tensor(0.25, dtype=dtype)  # var 0, mean 2.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eps_zero_in_eval_with_a_zero_running_var(bn_path, dtype):
    x = torch.randn(8, 3, dtype=dtype)
    rm, rv = torch.tensor([0.0, 1.0, 0.0], dtype=dtype), torch.tensor([1.0, 0.0, 4.0],
                                                                       dtype=dtype)
    b = torch.tensor([0.25, -3.0, 7.5], dtype=dtype)
    y = BF.batch_norm(x, rm, rv, None, b, False, 0.1, 0.0)
    assert torch.equal(y[:, 1], torch.full((8,), -3.0, dtype=dtype))
    torch.testing.assert_close(y[:, 2], x[:, 2] / 2 + 7.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_eps_zero_low_precision(dtype):
    x = torch.full((6, 3, 4), 3.0, dtype=dtype)
    bias = torch.tensor([0.25, -3.0, 7.5])
    y = BF.batch_norm(x, None, None, torch.ones(3), bias, True, eps=0.0)
    assert torch.equal(y, bias.to(dtype)[:, None].expand_as(x))


# ------------------------------------------------------------------ non-finite batches

# (shape, channels_last): serial, parallel (fused statistics) and channels-last kernels
NAN_SHAPES = [((8, 4), False), ((6, 4, 3, 3), False), ((16, 4, 64, 64), False),
              ((16, 4, 32, 32), True)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,cl", NAN_SHAPES, ids=str)
def test_nonfinite_batch_keeps_the_running_statistics_and_warns_once(bn_path, shape, cl,
                                                                     dtype, bad):
    """A NaN/Inf in channel 1 leaves that channel's running statistics as they were (torch
    poisons them for good), the other channels update as torch's do, num_batches_tracked
    counts the call, and one RuntimeWarning names the channel; the in-kernel blend of the
    cpu backend and the native node included."""
    bn = (BatchNorm1d if len(shape) == 2 else BatchNorm2d)(4, dtype=dtype)
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        4, dtype=torch.float64)
    with torch.no_grad():
        for m in (bn, ref):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
            m.running_var.copy_(torch.tensor([2.0, 3.0, 0.5, 1.0]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    x[0, 1] = bad
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) 1 \(1 of 4\) are not finite.*left "
                                            r"unchanged") as record:
        bn(x)
    assert len([w for w in record if w.category is RuntimeWarning]) == 1
    ref(x.double())
    assert bn.running_mean[1] == -1.0 and bn.running_var[1] == 3.0
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    keep = [0, 2, 3]
    torch.testing.assert_close(bn.running_mean[keep].double(), ref.running_mean[keep], **tol)
    torch.testing.assert_close(bn.running_var[keep].double(), ref.running_var[keep], **tol)
    assert int(bn.num_batches_tracked) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer: the second bad batch is quiet
        bn(x)
    assert bn.running_mean[1] == -1.0 and int(bn.num_batches_tracked) == 2


def test_nonfinite_functional_and_half(bn_path):
    """The functional form and half input (reference path): the same rule."""
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(8, 3, 5).to(dtype)
        x[2, 0, 1] = float("nan")
        rm, rv = torch.zeros(3), torch.ones(3)
        with pytest.warns(RuntimeWarning, match=r"channel\(s\) 0 ") as record:
            BF.batch_norm(x, rm, rv, None, None, True, 0.5)
        assert record[0].filename == __file__  # points at the caller's line
        assert rm[0] == 0 and rv[0] == 1 and rm[1] != 0 and rv[2] != 1
