"""Every documented user error: its type, a message naming the value and the fix, and no
state change (parameters, running statistics and num_batches_tracked stay bit-identical)."""
from __future__ import annotations

import re

import pytest
import torch

import bnkit.functional as BF
from bnkit.nn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d


def trained(layer, x):
    """A layer with non-trivial state: random affine, one training step taken."""
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    layer(x)
    return layer


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def expect_error(exc, module, call, *fragments):
    """`call()` raises `exc` with every fragment in its message; `module` is unchanged."""
    before = state(module)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    after = state(module)
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    return msg


@pytest.fixture
def bn2d():
    return trained(BatchNorm2d(3), torch.randn(4, 3, 2, 2) * 2 + 1)


@pytest.fixture
def bn1d():
    return trained(BatchNorm1d(3), torch.randn(6, 3, 5) + 3)


# ------------------------------------------------------------------ shapes and ranks

@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count(bn2d, training):
    bn2d.train(training)
    expect_error(ValueError, bn2d, lambda: bn2d(torch.randn(2, 4, 3, 3)),
                 "running_mean", "expected shape (4,)", "(2, 4, 3, 3)", "got (3,)",
                 "make num_features match")


def test_wrong_channel_count_weight_without_running_stats():
    bn = trained(BatchNorm1d(3, track_running_stats=False), torch.randn(5, 3))
    expect_error(ValueError, bn, lambda: bn(torch.randn(5, 2)), "weight", "expected shape (2,)",
                 "got (3,)", "num_features")


@pytest.mark.parametrize("cls,shape,want", [
    (BatchNorm1d, (2, 3, 4, 4), "2D or 3D"), (BatchNorm1d, (3,), "2D or 3D"),
    (BatchNorm2d, (2, 3, 4), "4D"), (BatchNorm2d, (2, 3, 4, 4, 4), "4D"),
    (BatchNorm3d, (2, 3, 4, 4), "5D"), (BatchNorm3d, (2, 3), "5D"),
])
def test_wrong_rank(cls, shape, want):
    bn = trained(cls(3), torch.randn((4, 3) + (2,) * {BatchNorm1d: 1, BatchNorm2d: 2,
                                                    BatchNorm3d: 3}[cls]))
    got = f"got {len(shape)}D input of shape {shape}"
    expect_error(ValueError, bn, lambda: bn(torch.randn(shape)), f"expected {want} input", got,
                 "use the BatchNorm class matching your input's rank")


def test_any_rank_layer_needs_two_dims():
    bn = trained(BatchNorm(3, axis=-1), torch.randn(4, 3))
    expect_error(ValueError, bn, lambda: bn(torch.randn(3)), "at least 2D", "got 1D",
                 "batch and a channel dimension")


@pytest.mark.parametrize("axis", [3, -4, 7])
def test_bad_axis(axis):
    bn = BatchNorm(3, axis=axis)
    x = torch.randn(4, 5, 3)
    expect_error(ValueError, bn, lambda: bn(x), f"got axis={axis}", "-3 <= axis < 3",
                 "axis=-1 for channels-last")
    expect_error(ValueError, bn, lambda: BF.batch_norm(x, training=True, axis=axis),
                 f"got axis={axis}")


# ------------------------------------------------------------------ constructor arguments

@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNorm])
@pytest.mark.parametrize("num_features", [0, -2, 3.0, True, "3"])
def test_num_features_must_be_a_positive_int(cls, num_features):
    with pytest.raises(ValueError) as info:
        cls(num_features)
    assert f"got {num_features!r}" in str(info.value)
    assert "positive int" in str(info.value) and "channel dimension" in str(info.value)


@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan")])
def test_eps_must_be_non_negative(eps):
    with pytest.raises(ValueError, match=re.escape(f"got {eps}") + ".*usual value is 1e-5"):
        BatchNorm2d(3, eps=eps)


@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan")])
def test_momentum_must_lie_in_unit_interval(momentum):
    with pytest.raises(ValueError, match=re.escape(f"got {momentum}") + ".*m_torch = 1 - m_keras"):
        BatchNorm1d(3, momentum=momentum)


def test_momentum_changed_after_construction_is_checked_before_any_update(bn1d):
    bn1d.momentum = 2.0
    expect_error(ValueError, bn1d, lambda: bn1d(torch.randn(4, 3)), "momentum must lie in [0, 1]",
                 "got 2.0", "m_torch = 1 - m_keras")


# ------------------------------------------------------------------ values per channel

@pytest.mark.parametrize("make,shape", [(lambda: BatchNorm1d(3), (1, 3)),
                                        (lambda: BatchNorm2d(3), (1, 3, 1, 1)),
                                        (lambda: BatchNorm(3, axis=-1), (1, 1, 3))])
def test_one_value_per_channel_in_training(make, shape):
    bn = trained(make(), torch.randn((4,) + shape[1:]))
    expect_error(ValueError, bn, lambda: bn(torch.randn(shape)),
                 "more than 1 value per channel when training", "got 1 values per channel",
                 f"input shape {shape}", "batch of at least 2", "model.eval()")
    bn.eval()  # the fix the message gives works
    x = torch.randn(shape)
    rm, rv = bn.running_mean, bn.running_var
    view = [1] * len(shape)
    view[bn.axis] = -1
    expected = (x - rm.view(view)) / torch.sqrt(rv.view(view) + bn.eps) * bn.weight.view(view) \
        + bn.bias.view(view)
    torch.testing.assert_close(bn(x), expected)


def test_mask_with_one_valid_value(bn1d):
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3] = True
    expect_error(ValueError, bn1d, lambda: bn1d(torch.randn(2, 3, 5), mask),
                 "got 1 valid (unmasked) values per channel", "fewer masked positions")


# ------------------------------------------------------------------ types and devices

@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_floating_input(bn2d, dtype):
    x = torch.ones(2, 3, 2, 2, dtype=dtype)
    expect_error(TypeError, bn2d, lambda: bn2d(x), f"got dtype {dtype}", "x.float()")


@pytest.mark.parametrize("value,name", [([[1.0, 2.0, 3.0]] * 2, "list"), (3.0, "float")])
def test_non_tensor_input(bn1d, value, name):
    expect_error(TypeError, bn1d, lambda: bn1d(value), f"got {name}", "torch.as_tensor")
    expect_error(TypeError, bn1d, lambda: BF.batch_norm(value, training=True), f"got {name}",
                 "torch.as_tensor")


def test_non_floating_running_buffer():
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3, dtype=torch.long), torch.ones(3)
    with pytest.raises(TypeError, match=r"running_mean must be floating point \(got dtype "
                                        r"torch.int64\); use .float\(\)"):
        BF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.long)) and torch.equal(rv, torch.ones(3))


def test_mismatched_devices(bn2d):
    x = torch.randn(2, 3, 2, 2, device="meta")
    expect_error(ValueError, bn2d, lambda: bn2d(x), "running_mean is on cpu",
                 "input is on meta", ".to('meta')")
    bn = trained(BatchNorm2d(3, track_running_stats=False), torch.randn(4, 3, 2, 2))
    expect_error(ValueError, bn, lambda: bn(x), "weight is on cpu", "input is on meta")


def test_running_mean_on_another_device():
    bn = trained(BatchNorm1d(3), torch.randn(5, 3))
    rv = bn.running_var
    expect_error(ValueError, bn,
                 lambda: BF.batch_norm(torch.randn(4, 3), torch.zeros(3, device="meta"), rv,
                                       bn.weight, bn.bias, True),
                 "running_mean is on meta but the input is on cpu", ".to('cpu')")


# ------------------------------------------------------------------ masks

def test_mask_must_be_boolean(bn1d):
    mask = torch.ones(2, 5)
    expect_error(TypeError, bn1d, lambda: bn1d(torch.randn(2, 3, 5), mask),
                 "mask must be a boolean tensor", "got dtype torch.float32", "comparison")


@pytest.mark.parametrize("shape", [(2, 6), (3, 5), (2, 5, 1), (10,)])
def test_mask_must_cover_the_non_channel_dims(bn1d, shape):
    mask = torch.ones(shape, dtype=torch.bool)
    expect_error(ValueError, bn1d, lambda: bn1d(torch.randn(2, 3, 5), mask),
                 "broadcastable to (2, 5)", f"got {shape}", "pass an (N, L) mask")


def test_mask_on_another_device(bn1d):
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    expect_error(ValueError, bn1d, lambda: bn1d(torch.randn(2, 3, 5), mask),
                 "mask is on meta but the input is on cpu", "mask.to('cpu')")


# ------------------------------------------------------------------ functional-only rules

def test_eval_without_running_stats(bn1d):
    expect_error(ValueError, bn1d,
                 lambda: BF.batch_norm(torch.randn(4, 3), None, None, bn1d.weight, bn1d.bias,
                                       False),
                 "running_mean/running_var are None", "use training=True")


def test_running_mean_and_var_come_together(bn1d):
    expect_error(ValueError, bn1d,
                 lambda: BF.batch_norm(torch.randn(4, 3), bn1d.running_mean, None, training=True),
                 "got only running_mean", "pass both or neither")


def test_unknown_activation(bn1d):
    expect_error(ValueError, bn1d,
                 lambda: BF.batch_norm(torch.randn(4, 3), bn1d.running_mean, bn1d.running_var,
                                       bn1d.weight, bn1d.bias, True, act="tanh"),
                 "unknown activation 'tanh'", "'relu'", "pass a module instead")


@pytest.mark.parametrize("kw,frags", [
    ({"momentum": 1.1}, ("momentum must lie in [0, 1]", "got 1.1", "m_keras")),
    ({"momentum": -0.5}, ("got -0.5",)),
    ({"eps": -1e-3}, ("eps must be >= 0", "got -0.001", "1e-5")),
])
def test_functional_scalar_ranges(bn1d, kw, frags):
    args = (bn1d.running_mean, bn1d.running_var, bn1d.weight, bn1d.bias, True)
    expect_error(ValueError, bn1d, lambda: BF.batch_norm(torch.randn(4, 3), *args, **kw), *frags)


@pytest.mark.parametrize("kw,frags", [
    ({"momentum": None}, ("momentum must be a real number (got None)",
                          "1 / num_batches_tracked")),
    ({"eps": "1e-5"}, ("eps must be a real number (got '1e-5')", "a float such as 1e-5")),
])
def test_functional_scalar_types(bn1d, kw, frags):
    args = (bn1d.running_mean, bn1d.running_var, bn1d.weight, bn1d.bias, True)
    expect_error(TypeError, bn1d, lambda: BF.batch_norm(torch.randn(4, 3), *args, **kw), *frags)
