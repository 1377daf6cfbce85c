"""BatchRenorm against its formula (Ioffe 2017) and against BN when r_max=1, d_max=0."""

import pytest
import torch
from oracles import assert_pairs_close

from bnkit.nn import BatchRenorm, renorm_schedule

D = torch.float64


def oracle(x, w, b, rm, rv, eps, r_max, d_max, momentum):
    """The paper's formula in float64 autograd, r and d detached. -> (y, new rm, new rv)."""
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.shape[1]
    view = [1, -1] + [1] * (x.dim() - 2)
    mu_b, var_b = x.mean(dims), x.var(dims, unbiased=False)
    sigma_b, sigma = torch.sqrt(var_b + eps), torch.sqrt(rv + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - rm) / sigma).clamp(-d_max, d_max).detach()
    xhat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    y = xhat * w.view(view) + b.view(view)
    new_rm = (1 - momentum) * rm + momentum * mu_b.detach()
    new_rv = (1 - momentum) * rv + momentum * var_b.detach() * n / (n - 1)
    return y, new_rm, new_rv, (xhat.detach(), r, d)


def make(r_max, d_max, momentum=0.01, c=3):
    torch.manual_seed(0)
    m = BatchRenorm(c, momentum=momentum, r_max=r_max, d_max=d_max, dtype=D)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.bias.uniform_(-1, 1)
        m.running_mean.copy_(torch.tensor([0.5, 3.0, -2.0], dtype=D))
        m.running_var.copy_(torch.tensor([4.0, 0.05, 1.0], dtype=D))
    return m


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (100.0, 100.0), (3.0, 0.0)])
def test_training_matches_formula(r_max, d_max):
    m = make(r_max, d_max)
    x = torch.randn(8, 3, 5, dtype=D) * 1.3 + 0.7
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    y_ref, rm_ref, rv_ref, (xhat, _, _) = oracle(xo, w, b, m.running_mean.clone(),
                                                  m.running_var.clone(), m.eps, r_max, d_max,
                                                  m.momentum)
    xb = x.clone().requires_grad_(True)
    y = m(xb)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_pairs_close((y, y_ref), (xb.grad, xo.grad), (m.weight.grad, w.grad),
                       (m.bias.grad, b.grad))
    # dL/dw = sum dy * (xhat_B * r + d), dL/db = sum dy, with r, d constants
    torch.testing.assert_close(m.weight.grad, (dy * xhat).sum((0, 2)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.running_mean, rm_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv_ref, rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 1


def test_clipping_is_active_in_the_clipped_case():
    m = make(1.5, 0.5)
    x = torch.randn(8, 3, 5, dtype=D) * 1.3 + 0.7
    *_, (_, r, d) = oracle(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps, 1.5, 0.5,
                           0.01)
    assert (r == 1.5).any() and (r == 1 / 1.5).any() and (d == 0.5).any() and (d == -0.5).any()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_r1_d0_is_exactly_batchnorm(momentum):
    m = BatchRenorm(3, momentum=momentum, r_max=1.0, d_max=0.0, dtype=D)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=D)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
        ref.running_mean.fill_(4.0)  # far from the batch: renorm would correct if allowed
    m.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = torch.randn(6, 3, 2, 2, dtype=D) * 3 - 1
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = m(xa), ref(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, key), getattr(ref, key), rtol=1e-12, atol=1e-12)


def test_eval_uses_running_statistics_and_loads_bn_checkpoints():
    ref = torch.nn.BatchNorm2d(3, dtype=D)
    ref(torch.randn(8, 3, 2, 2, dtype=D) * 2 + 1)
    m = BatchRenorm(3, dtype=D)
    m.load_state_dict(ref.state_dict())
    assert list(m.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 2, 2, dtype=D)
    torch.testing.assert_close(m.eval()(x), ref.eval()(x), rtol=1e-12, atol=1e-12)


def test_without_running_statistics_it_is_batchnorm():
    m = BatchRenorm(3, track_running_stats=False, r_max=1.5, d_max=1.0, dtype=D)
    ref = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=D)
    x = torch.randn(7, 3, dtype=D) * 2 + 5
    torch.testing.assert_close(m(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.eval()(x), ref.eval()(x), rtol=1e-12, atol=1e-12)


def test_schedule_values_at_key_steps():
    s = renorm_schedule()
    r, d = s["r_max"], s["d_max"]
    assert [r(k) for k in (0, 5000, 22500, 40000, 10 ** 6)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [d(k) for k in (0, 5000, 15000, 25000, 10 ** 6)] == [0.0, 0.0, 2.5, 5.0, 5.0]
    custom = renorm_schedule(warmup_steps=10, r_max=2.0, r_max_steps=20, d_max=1.0,
                             d_max_steps=30)
    assert custom["r_max"](15) == 1.5 and custom["d_max"](20) == 0.5
    assert custom["r_max"](10) == 1.0 and custom["d_max"](31) == 1.0


def test_schedule_follows_the_step_counter():
    m = BatchRenorm(3, **renorm_schedule(), dtype=D)
    assert m.limits() == (1.0, 0.0)
    m.num_batches_tracked.fill_(22500)
    assert m.limits() == (2.0, 5.0 * 17500 / 20000)
    # at step 0 the schedule gives plain BN: the output is centred whatever the running mean
    m.num_batches_tracked.zero_()
    m.running_mean.fill_(10.0)
    y = m(torch.randn(16, 3, dtype=D) + 1)
    torch.testing.assert_close(y.mean(0), torch.zeros(3, dtype=D), rtol=0, atol=1e-12)


def test_limit_errors():
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1 \(got 0.5\)"):
        BatchRenorm(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be a finite number >= 0 \(got -1.0\)"):
        BatchRenorm(3, d_max=-1.0)
    with pytest.raises(TypeError, match=r"r_max must be a number or a callable .*got str"):
        BatchRenorm(3, r_max="3")
    with pytest.raises(ValueError, match=r"warmup_steps < r_max_steps and d_max_steps "
                                         r"\(got warmup_steps=50000"):
        renorm_schedule(warmup_steps=50000)


def test_bad_callable_or_input_leaves_state_unchanged():
    m = BatchRenorm(3, r_max=lambda step: 0.1 * step, dtype=D)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1 at step 0 "
                                         r"\(got 0.0\)"):
        m(torch.randn(4, 3, dtype=D))
    with pytest.raises(ValueError, match=r"expected shape \(4,\).*got \(3,\)"):
        BatchRenorm(3, dtype=D)(torch.randn(4, 4, dtype=D))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        m.r_max = 2.0
        m(torch.randn(1, 3, dtype=D))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
