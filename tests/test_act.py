"""BatchNormAct against torch BN followed by the activation, in float64."""

import pytest
import torch

from bnkit.nn import BatchNormAct

D = torch.float64
ACTS = {"relu": torch.relu, "silu": torch.nn.functional.silu,
        "gelu": torch.nn.functional.gelu, "identity": lambda z: z}


def pair(act, c=4, **kw):
    """(BatchNormAct, torch BN with the same non-trivial affine), both float64."""
    torch.manual_seed(0)
    m = BatchNormAct(c, act=act, dtype=D, **kw)
    ref = torch.nn.BatchNorm2d(c, dtype=D, momentum=kw.get("momentum", 0.1))
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    m.load_state_dict(ref.state_dict())
    return m, ref


def run(module, x, dy, post=lambda z: z):
    x = x.detach().clone().requires_grad_(True)
    y = post(module(x))
    y.backward(dy)
    return y, x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_act_matches_bn_then_act(act, mode):
    m, ref = pair(act)
    m.train(mode == "train")
    ref.train(mode == "train")
    x = torch.randn(6, 4, 3, 3, dtype=D) * 2 + 1
    dy = torch.randn_like(x)
    got, want = run(m, x, dy), run(ref, x, dy, ACTS[act])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_module_act_runs_after_bn():
    m, ref = pair(torch.nn.Hardswish())
    assert m.fused is None and isinstance(m.act, torch.nn.Hardswish)
    x = torch.randn(5, 4, 2, 3, dtype=D)
    dy = torch.randn_like(x)
    got, want = run(m, x, dy), run(ref, x, dy, torch.nn.functional.hardswish)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_string_act_is_also_a_module():
    m = BatchNormAct(3, act="gelu")
    assert m.fused == "gelu" and isinstance(m.act, torch.nn.GELU)
    assert "act='gelu'" in repr(m)


def test_state_dict_matches_batchnorm2d_both_ways():
    m, ref = pair("relu")
    ref(torch.randn(8, 4, 2, 2, dtype=D) + 3)  # move the running statistics
    assert m.load_state_dict(ref.state_dict()) is not None
    assert list(m.state_dict()) == list(ref.state_dict())
    back = torch.nn.BatchNorm2d(4, dtype=D)
    back.load_state_dict(m.state_dict())
    x = torch.randn(3, 4, 2, 2, dtype=D)
    torch.testing.assert_close(m.eval()(x), torch.relu(back.eval()(x)), rtol=1e-12, atol=1e-12)


def test_fused_backward_passes_gradcheck():
    m = BatchNormAct(3, act="silu", dtype=D)
    x = torch.randn(4, 3, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_act_errors():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh': expected one of "
                                         r"\['gelu', 'identity', 'relu', 'silu'\]"):
        BatchNormAct(3, act="tanh")
    with pytest.raises(TypeError, match=r"act must be an activation name or an nn.Module "
                                        r"instance \(got type\)"):
        BatchNormAct(3, act=torch.nn.ReLU)


def test_failed_forward_leaves_state_unchanged():
    m = BatchNormAct(3, act="relu")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected shape \(5,\).*got \(3,\)"):
        m(torch.randn(4, 5, 2))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        m(torch.randn(1, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
