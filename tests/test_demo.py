"""Tests for bnkit.demo: the BN paper's sigmoid MLP, its training loop and the printout."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.demo import (
    INIT_STD,
    DemoData,
    batch_indices,
    evaluate,
    format_table,
    load_data,
    make_mlp,
    run_demo,
    summary_line,
    train_classifier,
)

REAL_DIR = "/usr/share/datasets/fashion-mnist"


pytestmark = pytest.mark.usefixtures("one_thread")  # the demo trains single-threaded


@pytest.fixture(scope="module")
def tiny(tiny_idx_dir):
    return load_data(tiny_idx_dir)


def _toy_data(n_train=40, n_test=20):
    """Linearly separable 10-feature data: the label is the argmax of the features."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n_train + n_test, 10, generator=gen)
    y = x.argmax(1)
    return DemoData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "toy")


# ----------------------------------------------------------------------------- data


def test_load_data_scales_and_flattens(tiny_idx_dir, tiny):
    images, labels = bnkit.data.load_fashion_mnist("train", tiny_idx_dir)
    expected = images.reshape(len(images), -1).double() / 255
    assert tiny.x_train.dtype == torch.float32 and tiny.x_train.shape == (256, 784)
    torch.testing.assert_close(tiny.x_train.double(), expected, atol=1e-7, rtol=0)
    assert torch.equal(tiny.y_train, labels)
    assert len(tiny.x_test) == 128 and tiny.source == str(tiny_idx_dir)


# ----------------------------------------------------------------------------- model


def test_make_mlp_layers_and_same_init_with_and_without_bn():
    plain, bn = make_mlp(bn=False, seed=3), make_mlp(bn=True, seed=3)
    kinds = [type(m).__name__ for m in bn]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    assert [type(m).__name__ for m in plain] == ["Linear", "Sigmoid"] * 3 + ["Linear"]
    assert all(isinstance(m, bnkit.nn.BatchNorm1d) for m in bn if "Norm" in type(m).__name__)
    plain_w = [m.weight for m in plain if isinstance(m, nn.Linear)]
    bn_w = [m.weight for m in bn if isinstance(m, nn.Linear)]
    for a, b in zip(plain_w, bn_w):  # same seed -> identical starting weights
        assert torch.equal(a, b)
    assert bn[0].bias is None and bn[-1].bias is not None  # beta replaces the hidden biases
    assert torch.equal(plain[0].bias, torch.zeros(100))


def test_make_mlp_init_std_and_seed():
    weights = torch.cat([m.weight.flatten() for m in make_mlp(False) if isinstance(m, nn.Linear)])
    # 79,510 draws from N(0, (1/28)^2): the sample std is within 1% of 1/28.
    assert abs(weights.std().item() / INIT_STD - 1) < 0.01
    assert abs(weights.mean().item()) < 4 * INIT_STD / weights.numel() ** 0.5  # 4 sigma
    assert not torch.equal(make_mlp(False, seed=0)[0].weight, make_mlp(False, seed=1)[0].weight)


def test_make_mlp_custom_norm_and_sizes():
    model = make_mlp(True, hidden=7, depth=2, norm=nn.BatchNorm1d, in_features=5, classes=3)
    norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2 and all(type(m) is nn.BatchNorm1d and m.num_features == 7
                                   for m in norms)
    assert model(torch.rand(4, 5)).shape == (4, 3)


def test_make_mlp_errors():
    with pytest.raises(ValueError, match=r"norm= is only used with bn=True.*pass bn=True"):
        make_mlp(False, norm=nn.BatchNorm1d)
    with pytest.raises(ValueError, match=r"hidden must be a positive integer, got 0"):
        make_mlp(True, hidden=0)
    with pytest.raises(ValueError, match=r"depth must be a positive integer, got 2.5"):
        make_mlp(True, depth=2.5)


# ----------------------------------------------------------------------------- batches, eval


def test_batch_indices_permutes_each_epoch_and_repeats_with_seed():
    it = batch_indices(10, 3, torch.Generator().manual_seed(0))
    batches = [next(it) for _ in range(6)]  # 3 full batches per epoch, 1 index dropped
    for epoch in (batches[:3], batches[3:]):
        seen = torch.cat(epoch)
        assert len(seen) == 9 and len(set(seen.tolist())) == 9 and seen.max() < 10
    again = batch_indices(10, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(b, next(again)) for b in batches)


def test_evaluate_matches_closed_form_and_restores_mode():
    x = torch.eye(10)[torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])]
    y = torch.tensor([0, 1, 2, 3, 9, 9, 9, 9])  # argmax of one-hot rows: 4 of 8 right
    model = nn.Sequential(nn.Identity()).train()
    assert evaluate(model, x, y, batch_size=3) == 0.5
    assert model.training
    bn = nn.BatchNorm1d(10).eval()
    evaluate(bn, x, y)
    assert not bn.training


# ----------------------------------------------------------------------------- training


def test_train_classifier_rows_first_loss_and_determinism():
    data = _toy_data()
    model = make_mlp(True, hidden=16, depth=1, in_features=10)
    start = make_mlp(True, hidden=16, depth=1, in_features=10)  # same seed, untouched copy
    rows = train_classifier(model, data, steps=7, lr=0.5, batch_size=8, eval_every=3, seed=5)
    assert [r["step"] for r in rows] == [3, 6, 7]
    # Oracle for the first row's loss: replay steps 1..3 by hand with the same batches.
    idx = batch_indices(40, 8, torch.Generator().manual_seed(5))
    opt, losses = torch.optim.SGD(start.parameters(), lr=0.5), []
    for _ in range(3):
        i = next(idx)
        loss = F.cross_entropy(start(data.x_train[i]), data.y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert rows[0]["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert rows[0]["test_acc"] == evaluate(start, data.x_test, data.y_test)
    assert all(r["ms_per_step"] > 0 and 0 <= r["test_acc"] <= 1 for r in rows)
    again = train_classifier(make_mlp(True, hidden=16, depth=1, in_features=10), data, steps=7,
                             lr=0.5, batch_size=8, eval_every=3, seed=5)
    assert [(r["test_acc"], r["train_loss"]) for r in again] == \
        [(r["test_acc"], r["train_loss"]) for r in rows]


def test_train_classifier_on_eval_merges_extra_values():
    seen = []

    def on_eval(row, model):
        seen.append((row["step"], model.training))
        return {"first_weight": model[0].weight[0, 0].item()}

    model = make_mlp(False, hidden=4, depth=1, in_features=10)
    rows = train_classifier(model, _toy_data(), steps=4, batch_size=8, eval_every=2,
                            on_eval=on_eval)
    assert seen == [(2, True), (4, True)]
    assert rows[-1]["first_weight"] == model[0].weight[0, 0].item()


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, r"steps must be a positive integer, got 0"),
    ({"eval_every": -1}, r"eval_every must be a positive integer, got -1"),
    ({"batch_size": 41}, r"batch must be at most the number of training examples \(40\), got 41"),
    ({"lr": -0.1}, r"lr must be a positive finite number, got -0.1"),
    ({"lr": float("nan")}, r"lr must be a positive finite number, got nan"),
])
def test_train_classifier_errors_leave_model_untouched(kwargs, message):
    model = make_mlp(True, hidden=4, depth=1, in_features=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"steps": 2, "lr": 0.1, "batch_size": 8, "eval_every": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_classifier(model, _toy_data(), **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- the demo


def test_run_demo_on_tiny_data_bn_learns_plain_stays_at_chance(tiny):
    lines = []
    results = run_demo(steps=60, eval_every=30, data=tiny, out=lines.append)
    plain, bn = results["plain"], results["bn"]
    assert [r["step"] for r in bn] == [r["step"] for r in plain] == [30, 60]
    for r in plain + bn:
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["test_acc"] * 128 == pytest.approx(round(r["test_acc"] * 128))  # k/128
    # 10 balanced classes: chance is 10%. The BN net separates the tiny classes within
    # 60 steps; the plain net's sigmoids start saturated-flat and stay near chance.
    assert bn[-1]["test_acc"] >= 0.9
    assert plain[-1]["test_acc"] <= 0.3
    assert lines[0].startswith(f"Fashion-MNIST from {tiny.source}: 256 train / 128 test")
    table = lines[-2].splitlines()
    assert table[0].split("|")[0].strip() == "step" and len(table) == 4
    assert table[-1].split("|")[2].strip() == f"{bn[-1]['test_acc']:.1%}"
    assert lines[-1].startswith(f"After 60 steps: BN {bn[-1]['test_acc']:.1%} vs no BN")


def test_format_table_and_summary_values():
    plain = [{"step": 500, "test_acc": 0.1, "ms_per_step": 0.5},
             {"step": 1000, "test_acc": 0.85, "ms_per_step": 0.25}]
    bn = [{"step": 500, "test_acc": 0.8125, "ms_per_step": 1.0},
          {"step": 1000, "test_acc": 0.9, "ms_per_step": 2.0}]
    rows = [[c.strip() for c in line.split("|")] for line in format_table(plain, bn).splitlines()]
    assert rows[2] == ["500", "10.0%", "81.2%", "0.50", "1.00"]
    assert rows[3] == ["1000", "85.0%", "90.0%", "0.25", "2.00"]
    assert summary_line(plain, bn) == ("After 1000 steps: BN 90.0% vs no BN 85.0% test accuracy; "
                                       "first >= 80%: step 500 with BN, step 1000 without.")
    assert summary_line(plain, bn, level=0.95).endswith("first >= 95%: never with BN, never without.")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason="Fashion-MNIST is not installed")
def test_real_data_reproduces_the_paper_shape_at_500_steps():
    # Fig. 1(a) shape: after 500 steps the plain MLP is still at chance (10%) while the BN one
    # is past 80% (the full demo: plain 10.0% up to step 1,500, BN 81-83%).
    results = run_demo(steps=500, eval_every=500, data=load_data(REAL_DIR), out=lambda s: None)
    assert results["plain"][-1]["test_acc"] < 0.15
    assert results["bn"][-1]["test_acc"] > 0.75


def test_demo_imports_neither_the_lab_runner_nor_matplotlib():
    """The demo uses the lab's training pieces only: importing it must not load the lab's
    runner and report, whose plots need matplotlib (the `lab` extra the demo does not need)."""
    import subprocess
    import sys

    code = ("import sys, bnkit.demo; loaded = [m for m in sys.modules if m == 'matplotlib' or "
            "m.startswith(('matplotlib.', 'bnkit.lab.runner', 'bnkit.lab.report'))]; "
            "print(loaded); sys.exit(1 if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
