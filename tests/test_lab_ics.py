"""Tests of the lab's `ics` experiment: a mini run on the tiny data set, the verdict following
the metrics, and the ICS and smoothness measurements recomputed by hand with torch.autograd."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnkit.lab import ics, store


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("ics")


def test_mini_run_reports_every_cell(mini_run):
    cfg, result = mini_run
    assert result.status == "finished" and result.errors == 0
    records = store.read_records(result.run_dir)
    assert len(records) == 2 * len(ics.cells(cfg["experiments"]["ics"]))
    for rec in records:
        m = rec["metrics"]
        assert all(len(m[k]) == len(m["steps"]) for k in ics.SERIES)
        assert all(-1 <= c <= 1 + 1e-9 for c in m["ics_cos"])
        assert m["mean_beta"] == pytest.approx(sum(m["beta"][1:]) / len(m["beta"][1:]))
    md = result.report_md.read_text()
    assert ics.TITLE in md and "Santurkar et al." in md
    assert (result.run_dir / "plots" / "ics.png").read_bytes()[:4] == b"\x89PNG"


def _records(acc: dict, cos: dict) -> list[dict]:
    recs = []
    for norm in ics.VARIANTS:
        for seed in range(3):
            m = {"steps": [0, 1], "acc": [0.1, acc[norm]], "final_acc": acc[norm] + 0.002 * seed,
                 **{k: [1.0, 1.0] for k in ics.SERIES}, **{f"mean_{k}": 1.0 for k in ics.SERIES}}
            m["mean_ics_cos"] = cos[norm] + 0.002 * seed
            recs.append({"variant": {"norm": norm}, "seed": seed, "metrics": m})
    return recs


def test_verdict_follows_the_metrics():
    cfg = ics.PROFILES["quick"]
    sec = ics.summarize(cfg, _records({"none": 0.7, "bn": 0.85, "noisy-bn": 0.6},
                                      {"none": 0.5, "bn": 0.9, "noisy-bn": 0.5}))
    assert sec.verdict == "holds"
    sec = ics.summarize(cfg, _records({"none": 0.7, "bn": 0.85, "noisy-bn": 0.9},
                                      {"none": 0.9, "bn": 0.5, "noisy-bn": 0.5}))
    assert sec.verdict == "does not hold"
    assert "Santurkar et al. 2018 likewise" in " ".join(sec.paragraphs)


def _model(norm="bn"):
    cfg = {**ics.PROFILES["mini"], "hidden": 6, "depth": 3}
    model = ics.make_model(cfg, norm, seed=3, in_features=5).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 10
    return model, x, y


def test_ics_matches_a_hand_computed_update():
    """G'_l: the gradient of layer l after only the layers before it stepped, by hand."""
    model, x, y = _model("bn")
    lr = 0.3
    l2, cos = ics.ics(model, x, y, lr)
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    weights = ics.linear_weights(model)
    for k, w in enumerate(weights[1:]):
        cut = next(i for i, p in enumerate(params) if p is w)
        moved = [p - lr * g if i < cut else p for i, (p, g) in enumerate(zip(params, grads))]
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, moved)), (x,))
        g2 = torch.autograd.grad(F.cross_entropy(out, y), w)[0]
        g = grads[cut]
        assert l2[k] == pytest.approx(float((g - g2).norm() / g.norm()), rel=1e-9)
        assert cos[k] == pytest.approx(float(F.cosine_similarity(g.flatten(), g2.flatten(),
                                                                 dim=0)), rel=1e-9)
    assert len(l2) == len(weights) - 1


def test_landscape_matches_steps_along_the_gradient():
    model, x, y = _model("none")
    etas = [0.1, 0.5]
    got = ics.landscape(model, x, y, etas)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    loss0 = F.cross_entropy(model(x), y)
    g0 = torch.autograd.grad(loss0, params)
    gn = math.sqrt(sum(float((g ** 2).sum()) for g in g0))
    losses, diffs = [float(loss0.detach())], []
    for eta in etas:
        moved = {n: p - eta * g for n, p, g in zip(names, params, g0)}
        loss = F.cross_entropy(torch.func.functional_call(model, moved, (x,)), y)
        g1 = torch.autograd.grad(loss, list(moved.values()))
        losses.append(float(loss.detach()))
        diffs.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g0, g1))))
    assert got["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert got["grad_pred"] == pytest.approx(max(diffs), rel=1e-9)
    assert got["beta"] == pytest.approx(max(d / (e * gn) for d, e in zip(diffs, etas)), rel=1e-9)


def test_noisy_bn_shifts_each_unit_and_uses_the_mean_in_eval():
    layer = ics.NoisyBN(5, 1.0, 2.0, torch.Generator().manual_seed(0)).double()
    x = torch.randn(64, 5, dtype=torch.float64) * 3 + 1
    layer.resample()
    y = layer(x)
    assert torch.allclose(y.mean(0), layer.shift.double(), atol=1e-9)  # BN output has mean 0
    assert torch.all((layer.scale >= 1) & (layer.scale <= 2))
    before = layer.scale.clone()
    layer.resample()
    assert not torch.equal(before, layer.scale)
    layer.eval()
    bn_eval = layer.bn(x)
    assert torch.allclose(layer(x), 1.5 * bn_eval)
