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
