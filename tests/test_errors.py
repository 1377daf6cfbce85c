"""Every documented user error: its type, a message naming the value and the fix, and no
state change (parameters, running statistics and num_batches_tracked stay bit-identical),
on every path: the reference backend, the 'cpu' backend's Python path and the native node.

Each error is a `bnkit.errors.BatchNormError` and also an instance of the exception torch
raises for the same mistake (found by running torch's layer or F.batch_norm on the same
input), so `except RuntimeError` written against torch keeps working after a swap.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as TF

import bnkit.functional as BF
from bnkit.errors import BatchNormError
from bnkit.nn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d


@pytest.fixture(autouse=True)
def path(bn_path):
    """Every test on each path (conftest.bn_path): reference, cpu-python, cpu-native."""
    return bn_path


def torch_raises(call):
    """The exception type torch raises for the same mistake, or None when torch accepts the
    call or fails only by accident (an AttributeError from duck typing a non-tensor)."""
    try:
        call()
    except AttributeError:
        return None
    except Exception as err:  # noqa: BLE001 - any type torch picks is the one to match
        return type(err)
    return None


def trained(layer, x):
    """A layer with non-trivial state: random affine, one training step taken."""
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    layer(x)
    return layer


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def expect_error(exc, module, call, *fragments, torch_call=None):
    """`call()` raises `exc`, a BatchNormError, with every fragment in its message; `module`
    is unchanged. With `torch_call` (torch on the same input), the error is also an instance
    of what torch raises there, if torch raises."""
    before = state(module)
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, BatchNormError)
    want = torch_raises(torch_call) if torch_call is not None else None
    if want is not None:
        assert isinstance(info.value, want), (type(info.value).__mro__, want)
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
    x = torch.randn(2, 4, 3, 3)
    expect_error(ValueError, bn2d, lambda: bn2d(x), "running_mean", "expected shape (4,)",
                 "(2, 4, 3, 3)", "got (3,)", "make num_features match",
                 torch_call=lambda: torch.nn.BatchNorm2d(3).train(training)(x))


def test_wrong_channel_count_weight_without_running_stats():
    bn = trained(BatchNorm1d(3, track_running_stats=False), torch.randn(5, 3))
    x = torch.randn(5, 2)
    expect_error(ValueError, bn, lambda: bn(x), "weight", "expected shape (2,)",
                 "got (3,)", "num_features",
                 torch_call=lambda: torch.nn.BatchNorm1d(3, track_running_stats=False)(x))


@pytest.mark.parametrize("cls,shape,want", [
    (BatchNorm1d, (2, 3, 4, 4), "2D or 3D"), (BatchNorm1d, (3,), "2D or 3D"),
    (BatchNorm2d, (2, 3, 4), "4D"), (BatchNorm2d, (2, 3, 4, 4, 4), "4D"),
    (BatchNorm3d, (2, 3, 4, 4), "5D"), (BatchNorm3d, (2, 3), "5D"),
])
def test_wrong_rank(cls, shape, want):
    bn = trained(cls(3), torch.randn((4, 3) + (2,) * {BatchNorm1d: 1, BatchNorm2d: 2,
                                                    BatchNorm3d: 3}[cls]))
    got = f"got {len(shape)}D input of shape {shape}"
    x = torch.randn(shape)
    torch_cls = getattr(torch.nn, cls.__name__)
    expect_error(ValueError, bn, lambda: bn(x), f"expected {want} input", got,
                 "use the BatchNorm class matching your input's rank",
                 torch_call=lambda: torch_cls(3)(x))


def test_any_rank_layer_needs_two_dims():
    bn = trained(BatchNorm(3, axis=-1), torch.randn(4, 3))
    x = torch.randn(3)
    expect_error(ValueError, bn, lambda: bn(x), "at least 2D", "got 1D",
                 "batch and a channel dimension", torch_call=lambda: torch.nn.BatchNorm1d(3)(x))


@pytest.mark.parametrize("axis", [3, -4, 7])
def test_bad_axis(axis):
    bn = BatchNorm(3, axis=axis)
    x = torch.randn(4, 5, 3)
    expect_error(ValueError, bn, lambda: bn(x), f"got axis={axis}", "-3 <= axis < 3",
                 "axis=-1 for channels-last")
    expect_error(ValueError, bn, lambda: BF.batch_norm(x, training=True, axis=axis),
                 f"got axis={axis}")


# ------------------------------------------------------------------ constructor arguments

def expect_constructor_error(exc, make, torch_make, *fragments):
    """`make()` raises `exc` (a BatchNormError) naming every fragment, and is an instance of
    what torch raises building (and calling, where torch checks only then) its layer."""
    with pytest.raises(exc) as info:
        make()
    assert isinstance(info.value, BatchNormError)
    want = torch_raises(torch_make)
    if want is not None:
        assert isinstance(info.value, want), (type(info.value).__mro__, want)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNorm])
@pytest.mark.parametrize("num_features,exc", [(0, ValueError), (-2, ValueError),
                                              (3.0, TypeError), (True, TypeError),
                                              ("3", TypeError)])
def test_num_features_must_be_a_positive_int(cls, num_features, exc):
    torch_cls = getattr(torch.nn, cls.__name__, torch.nn.BatchNorm1d)
    expect_constructor_error(exc, lambda: cls(num_features), lambda: torch_cls(num_features),
                             f"got {num_features!r}", "positive int", "channel dimension")


@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan")])
def test_eps_must_be_non_negative(eps):
    x = torch.randn(2, 3, 2, 2)
    expect_constructor_error(ValueError, lambda: BatchNorm2d(3, eps=eps),
                             lambda: torch.nn.BatchNorm2d(3, eps=eps)(x), f"got {eps}",
                             "usual value is 1e-5")


@pytest.mark.parametrize("name,value", [("eps", "a"), ("eps", None), ("momentum", "0.1"),
                                        ("eps", [1e-5])])
def test_constructor_scalars_must_be_real_numbers(name, value):
    """A TypeError naming the argument, where torch fails only at the first call with
    "'>=' not supported" or an op schema error."""
    x = torch.randn(2, 3, 2, 2)
    expect_constructor_error(TypeError, lambda: BatchNorm2d(3, **{name: value}),
                             lambda: torch.nn.BatchNorm2d(3, **{name: value})(x),
                             f"{name} must be a real number", f"got {value!r}")


@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan")])
def test_momentum_must_lie_in_unit_interval(momentum):
    expect_constructor_error(ValueError, lambda: BatchNorm1d(3, momentum=momentum),
                             lambda: torch.nn.BatchNorm1d(3, momentum=momentum)(
                                 torch.randn(4, 3)),
                             f"got {momentum}", "m_torch = 1 - m_keras")


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
    x1 = torch.randn(shape)
    expect_error(ValueError, bn, lambda: bn(x1),
                 "more than 1 value per channel when training", "got 1 values per channel",
                 f"input shape {shape}", "batch of at least 2", "model.eval()",
                 torch_call=lambda: TF.batch_norm(x1.movedim(bn.axis, 1), torch.zeros(3),
                                                  torch.ones(3), training=True))
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
    expect_error(TypeError, bn2d, lambda: bn2d(x), f"got dtype {dtype}", "x.float()",
                 torch_call=lambda: torch.nn.BatchNorm2d(3)(x))


@pytest.mark.parametrize("value,name", [([[1.0, 2.0, 3.0]] * 2, "list"), (3.0, "float")])
def test_non_tensor_input(bn1d, value, name):
    expect_error(TypeError, bn1d, lambda: bn1d(value), f"got {name}", "torch.as_tensor")
    expect_error(TypeError, bn1d, lambda: BF.batch_norm(value, training=True), f"got {name}",
                 "torch.as_tensor")


def test_non_floating_running_buffer():
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3, dtype=torch.long), torch.ones(3)
    with pytest.raises(TypeError, match=r"running_mean must be floating point \(got dtype "
                                        r"torch.int64\); use .float\(\)") as info:
        BF.batch_norm(x, rm, rv, training=True)
    assert isinstance(info.value, torch_raises(lambda: TF.batch_norm(x, rm, rv, training=True)))
    assert torch.equal(rm, torch.zeros(3, dtype=torch.long)) and torch.equal(rv, torch.ones(3))


def test_mismatched_devices(bn2d):
    x = torch.randn(2, 3, 2, 2, device="meta")
    expect_error(ValueError, bn2d, lambda: bn2d(x), "running_mean is on cpu",
                 "input is on meta", ".to('meta')", torch_call=lambda: torch.nn.BatchNorm2d(3)(x))
    bn = trained(BatchNorm2d(3, track_running_stats=False), torch.randn(4, 3, 2, 2))
    expect_error(ValueError, bn, lambda: bn(x), "weight is on cpu", "input is on meta",
                 torch_call=lambda: torch.nn.BatchNorm2d(3, track_running_stats=False)(x))


def test_running_mean_on_another_device():
    bn = trained(BatchNorm1d(3), torch.randn(5, 3))
    rv = bn.running_var
    x, rm = torch.randn(4, 3), torch.zeros(3, device="meta")
    expect_error(ValueError, bn, lambda: BF.batch_norm(x, rm, rv, bn.weight, bn.bias, True),
                 "running_mean is on meta but the input is on cpu", ".to('cpu')",
                 torch_call=lambda: TF.batch_norm(x, rm, rv.clone(), bn.weight, bn.bias, True))


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
    x = torch.randn(4, 3)
    expect_error(ValueError, bn1d,
                 lambda: BF.batch_norm(x, None, None, bn1d.weight, bn1d.bias, False),
                 "running_mean/running_var are None", "use training=True",
                 torch_call=lambda: TF.batch_norm(x, None, None, training=False))


def test_running_mean_and_var_come_together(bn1d):
    x = torch.randn(4, 3)
    expect_error(ValueError, bn1d,
                 lambda: BF.batch_norm(x, bn1d.running_mean, None, training=True),
                 "got only running_mean", "pass both or neither",
                 torch_call=lambda: TF.batch_norm(x, torch.zeros(3), None, training=True))


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
    x = torch.randn(4, 3)
    expect_error(ValueError, bn1d, lambda: BF.batch_norm(x, *args, **kw), *frags,
                 torch_call=lambda: TF.batch_norm(x, torch.zeros(3), torch.ones(3),
                                                  training=True, **kw))


@pytest.mark.parametrize("kw,frags", [
    ({"momentum": None}, ("momentum must be a real number (got None)",
                          "1 / num_batches_tracked")),
    ({"eps": "1e-5"}, ("eps must be a real number (got '1e-5')", "a float such as 1e-5")),
])
def test_functional_scalar_types(bn1d, kw, frags):
    args = (bn1d.running_mean, bn1d.running_var, bn1d.weight, bn1d.bias, True)
    x = torch.randn(4, 3)
    expect_error(TypeError, bn1d, lambda: BF.batch_norm(x, *args, **kw), *frags,
                 torch_call=lambda: TF.batch_norm(x, torch.zeros(3), torch.ones(3),
                                                  training=True, **kw))


# ------------------------------------------------------------------ argument types

def _vec3():
    return [1.0, 1.0, 1.0]


# name -> (bnkit call args for x (4, 3, 5), fragments, the torch call or None)
WRONG_TYPES = {
    "weight": (lambda x, rm, rv: BF.batch_norm(x, rm, rv, _vec3(), None, True),
               ("weight must be a torch.Tensor of shape (3,) or None", "got list"),
               lambda x, rm, rv: TF.batch_norm(x, rm, rv, _vec3(), None, True)),
    "bias": (lambda x, rm, rv: BF.batch_norm(x, rm, rv, None, _vec3(), True),
             ("bias must be a torch.Tensor", "got list"),
             lambda x, rm, rv: TF.batch_norm(x, rm, rv, None, _vec3(), True)),
    "running_var": (lambda x, rm, rv: BF.batch_norm(x, rm, _vec3(), None, None, True),
                    ("running_var must be a torch.Tensor", "got list"),
                    lambda x, rm, rv: TF.batch_norm(x, rm, _vec3(), None, None, True)),
    "mask": (lambda x, rm, rv: BF.batch_norm(x, rm, rv, training=True, mask=[[True] * 5] * 4),
             ("mask must be a boolean torch.Tensor or None", "got list"), None),
    "axis": (lambda x, rm, rv: BF.batch_norm(x, rm, rv, training=True, axis=1.0),
             ("axis must be an int", "got 1.0"), None),
    "training": (lambda x, rm, rv: BF.batch_norm(x, rm, rv, None, None, "yes"),
                 ("training must be a bool", "got 'yes'"),
                 lambda x, rm, rv: TF.batch_norm(x, rm, rv, None, None, "yes")),
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_argument_of_the_wrong_type_is_a_type_error_naming_it(bn1d, name):
    """The same TypeError on every path (was: AttributeError on reference, an op-schema
    RuntimeError on cpu, or accepted by the native node)."""
    call, frags, torch_call = WRONG_TYPES[name]
    x = torch.randn(4, 3, 5)
    rm, rv = bn1d.running_mean, bn1d.running_var
    expect_error(TypeError, bn1d, lambda: call(x, rm, rv), *frags,
                 torch_call=None if torch_call is None else
                 lambda: torch_call(x, torch.zeros(3), torch.ones(3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("momentum,exc,frag", [(-1.2, ValueError, "momentum must lie in [0, 1]"),
                                               (None, TypeError, "momentum must be a real")])
def test_momentum_is_checked_in_eval_too_on_every_dtype(dtype, training, momentum, exc, frag):
    """One answer for every dtype and path: a bad momentum is an error in eval as well
    (torch ignores its value in eval; the native node used to accept it for float32/64)."""
    x = torch.randn(8, 3, dtype=dtype)
    pdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    rm, rv = torch.full((3,), 0.5, dtype=pdt), torch.full((3,), 2.0, dtype=pdt)
    with pytest.raises(exc, match=re.escape(frag)) as info:
        BF.batch_norm(x, rm, rv, None, None, training, momentum)
    assert isinstance(info.value, BatchNormError)
    assert torch.equal(rm, torch.full((3,), 0.5, dtype=pdt))
    assert torch.equal(rv, torch.full((3,), 2.0, dtype=pdt))


# ------------------------------------------------------------------ buffers the update cannot write

def test_expanded_running_var_fails_before_any_write():
    x = torch.randn(4, 3)
    rm, rv = torch.full((3,), 0.25), torch.ones(1).expand(3)
    with pytest.raises(RuntimeError, match="running_var cannot be updated in place.*expanded"
                                           ".*clone()") as info:
        BF.batch_norm(x, rm, rv, None, None, True)
    assert isinstance(info.value, BatchNormError) and isinstance(info.value, ValueError)
    assert torch.equal(rm, torch.full((3,), 0.25)) and torch.equal(rv, torch.ones(3))
    y = BF.batch_norm(x, rm, rv, None, None, False)  # reading it in eval is fine
    torch.testing.assert_close(y, (x - 0.25) / torch.sqrt(torch.tensor(1 + 1e-5)))


@pytest.mark.parametrize("layer", [False, True])
def test_inference_mode_buffers_fail_before_any_write(layer):
    """Buffers made under torch.inference_mode cannot be updated outside it: every path
    raises before touching them (was: reference wrote both then raised, cpu wrote)."""
    with torch.inference_mode():
        bn = BatchNorm1d(3)
        bn.running_mean.fill_(0.25)
    x = torch.randn(6, 3)
    call = (lambda: bn(x)) if layer else (
        lambda: BF.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True))
    with pytest.raises(RuntimeError, match="created under torch.inference_mode") as info:
        call()
    assert isinstance(info.value, BatchNormError)
    assert torch.equal(bn.running_mean, torch.full((3,), 0.25))
    assert torch.equal(bn.running_var, torch.ones(3)) and int(bn.num_batches_tracked) == 0
    with torch.inference_mode():  # inside inference_mode the update is allowed
        bn(x)
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_var, torch.ones(3))


@pytest.mark.parametrize("training", [True, False])
def test_running_buffers_that_require_grad_are_refused(bn1d, training):
    bn1d.train(training)
    bn1d.running_var.requires_grad_(True)
    x = torch.randn(4, 3)
    expect_error(RuntimeError, bn1d, lambda: bn1d(x), "running_var must not require grad",
                 "requires_grad_(False)",
                 torch_call=lambda: TF.batch_norm(x, torch.zeros(3), torch.ones(
                     3, requires_grad=True), training=training))


# ------------------------------------------------------------------ one answer per backend and dtype

def _error_table(dtype):
    """{name: call(x, rm, rv)} of bad functional calls, over x (8, 3) of `dtype` and float32
    buffers (float64 for float64 input)."""
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "channels": lambda x, rm, rv: BF.batch_norm(x, rm[:2], rv[:2], training=True),
        "momentum-eval": lambda x, rm, rv: BF.batch_norm(x, rm, rv, momentum=-1.2),
        "momentum-none-eval": lambda x, rm, rv: BF.batch_norm(x, rm, rv, momentum=None),
        "momentum-train": lambda x, rm, rv: BF.batch_norm(x, rm, rv, training=True, momentum=2.0),
        "eps": lambda x, rm, rv: BF.batch_norm(x, rm, rv, training=True, eps=-1.0),
        "training": lambda x, rm, rv: BF.batch_norm(x, rm, rv, None, None, "yes"),
        "axis": lambda x, rm, rv: BF.batch_norm(x, rm, rv, training=True, axis=2),
        "eval-no-stats": lambda x, rm, rv: BF.batch_norm(x, None, None),
        "mean-only": lambda x, rm, rv: BF.batch_norm(x, rm, None, training=True),
        "act": lambda x, rm, rv: BF.batch_norm(x, rm, rv, training=True, act="tanh"),
        "one-value": lambda x, rm, rv: BF.batch_norm(x[:1], rm, rv, training=True),
        "weight-dtype": lambda x, rm, rv: BF.batch_norm(x, rm, rv, torch.ones(3, dtype=torch.int64),
                                                        training=True),
        "grad-buffer": lambda x, rm, rv: BF.batch_norm(x, rm, rv.clone().requires_grad_(),
                                                       training=True),
        "expanded-buffer": lambda x, rm, rv: BF.batch_norm(x, rm, torch.ones(1, dtype=pdt).expand(3),
                                                           training=True),
    }, pdt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_error_table_is_identical_on_every_backend_and_dtype(dtype, monkeypatch):
    """Each bad call raises the same error type and message on every available backend
    path (reference, the cpu backend's Python path, the C++ node) and leaves the buffers
    bit-identical; and the same message for float32, float64 and bfloat16 input (was: the
    native node returned a result for some calls in float32/float64)."""
    import bnkit
    from bnkit import kernels

    paths = ["reference"] + (["cpu-python", "cpu-native"] if "cpu" in bnkit.available_backends()
                             else [])
    before = bnkit.get_backend()
    seen = {}
    try:
        for p in paths:
            bnkit.set_backend("reference" if p == "reference" else "cpu")
            monkeypatch.setattr(kernels, "_native", None if p == "cpu-python" else False)
            table, pdt = _error_table(dtype)
            for name, call in table.items():
                x = torch.randn(8, 3, dtype=torch.float64).to(dtype)
                rm, rv = torch.full((3,), 0.5, dtype=pdt), torch.full((3,), 2.0, dtype=pdt)
                with pytest.raises(BatchNormError) as info:
                    call(x, rm, rv)
                assert torch.equal(rm, torch.full((3,), 0.5, dtype=pdt)), (p, name)
                assert torch.equal(rv, torch.full((3,), 2.0, dtype=pdt)), (p, name)
                got = (type(info.value), str(info.value).replace(str(dtype), "DTYPE"))
                assert seen.setdefault(name, got) == got, (p, name, got, seen[name])
    finally:
        bnkit.set_backend(before)
    _DTYPE_ANSWERS.setdefault(dtype, seen)
    for other in _DTYPE_ANSWERS.values():  # the same answers whatever the input dtype
        assert {k: v[0] for k, v in other.items()} == {k: v[0] for k, v in seen.items()}


_DTYPE_ANSWERS: dict = {}
