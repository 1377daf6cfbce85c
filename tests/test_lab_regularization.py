"""Tests of the lab's `regularization` experiment: a mini run on the tiny data set, the
verdict following the metrics, and the measurements against closed forms: the variance of
inverted Dropout (Li et al. 2019) and BN's invariance to the scale of its input weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnkit import nn as bnn
from bnkit.lab import regularization, store


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("regularization")


def test_mini_run_reports_every_cell(mini_run):
    cfg, result = mini_run
    assert result.status == "finished" and result.errors == 0
    records = store.read_records(result.run_dir)
    assert len(records) == 2 * len(regularization.cells(cfg["experiments"]["regularization"]))
    for rec in records:
        m = rec["metrics"]
        assert m["gap"] == pytest.approx(m["train_acc"] - m["final_test_acc"])
        assert ("var_shift" in m) == rec["variant"]["reg"].startswith("bn")
        if "scale_err" in m:
            assert m["scale_err"] < 1e-2  # BN(aWx) = BN(Wx) up to eps
    md = result.report_md.read_text()
    for paper in ("Li et al. 2019", "van Laarhoven 2017"):
        assert paper in md
    assert (result.run_dir / "plots" / "regularization.png").read_bytes()[:4] == b"\x89PNG"


def _records(acc: dict, gap: dict) -> list[dict]:
    recs = []
    for reg in regularization.VARIANTS:
        for seed in range(3):
            m = {"steps": [1], "test_acc": [acc[reg]], "weight_norm": [5.0 + seed],
                 "final_test_acc": acc[reg] + 0.002 * seed, "train_acc": 1.0,
                 "gap": gap[reg] + 0.002 * seed}
            if reg.startswith("bn"):
                m.update(var_shift=[1.0, 1.5 if reg == "bn+dropout-before" else 1.0],
                         scale_err=1e-6)
            recs.append({"variant": {"reg": reg}, "seed": seed, "metrics": m})
    return recs


def test_verdict_follows_the_metrics():
    cfg = regularization.PROFILES["quick"]
    acc = dict.fromkeys(regularization.VARIANTS, 0.80)
    acc.update({"bn": 0.82, "bn+l2": 0.85, "bn+dropout-after": 0.86})
    gap = dict.fromkeys(regularization.VARIANTS, 0.15)
    gap["bn"] = 0.10
    sec = regularization.summarize(cfg, _records(acc, gap))
    assert sec.verdict == "holds"
    acc.update({"bn+l2": 0.78, "bn+dropout-after": 0.79})
    gap["bn"] = 0.20
    sec = regularization.summarize(cfg, _records(acc, gap))
    assert sec.verdict == "does not hold"
    assert "contradicts the common claim" in sec.paragraphs[-1]


def test_dropout_variance_formula_matches_torch_dropout():
    torch.manual_seed(0)
    x = 1.5 + 0.7 * torch.randn(400_000, 3, dtype=torch.float64)
    for p in (0.2, 0.5):
        got = nn.functional.dropout(x, p, training=True).var(0)
        want = regularization.dropout_variance(x.mean(0), x.var(0), p)
        assert torch.allclose(got, want, rtol=0.02)


def test_variance_shift_of_dropout_before_bn_is_the_formula():
    """Dropout(p) -> BN on input of known mean and variance: after many training batches
    the running variance is (c^2 + v) / (1 - p) - c^2 and eval mode sees v."""
    torch.manual_seed(1)
    p, c, v = 0.5, 2.0, 0.25
    model = nn.Sequential(nn.Dropout(p), bnn.BatchNorm1d(4, momentum=None)).double()
    model.train()
    with torch.no_grad():
        for _ in range(200):
            model(c + v ** 0.5 * torch.randn(256, 4, dtype=torch.float64))
    x = c + v ** 0.5 * torch.randn(20_000, 4, dtype=torch.float64)
    (train_var, eval_var, running), = regularization.bn_input_variances(model, x)
    expected = regularization.dropout_variance(torch.tensor(c, dtype=torch.float64),
                                              torch.tensor(v, dtype=torch.float64), p)
    assert torch.allclose(eval_var, torch.full((4,), v, dtype=torch.float64), rtol=0.05)
    assert torch.allclose(train_var, expected.expand(4), rtol=0.05)
    assert torch.allclose(running, expected.expand(4), rtol=0.05)  # unbiased n/(n-1): tiny
    shift = regularization.variance_shift(model, x)
    assert shift[0] == pytest.approx(float(expected) / v, rel=0.05)  # (4.25 / .5 - 4) / .25


def test_bn_output_is_invariant_to_the_scale_of_its_input_weights():
    """Exact up to eps: with eps ~ 0, in float64, BN(aWx) = BN(Wx) to rounding."""
    model = regularization.make_model("bn+dropout-before", 8, 0.5, in_features=6, seed=2)
    model = model.double()
    x = torch.randn(32, 6, dtype=torch.float64)
    for layer in model:
        if isinstance(layer, torch.nn.BatchNorm1d):
            layer.eps = 1e-30
    assert regularization.scale_invariance_error(model, x, [0.5, 3.0]) < 1e-12
    plain = regularization.make_model("dropout", 8, 0.5, in_features=6, seed=2)
    assert regularization.weights_before_bn(plain) == []
    state = {k: v.clone() for k, v in model.state_dict().items()}
    regularization.scale_invariance_error(model, x, [3.0])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched
