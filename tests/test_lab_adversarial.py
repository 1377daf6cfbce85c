"""Tests of the lab's `adversarial` experiment: a mini run on the tiny data set, the verdict
following the metrics, and the attacks against closed forms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnkit.demo import DemoData
from bnkit.lab import adversarial, store


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("adversarial")


def test_mini_run_attacks_both_networks(mini_run):
    cfg, res = mini_run
    exp = cfg["experiments"]["adversarial"]
    assert res.status == "finished" and res.errors == 0
    recs = store.read_records(res.run_dir)
    assert sorted((r["variant"]["bn"], r["seed"]) for r in recs) == [
        (False, 0), (False, 1), (True, 0), (True, 1)]
    for r in recs:
        m = r["metrics"]
        assert 0 <= m["steps"] <= exp["max_steps"] and 0 <= m["clean_acc"] <= 1
        assert len(m["fgsm"]) == len(m["pgd"]) == len(exp["eps"])
        assert len(m["noise"]) == len(exp["sigmas"])
    md = res.report_md.read_text()
    assert adversarial.TITLE in md and "Galloway et al. 2019" in md
    assert (res.run_dir / "plots" / "adversarial.png").read_bytes()[:4] == b"\x89PNG"


def _records(bn_acc: list[float], plain_acc: list[float]) -> list[dict]:
    cfg = adversarial.PROFILES["quick"]
    recs = []
    for seed, (b, p) in enumerate(zip(bn_acc, plain_acc)):
        for bn, acc in ((True, b), (False, p)):
            recs.append({"variant": {"bn": bn}, "seed": seed, "metrics": {
                "steps": 100, "val_acc": 0.8, "clean_acc": 0.82,
                "fgsm": [acc] * len(cfg["eps"]), "pgd": [acc - 0.05] * len(cfg["eps"]),
                "noise": [acc + 0.05] * len(cfg["sigmas"])}})
    return recs


def test_verdict_follows_the_metrics():
    cfg = adversarial.PROFILES["quick"]
    weaker = adversarial.summarize(cfg, _records([0.40, 0.42, 0.41], [0.60, 0.61, 0.62]))
    assert weaker.verdict == "does not hold"
    text = " ".join(weaker.paragraphs)
    assert "PGD: BN 36.0 ± 1.0 (n=3)%, no BN 56.0 ± 1.0 (n=3)%" in text
    assert "as Galloway et al. 2019 report" in text
    stronger = adversarial.summarize(cfg, _records([0.60, 0.61, 0.62], [0.40, 0.42, 0.41]))
    assert stronger.verdict == "holds"
    assert "This contradicts Galloway et al. 2019" in " ".join(stronger.paragraphs)
    noisy = adversarial.summarize(cfg, _records([0.2, 0.8, 0.5], [0.6, 0.3, 0.5]))
    assert noisy.verdict == "inconclusive"


def _linear(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double().eval()


def test_fgsm_step_is_eps_times_the_sign_of_the_closed_form_gradient():
    """For logits W x + b, d(sum CE)/dx = W^T (softmax - onehot); FGSM adds eps * its sign
    and clips to [0, 1]."""
    model = _linear()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    w, b = model[1].weight, model[1].bias
    flat = x.flatten(1)
    p = torch.softmax(flat @ w.T + b, 1)
    grad = ((p - nn.functional.one_hot(y, 3)) @ w).view_as(x)
    torch.testing.assert_close(adversarial.input_grad(model, x, y), grad.detach())
    eps = 0.1
    want = (x + eps * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(adversarial.fgsm(model, x, y, eps), want.detach())


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3])
def test_pgd_stays_in_the_eps_ball_and_the_image_range(eps):
    model = _linear(1)
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    x[0] = 0.0  # pixels on the range's edges
    x[1] = 1.0
    y = torch.randint(0, 3, (8,))
    adv = adversarial.pgd(model, x, y, eps, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-12
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    again = adversarial.pgd(model, x, y, eps, 5, torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)  # seeded random start


def test_pgd_raises_the_loss_of_a_linear_model():
    """Each PGD step climbs the loss; from a start at x (no room for a random start at
    eps -> the projection), the final loss is above the clean loss."""
    model = _linear(2)
    x = torch.full((16, 1, 4, 4), 0.5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    adv = adversarial.pgd(model, x, y, 0.2, steps=10, generator=torch.Generator().manual_seed(0))
    ce = nn.functional.cross_entropy
    assert ce(model(adv), y) > ce(model(x), y)


def test_gaussian_noise_has_the_asked_std_and_stays_in_range():
    x = torch.full((20000,), 0.5, dtype=torch.float64)
    noisy = adversarial.gaussian(x, 0.1, torch.Generator().manual_seed(0))
    assert float((noisy - x).std()) == pytest.approx(0.1, rel=0.03)  # clipping: < 1e-6 of mass
    wide = adversarial.gaussian(x, 2.0, torch.Generator().manual_seed(0))
    assert wide.min() >= 0.0 and wide.max() <= 1.0


def test_training_stops_at_the_target():
    class Bar:
        def advance(self):
            return None

    torch.manual_seed(0)
    data = DemoData(torch.rand(64, 784), torch.randint(0, 10, (64,)), torch.rand(8, 784),
                    torch.randint(0, 10, (8,)), "random")
    cfg = {**adversarial.PROFILES["mini"], "val": 16}
    model = adversarial.make_cnn((2, 2), "none")
    assert adversarial.train_to_target(model, data, {**cfg, "target": 0.0}, 0, Bar())[0] == 0
    steps, _ = adversarial.train_to_target(model, data, {**cfg, "target": 1.01}, 0, Bar())
    assert steps == cfg["max_steps"]
