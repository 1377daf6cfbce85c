"""Tests of the lab's `gradients` experiment: a mini run on the tiny data set, the verdict
following the metrics, and the measurements against torch.autograd and closed forms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnkit.lab import gradients, store


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("gradients")


def test_mini_run_reports_every_cell(mini_run):
    cfg, result = mini_run
    assert result.status == "finished" and result.errors == 0
    records = store.read_records(result.run_dir)
    assert len(records) == 2 * len(gradients.cells(cfg["experiments"]["gradients"]))
    for rec in records:
        m = rec["metrics"]
        assert len(m["grad_norms"]) == len(m["probe_steps"]) == len(m["log_growth"])
        assert all(len(n) == rec["variant"]["depth"] for n in m["grad_norms"])
        assert m["log_growth"][0] == pytest.approx(gradients.log_growth(m["grad_norms"][0]))
    md = result.report_md.read_text()
    assert gradients.TITLE in md and "Yang et al. 2019" in md
    assert (result.run_dir / "plots" / "gradients.png").read_bytes()[:4] == b"\x89PNG"


def _records(bn_growth: float, plain_growth: float, cfg: dict) -> list[dict]:
    """Hand-made records: growth per layer exp(g) (+ a small per-seed jitter)."""
    depth, recs = max(cfg["depths"]), []
    for act in cfg["acts"]:
        for norm, g in (("none", plain_growth), ("bn", bn_growth), ("bn_res", 1.0)):
            for seed in range(3):
                lg = math.log(g) + 0.001 * seed
                norms = [math.exp(-lg * layer) for layer in range(1, depth + 1)]
                recs.append({"variant": {"arch": "mlp", "act": act, "norm": norm,
                                         "depth": depth}, "seed": seed,
                             "metrics": {"probe_steps": cfg["probe_steps"],
                                         "grad_norms": [norms] * len(cfg["probe_steps"]),
                                         "log_growth": [lg] * len(cfg["probe_steps"]),
                                         "first_loss": 2.3, "last_loss": 2.0}})
    return recs


def test_verdict_follows_the_metrics():
    cfg = gradients.PROFILES["quick"]
    assert gradients.summarize(cfg, _records(1.2, 0.4, cfg)).verdict == "holds"
    flipped = gradients.summarize(cfg, _records(3.0, 0.9, cfg))
    assert flipped.verdict == "does not hold"
    assert "does NOT hold" in " ".join(flipped.paragraphs)


def test_layer_grad_norms_match_autograd():
    """Per-layer |dL/dW| against torch.autograd.grad on the same net in float64."""
    for arch, norm in (("mlp", "bn"), ("mlp", "none"), ("cnn", "bn_res")):
        net = gradients.DeepNet(arch, 3, 4, "tanh", norm, pool=7, seed=1).double()
        x, y = torch.rand(6, 784, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 5])
        F.cross_entropy(net(x), y).backward()
        weights = [layer.weight_layer.weight for layer in net.hidden]
        expected = torch.autograd.grad(F.cross_entropy(net(x), y), weights)
        got = gradients.layer_grad_norms(net)
        assert got == pytest.approx([float(g.norm()) for g in expected], rel=1e-10)


def test_log_growth_of_a_geometric_sequence():
    for ratio in (0.5, 1.0, 1.3):
        norms = [7.0 * ratio ** -layer for layer in range(1, 11)]  # grows by `ratio` inwards
        assert math.exp(gradients.log_growth(norms)) == pytest.approx(ratio, rel=1e-12)
    assert math.isnan(gradients.log_growth([1.0]))
    assert math.isnan(gradients.log_growth([1.0, 0.0]))


def test_residual_variant_adds_the_input_from_the_second_layer_on():
    net = gradients.DeepNet("mlp", 3, 5, "relu", "bn_res")
    assert [layer.residual for layer in net.hidden] == [False, True, True]
    plain = gradients.DeepNet("mlp", 3, 5, "relu", "none")
    assert all(layer.weight_layer.bias is not None for layer in plain.hidden)
    with pytest.raises(ValueError, match="norm in"):
        gradients.DeepNet("mlp", 3, 5, "relu", "layer")
