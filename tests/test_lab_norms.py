"""Tests of the lab's `norms` experiment: a mini run on the tiny data set, the verdict
following the metrics, and the layers against torch's functional forms."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import bnkit
from bnkit.lab import norms, store
from bnkit.lab.models import make_cnn


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("norms")


def test_mini_run_measures_every_norm_at_every_batch(mini_run):
    cfg, res = mini_run
    exp = cfg["experiments"]["norms"]
    assert res.status == "finished" and res.errors == 0
    recs = store.read_records(res.run_dir)
    assert len(recs) == 2 * len(exp["norms"]) * len(exp["batches"])
    for r in recs:
        m = r["metrics"]
        assert 0.0 <= m["acc"] <= 1.0 and m["ms_per_step"] > 0 and m["last_loss"] > 0
    md = res.report_md.read_text()
    assert norms.TITLE in md and "CPU time per training step" in md
    assert (res.run_dir / "plots" / "norms.png").read_bytes()[:4] == b"\x89PNG"


def _records(bn_small: list[float], gn_small: list[float], large: float = 0.8) -> list[dict]:
    recs = []
    for seed, (b, g) in enumerate(zip(bn_small, gn_small)):
        for norm, acc_small in (("bn", b), ("group", g)):
            for batch, acc in ((2, acc_small), (32, large)):
                recs.append({"variant": {"norm": norm, "batch": batch}, "seed": seed,
                             "metrics": {"acc": acc, "ms_per_step": 1.0, "last_loss": 0.5}})
    return recs


def test_verdict_follows_the_metrics():
    cfg = {**norms.PROFILES["quick"], "norms": ["bn", "group"]}
    holds = norms.summarize(cfg, _records([0.30, 0.32, 0.31], [0.70, 0.72, 0.71]))
    assert holds.verdict == "holds"
    assert "The claim holds in this run" in " ".join(holds.paragraphs)
    assert "BN lost 49.0 ± 1.0 (n=3) points" in holds.paragraphs[0]
    flipped = norms.summarize(cfg, _records([0.70, 0.72, 0.71], [0.30, 0.32, 0.31]))
    assert flipped.verdict == "does not hold"
    assert "does NOT hold in this run, contrary to the paper" in " ".join(flipped.paragraphs)
    noisy = norms.summarize(cfg, _records([0.30, 0.80, 0.55], [0.70, 0.20, 0.45]))
    assert noisy.verdict == "inconclusive"


def test_stuck_runs_are_named():
    cfg = {**norms.PROFILES["quick"], "norms": ["bn", "group"]}
    recs = _records([0.1, 0.1, 0.1], [0.7, 0.7, 0.7])
    recs[0]["metrics"]["last_loss"] = 2.3  # BN, batch 2, seed 0
    text = " ".join(norms.summarize(cfg, recs).paragraphs)
    assert "did not train: BN at batch 2 (1 of 3 seeds)." in text


@pytest.mark.parametrize("kind", ["layer", "instance", "group"])
def test_torch_norm_layers_match_their_functional_forms(kind):
    """Each block's norm layer normalizes as torch's functional form says (default affine)."""
    model = make_cnn((4, 6), norms.norm_layer(kind, groups=4), seed=0)
    layers = [model[1], model[5]]
    x = torch.randn(3, 4, 28, 28, dtype=torch.float64)
    layer = copy.deepcopy(layers[0]).double()
    want = {"layer": lambda: F.layer_norm(x, (4, 28, 28), eps=layer.eps),
            "instance": lambda: F.instance_norm(x, eps=layer.eps),
            "group": lambda: F.group_norm(x, 4, eps=layer.eps)}[kind]()
    torch.testing.assert_close(layer(x), want)
    if kind == "layer":  # the second block sees 14 x 14 maps
        assert layers[1].normalized_shape == (6, 14, 14)
    if kind == "group":  # 4 groups do not divide 6 channels: lowered to 3
        assert layers[1].num_groups == 3
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_no_norm_keeps_the_conv_bias_and_bn_drops_it():
    plain = make_cnn((4, 8), norms.norm_layer("none", 4), seed=0)
    bn = make_cnn((4, 8), norms.norm_layer("bn", 4), seed=0)
    assert plain[0].bias is not None and bn[0].bias is None
    assert isinstance(bn[1], bnkit.nn.BatchNorm2d)


def test_step_clock_takes_the_median_step():
    class Bar:
        n = 0

        def advance(self):
            self.n += 1

    clock = norms.StepClock(Bar())
    clock.times = [0.001, 0.002, 5.0]  # one slow step (a compilation) does not move it
    assert clock.median() == 0.002
    clock.advance()
    assert clock.bar.n == 1 and len(clock.times) == 4


def test_learning_rate_scales_with_the_square_root_of_the_batch():
    cfg = norms.PROFILES["quick"]
    assert norms.lr_at(cfg, 32) == pytest.approx(0.02)
    assert norms.lr_at(cfg, 2) == pytest.approx(0.02 / 4)
    assert norms.lr_at(cfg, 8) == pytest.approx(0.01)
