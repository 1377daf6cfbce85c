"""RecurrentBatchNorm against one torch BN per time step (shared affine), and the BN-LSTM."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from bnkit.errors import BatchNormError
from bnkit.nn import BNLSTM, BNLSTMCell, RecurrentBatchNorm

D = torch.float64
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bn_lstm.py"


def run_steps(m, xs):
    """Forward xs[t] at step t, backward a fixed random loss -> (outputs, input grads)."""
    xs = [x.clone().requires_grad_(True) for x in xs]
    ys = [m(x, t) for t, x in enumerate(xs)]
    torch.manual_seed(1)
    sum((y * torch.randn_like(y)).sum() for y in ys).backward()
    return ys, [x.grad for x in xs]


def torch_per_step(m, xs):
    """The oracle: torch BN functional per step, step t >= max_steps on the last buffers."""
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    rms = [torch.zeros(m.num_features, dtype=D) for _ in range(m.max_steps)]
    rvs = [torch.ones(m.num_features, dtype=D) for _ in range(m.max_steps)]

    def step(x, t):
        s = min(t, m.max_steps - 1)
        return torch.nn.functional.batch_norm(x, rms[s], rvs[s], w, b, True, m.momentum, m.eps)
    ys, grads = run_steps(step, xs)
    return ys, grads, w.grad, b.grad, torch.stack(rms), torch.stack(rvs)


def test_matches_one_torch_bn_per_step_with_shared_affine():
    m = RecurrentBatchNorm(3, max_steps=3, momentum=0.2, dtype=D)
    with torch.no_grad():
        m.bias.uniform_(-1, 1)
    xs = [torch.randn(5, 3, 2, dtype=D) * (t + 1) + t for t in range(5)]  # t = 3, 4 reuse 2
    ys, grads = run_steps(m, xs)
    ys_ref, grads_ref, dw, db, rm, rv = torch_per_step(m, xs)
    for got, want in zip(ys + grads, ys_ref + grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.weight.grad, dw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.bias.grad, db, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.tolist() == [1, 1, 3]


def test_eval_uses_the_statistics_of_each_step():
    m = RecurrentBatchNorm(2, max_steps=2, dtype=D)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([[0.0, 1.0], [5.0, -2.0]], dtype=D))
        m.running_var.copy_(torch.tensor([[1.0, 4.0], [9.0, 0.25]], dtype=D))
    m.eval()
    x = torch.randn(4, 2, dtype=D)
    for t, s in ((0, 0), (1, 1), (7, 1)):
        want = ((x - m.running_mean[s]) / torch.sqrt(m.running_var[s] + m.eps) * m.weight
                + m.bias)
        torch.testing.assert_close(m(x, t), want, rtol=1e-12, atol=1e-12)


def test_init_and_cumulative_momentum_per_step():
    m = RecurrentBatchNorm(4, max_steps=2, momentum=None, dtype=D)
    assert torch.equal(m.weight, torch.full((4,), 0.1, dtype=D))
    assert torch.equal(m.bias, torch.zeros(4, dtype=D))
    assert RecurrentBatchNorm(4, 2, bias=False).bias is None
    xs = [torch.randn(6, 4, dtype=D) for _ in range(3)]
    for x in xs:  # three batches at step 1, one at step 0
        m(x, 1)
    m(xs[0], 0)
    torch.testing.assert_close(m.running_mean[1], torch.stack(xs).mean((0, 1)))
    torch.testing.assert_close(m.running_mean[0], xs[0].mean(0))
    assert m.num_batches_tracked.tolist() == [1, 3]


def test_errors_leave_state_unchanged():
    with pytest.raises(ValueError, match=r"max_steps must be an int >= 1.*got 0"):
        RecurrentBatchNorm(3, max_steps=0)
    m = RecurrentBatchNorm(3, max_steps=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad, exc in ((-1, ValueError), (1.5, TypeError), ("0", TypeError), (True, TypeError)):
        with pytest.raises(exc, match=r"time step t must be an int >= 0 \(got " +
                           re.escape(repr(bad))):
            m(torch.randn(4, 3), bad)
    with pytest.raises(ValueError, match=r"expected shape \(4,\).*got \(3,\)"):
        m(torch.randn(4, 4), 0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def torch_raises(call):
    """What torch raises for the same mistake; None if it accepts it or fails by accident
    (AttributeError on a non-tensor)."""
    try:
        call()
    except AttributeError:
        return None
    except Exception as err:  # noqa: BLE001 - whatever torch raises is the type to match
        return type(err)
    return None


H = 5
LSTM_CASES = {  # name -> (bnkit call, error type, message fragment, torch call on the same)
    "feature size": (lambda m: m(torch.randn(2, 3, 7)), RuntimeError,
                     "input_size = 4 features", lambda t: t(torch.randn(2, 3, 7))),
    "int input": (lambda m: m(torch.ones(2, 3, 4, dtype=torch.long)), TypeError,
                  "floating point", lambda t: t(torch.ones(2, 3, 4, dtype=torch.long))),
    "float64 input": (lambda m: m(torch.randn(2, 3, 4, dtype=D)), ValueError,
                      "the weights' dtype torch.float32", lambda t: t(torch.randn(
                          2, 3, 4, dtype=D))),
    "empty sequence": (lambda m: m(torch.randn(2, 0, 4)), RuntimeError, "got T = 0",
                       lambda t: t(torch.randn(2, 0, 4))),
    "4D input": (lambda m: m(torch.randn(2, 3, 4, 1)), ValueError, "expects a 3D input",
                 lambda t: t(torch.randn(2, 3, 4, 1))),
    "list input": (lambda m: m([[[0.0] * 4] * 3] * 2), TypeError, "got list", None),
    "state rows": (lambda m: m(torch.randn(2, 3, 4), (torch.zeros(3, H), torch.zeros(3, H))),
                   RuntimeError, "state h must be (2, 5)",
                   lambda t: t(torch.randn(2, 3, 4), (torch.zeros(1, 3, H),
                                                      torch.zeros(1, 3, H)))),
    "state not a pair": (lambda m: m(torch.randn(2, 3, 4), torch.zeros(2, H)), TypeError,
                         "state must be a tuple (h, c)", None),
    "batch of one": (lambda m: m(torch.randn(1, 3, 4)), ValueError,
                     "more than 1 value per channel", None),
}


def module_state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same_state(m, before):
    after = module_state(m)
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("case", list(LSTM_CASES))
def test_bnlstm_errors_are_checked_before_any_step(bn_path, case):
    """Every input is checked before any BN runs: a failed call leaves every running
    statistic and step count bit-identical (the feature-size error used to come from the
    matmul after bn_hh had updated its buffers), with a bnkit error that is also what
    torch.nn.LSTM raises for the same input."""
    call, exc, frag, torch_call = LSTM_CASES[case]
    torch.manual_seed(0)
    m = BNLSTM(4, H, 3)
    m(torch.randn(6, 3, 4))  # non-trivial state
    before = module_state(m)
    with pytest.raises(exc, match=re.escape(frag)) as info:
        call(m)
    assert isinstance(info.value, BatchNormError)
    want = None if torch_call is None else torch_raises(
        lambda: torch_call(torch.nn.LSTM(4, H, batch_first=True)))
    if want is not None:
        assert isinstance(info.value, want), (type(info.value).__mro__, want)
    assert_same_state(m, before)


CELL_CASES = {
    "state rows": (lambda c: c(torch.randn(2, 4), (torch.zeros(3, H), torch.zeros(3, H)), 0),
                   RuntimeError, "state h must be (2, 5)",
                   lambda t: t(torch.randn(2, 4), (torch.zeros(3, H), torch.zeros(3, H)))),
    "c rows": (lambda c: c(torch.randn(2, 4), (torch.zeros(2, H), torch.zeros(3, H)), 0),
               RuntimeError, "state c must be (2, 5)", None),
    "feature size": (lambda c: c(torch.randn(2, 7), (torch.zeros(2, H),) * 2, 0), RuntimeError,
                     "input_size = 4 features", lambda t: t(torch.randn(2, 7))),
    "time step": (lambda c: c(torch.randn(2, 4), (torch.zeros(2, H),) * 2, 1.5), TypeError,
                  "time step t must be an int >= 0 (got 1.5 of type float)", None),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_bnlstm_cell_errors_leave_every_buffer_unchanged(bn_path, case):
    call, exc, frag, torch_call = CELL_CASES[case]
    torch.manual_seed(0)
    cell = BNLSTMCell(4, H, 3)
    cell(torch.randn(6, 4), (torch.zeros(6, H), torch.zeros(6, H)), 0)
    before = module_state(cell)
    with pytest.raises(exc, match=re.escape(frag)) as info:
        call(cell)
    assert isinstance(info.value, BatchNormError)
    want = None if torch_call is None else torch_raises(
        lambda: torch_call(torch.nn.LSTMCell(4, H)))
    if want is not None:
        assert isinstance(info.value, want), (type(info.value).__mro__, want)
    assert_same_state(cell, before)


def test_running_buffers_that_require_grad_are_refused(bn_path):
    m = RecurrentBatchNorm(3, max_steps=2)
    m.running_var.requires_grad_(True)
    before = module_state(m)
    with pytest.raises(RuntimeError, match="running_var must not require grad"):
        m(torch.randn(4, 3), 0)
    assert_same_state(m, before)


def manual_cell_step(cell, x, h, c, t):
    """The paper's equations with torch BN (batch statistics), sharing the cell's weights."""
    s = min(t, cell.bn_c.max_steps - 1)

    def bn(layer, z):
        return torch.nn.functional.batch_norm(z, layer.running_mean[s].clone(),
                                              layer.running_var[s].clone(), layer.weight,
                                              layer.bias, True, 0.0, layer.eps)
    gates = bn(cell.bn_hh, h @ cell.weight_hh.t()) + bn(cell.bn_ih, x @ cell.weight_ih.t()) \
        + cell.bias
    i, f, o, g = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(bn(cell.bn_c, c)), c


def test_bnlstm_matches_the_paper_equations():
    torch.manual_seed(0)
    lstm = BNLSTM(3, 4, max_steps=2).double()
    cell = lstm.cell
    assert torch.equal(cell.weight_hh[:4], torch.eye(4, dtype=D))  # identity init
    assert torch.equal(cell.bias[4:8], torch.ones(4, dtype=D))  # forget bias
    assert cell.bn_hh.bias is None and cell.bn_ih.bias is None  # beta_h = beta_x = 0
    x = torch.randn(5, 3, 3, dtype=D)
    out, (h, c) = lstm(x)
    hm = cm = torch.zeros(5, 4, dtype=D)
    for t in range(3):
        hm, cm = manual_cell_step(cell, x[:, t], hm, cm, t)
        torch.testing.assert_close(out[:, t], hm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((h, c), (hm, cm), rtol=1e-10, atol=1e-10)
    out_tf, _ = BNLSTM(3, 4, 2, batch_first=False).double().eval()(x.transpose(0, 1))
    assert out_tf.shape == (3, 5, 4)


def test_bnlstm_cell_gradients_reach_every_parameter():
    torch.manual_seed(0)
    cell = BNLSTMCell(3, 4, max_steps=2)
    h = c = torch.zeros(6, 4)
    for t in range(3):
        h, c = cell(torch.randn(6, 3), (h, c), t)
    h.square().sum().backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bnlstm_input_error():
    with pytest.raises(ValueError, match=r"BNLSTM expects a 3D input .*got 2D input"):
        BNLSTM(3, 4, 2)(torch.randn(5, 3))


def load_example():
    spec = importlib.util.spec_from_file_location("bn_lstm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_on_random_data_and_fits_it(capsys):
    losses = load_example().main(["--steps", "4", "--rows", "6", "--hidden", "8", "--batch",
                                  "8", "--lr", "0.01"])
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert "step    3" in capsys.readouterr().out


def test_example_runs_on_fashion_mnist_files(tiny_idx_dir):
    losses = load_example().main(["--data", "--root", str(tiny_idx_dir), "--steps", "2",
                                  "--rows", "6", "--hidden", "8", "--batch", "8"])
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
