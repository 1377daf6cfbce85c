"""bnkit.inspect: per-layer numbers against a hand computation, and the report's views."""
import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from oracles import bn_inputs
from torch import nn

import bnkit
from bnkit.tools import inspect, recalibrate

torch.set_num_threads(1)


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 1), bnkit.nn.BatchNorm2d(4, eps=1e-3)).double()
    with torch.no_grad():
        model[0].weight[5].zero_()  # channel 5 of the first BN input is the constant bias
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 3)
        model[1].weight.copy_(torch.tensor([1.0, -2.0, 1e-4, 0.5, 3.0, 0.001]))
        model[1].bias.uniform_(-1, 1)
        model[4].running_var.fill_(2.0)
    return model.eval()


def make_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1 for n in (5, 7)]


def test_numbers_against_hand_computation():
    model = make_model()
    data = make_data()
    report = inspect(model, data)
    assert [r.name for r in report.layers] == ["1", "4"] and report.num_batches == 2
    for name, z in bn_inputs(model, data).items():
        bn, r = model.get_submodule(name), report[name]
        eps = bn.eps
        mean, var = z.mean(1), z.var(1, unbiased=True)
        gap = (bn.running_mean - mean).abs() / (var + eps).sqrt()
        ratio = torch.log((bn.running_var + eps) / (var + eps))
        assert r.count == z.shape[1] and r.num_features == z.shape[0]
        assert math.isclose(r.mean_gap_max, float(gap.max()), rel_tol=1e-10)
        assert math.isclose(r.mean_gap_mean, float(gap.mean()), rel_tol=1e-10)
        assert math.isclose(r.var_log_ratio_max, float(ratio.abs().max()), rel_tol=1e-10)
        assert math.isclose(r.var_log_ratio_mean, float(ratio.mean()), rel_tol=1e-10)
        w, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
        assert (r.gamma_min, r.gamma_median, r.gamma_max) == pytest.approx(
            (w.min(), np.median(w), w.max()), rel=1e-12)
        assert (r.beta_min, r.beta_median, r.beta_max) == pytest.approx(
            (b.min(), np.median(b), b.max()), rel=1e-12)
        p = np.percentile(z.numpy().ravel(), [15, 50, 85])
        assert (r.input_p15, r.input_p50, r.input_p85) == pytest.approx(tuple(p), rel=1e-12)
    first = report["1"]
    # |gamma| <= 1e-3 * 3.0: channels 2 (1e-4) and 5 (1e-3); channel 5 also has zero variance
    assert first.dead_gamma_share == pytest.approx(2 / 6)
    assert first.dead_var_share == pytest.approx(1 / 6)
    assert first.dead_share == pytest.approx(2 / 6)
    assert report["4"].dead_share == 0.0


def test_model_unchanged_in_either_mode():
    model = make_model()
    model[1].train()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    for mode in ("eval", "train"):
        inspect(model, make_data(), mode=mode)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert [m.training for m in model.modules()] == modes


def test_train_mode_gap_vanishes_after_recalibrate():
    model = recalibrate(make_model(), make_data(), progress=False)
    report = inspect(model, make_data(), mode="train")
    for r in report.layers:
        assert r.mean_gap_max < 1e-9 and r.var_log_ratio_max < 1e-9


def test_sampled_percentiles():
    model = make_model()
    data = make_data()
    exact = inspect(model, data)
    sampled = inspect(model, data, max_values=200)
    z = bn_inputs(model, data)["1"].numpy().ravel()  # 1152 values, 200 kept
    r = sampled["1"]
    assert (r.input_p15, r.input_p50, r.input_p85) != (exact["1"].input_p15,
                                                       exact["1"].input_p50,
                                                       exact["1"].input_p85)
    for q, v in zip((15, 50, 85), (r.input_p15, r.input_p50, r.input_p85)):
        assert np.percentile(z, q - 6) <= v <= np.percentile(z, q + 6)  # a uniform sample
    assert sampled["1"].mean_gap_max == exact["1"].mean_gap_max  # statistics stay exact


def test_masked_inputs_use_valid_positions():
    bn = bnkit.nn.BatchNorm1d(2).double().eval()
    x = torch.tensor([[[1.0, 2.0, 100.0]], [[3.0, 4.0, 100.0]]], dtype=torch.float64)
    x = x.expand(2, 2, 3).contiguous()
    mask = torch.tensor([[True, True, False], [True, True, False]])
    report = inspect(bn, [(x, mask)], forward=lambda m, b: m(b[0], mask=b[1]))
    r = report.layers[0]
    assert r.count == 4 and r.input_p50 == pytest.approx(2.5)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    gap = vals.mean() / (vals.var() + bn.eps).sqrt()  # running mean is 0
    assert r.mean_gap_max == pytest.approx(float(gap), rel=1e-12)


def test_views(tmp_path):
    model = make_model()
    model.add_module("5", nn.BatchNorm2d(4, track_running_stats=False).double())
    report = inspect(model, make_data())
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["mode"] == "eval" and [r["name"] for r in d["layers"]] == ["1", "4", "5"]
    assert d["layers"][2]["mean_gap_max"] is None and d["layers"][2]["dead_share"] == 0.0
    md = report.to_markdown().splitlines()
    assert md[0].startswith("| layer | type | C | mean gap max") and len(md) == 2 + 3
    assert md[2].startswith(f"| 1 | BatchNorm2d | 6 | {report['1'].mean_gap_max:.3g} |")
    path = report.plot(tmp_path / "bn.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "InspectReport(3 layers" in repr(report)


def gfm_cells(line: str) -> list[str]:
    """The cells of a GFM table row: split on pipes not escaped by a backslash, without the
    outer pipes, unescaped (GitHub Flavored Markdown spec, section 4.10)."""
    assert line.startswith("|") and line.endswith("|") and not line.endswith("\\|"), line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line[1:-1])]


def test_markdown_table_has_one_cell_per_column_in_every_row():
    model = make_model()
    model.add_module("odd|name", nn.BatchNorm2d(4).double())  # a pipe in a layer name
    report = inspect(model, make_data())
    lines = report.to_markdown().splitlines()
    head, delim, rows = gfm_cells(lines[0]), gfm_cells(lines[1]), lines[2:]
    assert len(head) == 11 and len(rows) == 3
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in delim) and len(delim) == len(head)
    assert head[5] == "|ln var ratio| max"  # shown as written once rendered
    for line, r in zip(rows, report.layers):
        cells = gfm_cells(line)
        assert len(cells) == len(head), line
        assert cells[:3] == [r.name, r.kind, str(r.num_features)]
    assert gfm_cells(rows[2])[0] == "odd|name"


def test_errors():
    model = make_model()
    with pytest.raises(ValueError, match="mode must be 'eval' or 'train'.*'test'"):
        inspect(model, make_data(), mode="test")
    with pytest.raises(ValueError, match="max_values must be a positive int.*got 0"):
        inspect(model, make_data(), max_values=0)
    with pytest.raises(TypeError, match="iterable of batches"):
        inspect(model, make_data()[0])
    with pytest.raises(KeyError, match="no BN layer named 'x'.*'1', '4'"):
        inspect(model, make_data())["x"]
    with pytest.raises(ValueError, match="no batches"):
        inspect(model, [])


def test_progress_shows_a_bar_over_the_batches(monkeypatch):
    """progress=True wraps the batches in tqdm (it was accepted and ignored before)."""
    import sys
    import types

    seen = []

    def fake_tqdm(iterable, total=None, desc=None, leave=True):
        seen.append((total, desc))
        return iter(iterable)

    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=fake_tqdm))
    data = make_data()
    report = inspect(make_model(), data, progress=True)
    assert seen == [(len(data), "inspect")]
    assert report.num_batches == len(data)
    inspect(make_model(), data)
    assert len(seen) == 1  # the default shows none
