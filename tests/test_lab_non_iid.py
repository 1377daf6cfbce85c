"""Tests of the lab's `non-iid` experiment: a mini run on the tiny data set, the verdict
following the metrics, and the class-skewed batch sampler."""
from __future__ import annotations

import pytest
import torch

from bnkit.lab import non_iid, store


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("non-iid")


def test_mini_run_reports_every_cell(mini_run):
    cfg, result = mini_run
    assert result.status == "finished" and result.errors == 0
    records = store.read_records(result.run_dir)
    assert len(records) == 2 * len(non_iid.cells(cfg["experiments"]["non-iid"]))
    late = cfg["experiments"]["non-iid"]["late_evals"]
    for rec in records:
        m = rec["metrics"]
        assert m["final_acc"] == m["acc"][-1]
        assert m["late_acc"] == pytest.approx(sum(m["acc"][-late:]) / len(m["acc"][-late:]))
    md = result.report_md.read_text()
    assert non_iid.TITLE in md and "Ioffe 2017" in md
    assert (result.run_dir / "plots" / "non-iid.png").read_bytes()[:4] == b"\x89PNG"


def _records(accs: dict) -> list[dict]:
    """accs: {(norm, sampling): late accuracy}; three seeds with a small jitter."""
    return [{"variant": {"norm": n, "sampling": s}, "seed": seed,
             "metrics": {"steps": [1], "acc": [a], "final_acc": a, "late_acc": a + 0.002 * seed}}
            for (n, s), a in accs.items() for seed in range(3)]


def test_verdict_follows_the_metrics():
    cfg = non_iid.PROFILES["quick"]
    accs = {("none", "iid"): 0.8, ("none", "non-iid"): 0.7, ("bn", "iid"): 0.85,
            ("bn", "non-iid"): 0.6, ("renorm", "iid"): 0.85, ("renorm", "non-iid"): 0.8}
    sec = non_iid.summarize(cfg, _records(accs))
    assert sec.verdict == "holds"
    assert "It recovers 80% of BN's drop." in " ".join(sec.paragraphs)
    accs[("bn", "non-iid")] = 0.9  # BN gains with skewed batches: neither check holds
    assert non_iid.summarize(cfg, _records(accs)).verdict == "does not hold"


def test_class_batches_hold_the_asked_classes_in_equal_numbers():
    y = torch.arange(200) % 10
    batches = non_iid.class_batches(y, 32, 2, torch.Generator().manual_seed(3))
    seen = set()
    for _ in range(50):
        idx = next(batches)
        counts = torch.bincount(y[idx], minlength=10)
        assert len(idx) == 32 and sorted(counts.tolist())[-2:] == [16, 16]
        assert int((counts > 0).sum()) == 2
        seen |= set(torch.nonzero(counts).flatten().tolist())
    assert seen == set(range(10))  # every class turns up
    with pytest.raises(ValueError, match="must divide the batch"):
        next(non_iid.class_batches(y, 32, 3, torch.Generator()))
    with pytest.raises(ValueError, match="at least 16 examples"):
        next(non_iid.class_batches(y[:100], 32, 2, torch.Generator()))


def test_models_share_weights_across_norms():
    cfg = non_iid.PROFILES["mini"]
    bn, brn = (non_iid.make_model(cfg, n, 784, seed=4) for n in ("bn", "renorm"))
    assert torch.equal(bn[0].weight, brn[0].weight)
    assert type(brn[1]).__name__ == "BatchRenorm"
