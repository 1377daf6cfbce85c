"""Tests of `bnkit lab`: every experiment end to end on the tiny generated data set (mini
profile), the run folder, resume, interrupts, report rebuilds, and the helpers whose numbers
the report is generated from."""
from __future__ import annotations

import importlib.metadata
import json
import math
import statistics

import pytest
import torch

import bnkit
from bnkit.lab import EXPERIMENTS, cli, config, corruptions, report, runner, sections, store


@pytest.fixture(scope="module")
def reference_backend():
    """BN on the reference backend: no kernel compilation in these short runs."""
    previous = bnkit.get_backend()
    bnkit.set_backend("reference")
    yield
    bnkit.set_backend(previous)


@pytest.fixture(scope="module")
def full_run(tiny_idx_dir, tmp_path_factory, reference_backend):
    """One mini run of every experiment (the bench limited to the reference backend)."""
    from bnkit.bench import backends

    saved = backends.cpu_backends
    backends.cpu_backends = lambda: ["reference"]  # the reference backend alone keeps the kernels experiment short
    try:
        cfg = config.resolve(None, "mini", data=str(tiny_idx_dir))
        result = runner.run_lab(cfg, tmp_path_factory.mktemp("lab") / "run", progress=False,
                                strict=True)
    finally:
        backends.cpu_backends = saved
    return cfg, result


def _planned(cfg) -> int:
    return sum(len(config.experiment_module(n).cells(c)) for n, c in
               cfg["experiments"].items()) * cfg["seeds"]


# ----------------------------------------------------------------------------- end to end

def test_every_experiment_runs_and_reports(full_run):
    cfg, result = full_run
    assert result.status == "finished" and result.errors == 0
    records = store.read_records(result.run_dir)
    assert len(records) == _planned(cfg) == result.cells_run
    assert {r["experiment"] for r in records} == set(EXPERIMENTS)
    md = result.report_md.read_text()
    for name in EXPERIMENTS:
        sec = config.experiment_module(name)
        assert f"## {list(EXPERIMENTS).index(name) + 1}. {sec.TITLE}" in md
        assert (result.run_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "could not be built" not in md and "Not run" not in md
    page = result.report_html.read_text()
    assert page.count('src="data:image/png;base64,') == len(EXPERIMENTS)
    assert "<img" in page and 'src="plots/' not in page  # self-contained


def test_run_folder_holds_config_env_and_run_status(full_run):
    cfg, result = full_run
    d = result.run_dir
    assert store.read_json(d / "config.json") == cfg
    env = store.read_json(d / "env.json")
    assert env["threads"] == 1 and env["cpu_count"] >= 1
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    run = store.read_json(d / "run.json")
    assert run["status"] == "finished" and len(run["sessions"]) == 1
    assert run["sessions"][0]["cells_run"] == _planned(cfg)
    assert "wall time" in result.report_md.read_text()


def test_cell_metrics_are_consistent_with_their_curves(full_run):
    """Derived metrics equal what the saved curves imply (recomputed here)."""
    cfg, result = full_run
    recs = store.read_records(result.run_dir)
    conv = cfg["experiments"]["convergence"]
    for r in (r for r in recs if r["experiment"] == "convergence"):
        m = r["metrics"]
        hit = next((s for s, a in zip(m["steps"], m["acc"]) if a >= conv["target"]), None)
        assert m["steps_to_target"] == hit and m["final_acc"] == m["acc"][-1]
        assert all(lo <= mid <= hi for lo, mid, hi in zip(m["p15"], m["p50"], m["p85"]))
    for r in (r for r in recs if r["experiment"] == "robustness"):
        for method, accs in r["metrics"]["acc"].items():
            assert r["metrics"]["mean_err"][method] == pytest.approx(1 - statistics.mean(accs))
    for r in (r for r in recs if r["experiment"] == "inference"):
        assert r["metrics"]["max_rel_diff"] < 1e-4  # folding is exact up to rounding
        assert r["metrics"]["speedup"] == pytest.approx(
            r["metrics"]["ms_bn"] / r["metrics"]["ms_folded"])


def test_report_command_rebuilds_the_same_report(full_run, capsys):
    _, result = full_run
    before = result.report_md.read_text()
    result.report_md.unlink()
    assert cli.cli(["report", str(result.run_dir)]) == 0
    assert result.report_md.read_text() == before
    assert str(result.report_html) in capsys.readouterr().out


def _recurrent_records(bn_accs, lstm_accs) -> list[dict]:
    """Hand-made recurrent records, one per seed and cell (final accuracies as given)."""
    recs = []
    for cell, accs in (("bnlstm", bn_accs), ("lstm", lstm_accs)):
        for seed, acc in enumerate(accs):
            recs.append({"experiment": "recurrent", "variant": {"cell": cell}, "seed": seed,
                         "key": f"recurrent|{cell}|{seed}",
                         "metrics": {"steps": [2, 4], "acc": [acc / 2, acc], "loss": [2.0, 1.0],
                                     "final_acc": acc}})
    return recs


def test_summary_numbers_come_from_the_metrics(full_run, tmp_path):
    """Edit the saved metrics, rebuild: the generated text and the verdict follow them."""
    import shutil

    _, result = full_run
    d = tmp_path / "copy"
    shutil.copytree(result.run_dir, d)
    cfg = store.read_json(d / "config.json")  # rebuild only this experiment: faster
    cfg["experiments"] = {"recurrent": cfg["experiments"]["recurrent"]}
    store.write_json(d / "config.json", cfg)

    def build(bn_accs, lstm_accs) -> str:
        lines = [json.dumps(r) for r in _recurrent_records(bn_accs, lstm_accs)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return report.build(d)[0].read_text()

    md = build([0.90, 0.91, 0.89], [0.20, 0.21, 0.19])
    assert "BN-LSTM 90.0% test accuracy, LSTM 20.0%" in md
    assert "the claim holds (BN-LSTM minus LSTM: difference +70.0 ± 0.8 points" in md
    assert "**Verdict in this run:** holds." in md
    md = build([0.10, 0.11, 0.09], [0.20, 0.21, 0.19])
    assert "the claim does not hold" in md and "**Verdict in this run:** does not hold." in md


def test_a_verdict_becomes_inconclusive_when_the_spread_grows():
    """Same means, wider seed-to-seed spread: 'holds' turns 'inconclusive' (2 standard errors)."""
    from bnkit.lab import recurrent

    cfg = config.resolve(["recurrent"], "mini")["experiments"]["recurrent"]
    tight = recurrent.summarize(cfg, _recurrent_records([0.60, 0.61, 0.59], [0.50, 0.51, 0.49]))
    assert tight.verdict == "holds"
    # the same means 0.60 vs 0.50; stdev 0.15 each: se = 0.15 * sqrt(2/3) = 0.122 > 0.10 / 2
    wide = recurrent.summarize(cfg, _recurrent_records([0.45, 0.60, 0.75], [0.35, 0.50, 0.65]))
    assert wide.verdict == "inconclusive"
    se = math.sqrt(2 * statistics.stdev([0.45, 0.60, 0.75]) ** 2 / 3)
    assert f"2 standard errors {100 * 2 * se:.1f}" in " ".join(wide.paragraphs)
    one_seed = recurrent.summarize(cfg, _recurrent_records([0.9], [0.1]))
    assert one_seed.verdict == "inconclusive"  # one seed decides nothing
    assert "fewer than 2 seeds" in " ".join(one_seed.paragraphs)


# ----------------------------------------------------------------------------- interrupt, resume

def _mini(tiny_idx_dir, names=("convergence", "init")):
    return config.resolve(list(names), "mini", data=str(tiny_idx_dir))


def test_interrupt_keeps_finished_cells_and_resume_runs_the_rest(tiny_idx_dir, tmp_path,
                                                                monkeypatch, reference_backend):
    from bnkit.lab import init as init_exp

    real, calls = init_exp.run_cell, []

    def flaky(ctx, cfg, variant, seed):
        calls.append(variant)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, cfg, variant, seed)

    monkeypatch.setattr(init_exp, "run_cell", flaky)
    cfg = _mini(tiny_idx_dir)
    res = runner.run_lab(cfg, tmp_path / "run", progress=False, strict=True)
    assert res.status == "interrupted"
    done = store.read_records(res.run_dir)
    assert res.cells_run == len(done)
    n_conv = len(config.experiment_module("convergence").cells(cfg["experiments"]["convergence"]))
    assert len(done) == n_conv + 1  # every convergence cell and the first init cell
    md = res.report_md.read_text()
    assert "PARTIAL report" in md and f"| 1/{len(init_exp.cells(cfg['experiments']['init']))} |" in md
    monkeypatch.setattr(init_exp, "run_cell", real)
    calls.clear()
    again = runner.run_lab({}, res.run_dir, resume=True, progress=False, strict=True)
    assert again.status == "finished" and again.cells_run == _planned(cfg) - len(done)
    final = store.read_records(res.run_dir)
    assert len(final) == _planned(cfg)
    assert final[:len(done)] == done  # finished cells untouched
    run = store.read_json(res.run_dir / "run.json")
    assert [(s["status"], s["cells_run"]) for s in run["sessions"]] == [
        ("interrupted", len(done)), ("finished", _planned(cfg) - len(done))]
    assert "PARTIAL" not in again.report_md.read_text()


def test_sigterm_is_an_interrupt_that_keeps_finished_cells(tiny_idx_dir, tmp_path, monkeypatch,
                                                         reference_backend):
    import os
    import signal

    from bnkit.lab import init as init_exp

    real, calls = init_exp.run_cell, []

    def killed(ctx, cfg, variant, seed):
        calls.append(variant)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(ctx, cfg, variant, seed)

    monkeypatch.setattr(init_exp, "run_cell", killed)
    before = signal.getsignal(signal.SIGTERM)
    res = runner.run_lab(_mini(tiny_idx_dir, ["init"]), tmp_path / "run", progress=False,
                         strict=True)
    assert res.status == "interrupted"
    assert len(store.read_records(res.run_dir)) == 1  # the cell before the signal
    assert store.read_json(res.run_dir / "run.json")["sessions"][0]["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


def test_resume_of_a_finished_run_runs_nothing(tiny_idx_dir, tmp_path, reference_backend):
    cfg = _mini(tiny_idx_dir, ["init"])
    first = runner.run_lab(cfg, tmp_path / "run", progress=False, strict=True)
    again = runner.run_lab({}, first.run_dir, resume=True, progress=False, strict=True)
    assert again.cells_run == 0 and again.status == "finished"
    assert len(store.read_records(first.run_dir)) == _planned(cfg)


def test_failing_cell_is_recorded_and_the_run_goes_on(tiny_idx_dir, tmp_path, monkeypatch,
                                                      reference_backend):
    from bnkit.lab import init as init_exp

    def broken(ctx, cfg, variant, seed):
        raise RuntimeError("boom")

    monkeypatch.setattr(init_exp, "run_cell", broken)
    cfg = _mini(tiny_idx_dir)
    res = runner.run_lab(cfg, tmp_path / "run", progress=False, jobs=1)
    n_init = len(init_exp.cells(cfg["experiments"]["init"]))
    assert res.status == "failed" and res.errors == n_init
    assert "Cell failed: init|" in res.report_md.read_text() and "RuntimeError: boom" in \
        res.report_md.read_text()


# ----------------------------------------------------------------------------- CLI and config

def test_cli_lab_runs_and_prints_the_summary(tiny_idx_dir, tmp_path, capsys, reference_backend):
    out = tmp_path / "run"
    code = cli.cli(["lab", "init", "--mini", "--data", str(tiny_idx_dir), "--out", str(out),
                    "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0 and "## Summary" in text and str(out / "report.html") in text
    assert (out / "report.md").exists()


def test_bnkit_command_registers_lab_and_report():
    from bnkit import cli as main_cli

    parser = main_cli.build_parser()
    args = parser.parse_args(["lab", "init", "--full", "--seeds", "4"])
    assert (args.command, args.experiments, args.profile, args.seeds) == ("lab", ["init"],
                                                                          "full", 4)
    assert parser.parse_args(["report", "some/dir"]).run_dir == "some/dir"


@pytest.mark.parametrize("argv, words", [
    (["lab", "nope"], ["unknown experiment 'nope'", "convergence"]),
    (["lab", "init", "--full", "--seeds", "2"], ["at least 3 seeds", "got 2"]),
])
def test_cli_rejects_bad_arguments(argv, words):
    with pytest.raises(ValueError) as err:
        cli.cli(argv)
    assert all(w in str(err.value) for w in words)


def test_resume_refuses_new_options(tmp_path):
    with pytest.raises(ValueError, match="--resume continues a run .* no EXPERIMENT, --seeds"):
        cli.cli(["lab", "init", "--seeds", "2", "--resume", str(tmp_path)])


def test_report_of_a_folder_without_a_run_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a lab run folder: it has no config.json"):
        cli.cli(["report", str(tmp_path)])


def test_new_run_refuses_a_folder_holding_a_run(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a lab run; continue it with --resume"):
        runner.new_run_dir(tmp_path)


def test_resolve_defaults_and_errors():
    cfg = config.resolve()
    assert list(cfg["experiments"]) == list(EXPERIMENTS)
    assert (cfg["profile"], cfg["seeds"], cfg["threads"]) == ("quick", 3, 1)
    assert config.resolve(["init"], "full")["seeds"] == 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stepz'\]"):
        config.resolve(["init"], overrides={"init": {"stepz": 3}})
    with pytest.raises(ValueError, match="overrides name experiments that are not run"):
        config.resolve(["init"], overrides={"convergence": {"steps": 3}})
    with pytest.raises(ValueError, match="profile must be one of"):
        config.resolve(profile="huge")
    with pytest.raises(ValueError, match="threads must be an integer from 1 to"):
        config.resolve(threads=0)
    with pytest.raises(ValueError, match="experiment names must be unique"):
        config.resolve(["init", "init"])


def test_overrides_reach_the_cells():
    cfg = config.resolve(["convergence"], "mini", overrides={"convergence": {"lrs": [0.3]}})
    cells = config.experiment_module("convergence").cells(cfg["experiments"]["convergence"])
    assert cells == [{"lr": 0.3, "bn": False}, {"lr": 0.3, "bn": True}]


# ----------------------------------------------------------------------------- helpers

def test_spread_and_fmt_match_statistics():
    vals = [0.861, 0.864, 0.858, None, math.nan]
    s = sections.spread(vals)
    finite = [0.861, 0.864, 0.858]
    assert (s.n, s.lo, s.hi) == (3, 0.858, 0.864)
    assert s.mean == pytest.approx(statistics.mean(finite))
    assert s.std == pytest.approx(statistics.stdev(finite))
    assert sections.fmt(vals, 100) == (f"{100 * statistics.mean(finite):.1f} ± "
                                       f"{100 * statistics.stdev(finite):.1f} (n=3)")
    assert sections.fmt([0.5]) == "0.5 (n=1)" and sections.fmt([]) == "–"


def test_records_ignore_torn_lines_and_keep_the_last_duplicate(tmp_path):
    a = {"key": "a", "experiment": "x", "variant": {}, "seed": 0, "metrics": {"v": 1}}
    store.append_record(tmp_path, a)
    store.append_record(tmp_path, {**a, "metrics": {"v": 2}})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"key": "b", "experim')  # killed while writing
    assert store.read_records(tmp_path) == [{**a, "metrics": {"v": 2}}]
    assert store.cell_key("e", {"b": 1, "a": 2}, 3) == store.cell_key("e", {"a": 2, "b": 1}, 3)


def test_duration_text():
    assert report.duration(9.25) == "9.2 s" and report.duration(61.5) == "1 min 2 s"


def test_corruptions_match_their_formulas():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    c = corruptions.LEVELS["contrast"][2]
    torch.testing.assert_close(corruptions.corrupt(x, "contrast", 3), (x - m) * c + m)
    b = corruptions.LEVELS["brightness"][4]
    torch.testing.assert_close(corruptions.corrupt(x, "brightness", 5), (x + b).clamp(0, 1))
    flat = torch.full((2, 1, 28, 28), 0.3)
    torch.testing.assert_close(corruptions.corrupt(flat, "pixelate", 5), flat)
    inner = corruptions.corrupt(flat, "blur", 5)[..., 6:-6, 6:-6]  # away from the zero padding
    torch.testing.assert_close(inner, torch.full_like(inner, 0.3))
    p = corruptions.LEVELS["impulse_noise"][4]
    big = torch.full((1, 1, 200, 200), 0.5)
    frac = (corruptions.corrupt(big, "impulse_noise", 5) != 0.5).double().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / big.numel())
    noisy = corruptions.corrupt(big, "gaussian_noise", 1, seed=3)
    assert abs((noisy - 0.5).std().item() - corruptions.LEVELS["gaussian_noise"][0]) < 0.005
    torch.testing.assert_close(corruptions.corrupt(x, "blur", 0), x)


def test_corrupt_rejects_unknown_names_and_severities():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corruptions.corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match=r"severity must be an int in 0..5 \(got 6\)"):
        corruptions.corrupt(x, "blur", 6)


def test_convergence_text_says_when_the_claim_fails():
    """Synthetic records where BN is slower: the generated text must say so."""
    from bnkit.lab import convergence

    cfg = {**convergence.PROFILES["mini"], "lrs": [0.1]}

    def rec(bn, hit, p50, seed):
        return {"variant": {"lr": 0.1, "bn": bn}, "seed": seed, "metrics": {
            "steps": [10, 20, 30], "acc": [0.1, 0.5, 0.6], "loss": [1, 1, 1],
            "p15": [p - 1 for p in p50], "p50": p50, "p85": [p + 1 for p in p50],
            "final_acc": 0.6, "steps_to_target": hit, "ms_per_step": 1.0}}

    recs = [r for s in range(3) for r in (rec(False, 10, [0.0, 0.0, 0.1 + 0.01 * s], s),
                                          rec(True, 30, [0.0, 1.0, 2.0 + 0.1 * s], s))]
    sec = convergence.summarize(cfg, recs)
    text = " ".join(sec.paragraphs)
    assert sec.verdict == "does not hold"
    assert "With BN, 30% test accuracy after 30 steps; without, after 10 steps (ratio 0.3x)" in text
    assert "Fewer steps with BN: does not hold (" in text and "-20 ± 0 (" in text
    assert "A more stable input with BN: does not hold" in text
    assert "contradicts the paper's Figure 1" in text and "does not hold at 0.1" in text


def test_micro_batches_sum_to_the_full_batch_gradient():
    """Without batch statistics, k-example chunks give exactly the batch-of-B gradient."""
    from bnkit.lab.train import _step

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss_full = _step(model, x, y, None)
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_micro = _step(model, x, y, 2)
    assert loss_micro == pytest.approx(loss_full, rel=1e-12)
    for g, p in zip(full, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


def test_micro_batches_give_bn_k_examples():
    """BN over micro-batches of k equals GhostBN-style per-chunk normalization (oracle:
    torch's batch_norm on each chunk in float64)."""
    from bnkit.lab.models import norm2d

    bn = norm2d("bn", 3).double()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64) * 2 + 1
    out = torch.cat([bn(c) for c in x.split(2)])
    ref = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True)
                     for c in x.split(2)])
    torch.testing.assert_close(out, ref)


def test_lab_helpers_reject_bad_input():
    from bnkit.lab.models import norm2d
    from bnkit.lab.train import TrainConfig, fit, images

    with pytest.raises(ValueError, match="unknown norm kind 'batch'.*pass one of those"):
        norm2d("batch", 4)
    with pytest.raises(ValueError, match=r"square images flattened to S\*S features \(got 10"):
        images(torch.zeros(2, 10))
    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"batch must be at most the number .* \(4\), got 8"):
        fit(model, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
            TrainConfig(steps=1, batch=8, lr=1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_missing_dependency_skips_the_experiment_and_says_why(tiny_idx_dir, tmp_path,
                                                              monkeypatch, reference_backend):
    from bnkit.lab import recurrent

    monkeypatch.setattr(recurrent, "requires", lambda cfg: "bnkit.nn has no BNLSTM yet")
    cfg = config.resolve(["recurrent"], "mini", data=str(tiny_idx_dir))
    res = runner.run_lab(cfg, tmp_path / "run", progress=False, strict=True)
    md = res.report_md.read_text()
    assert res.cells_run == 0 and "Not run: bnkit.nn has no BNLSTM yet." in md
    assert "| not run |" in md


# ----------------------------------------------------------------------------- faults

_KILLER = """
import os, signal, sys
from bnkit import set_backend
from bnkit.lab import config, init, runner
set_backend("reference")
real, calls = init.run_cell, []
def run_cell(ctx, cfg, variant, seed):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: as a crash or OOM kill
    return real(ctx, cfg, variant, seed)
init.run_cell = run_cell
runner.run_lab(config.resolve(["init"], "mini", data=sys.argv[1]), sys.argv[2], progress=False,
               jobs=1)
"""


def test_a_run_killed_in_its_first_session_can_be_resumed(tiny_idx_dir, tmp_path,
                                                           reference_backend):
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tiny_idx_dir), str(run_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = store.read_json(run_dir / "run.json")  # written when the session started
    assert run["status"] == "running" and len(run["sessions"]) == 1
    assert len(store.read_records(run_dir)) == 1
    again = runner.run_lab({}, run_dir, resume=True, progress=False, strict=True)
    assert again.status == "finished"
    assert len(store.read_records(run_dir)) == _planned(store.read_json(run_dir / "config.json"))


def test_resume_drops_a_torn_last_line_and_says_so(tiny_idx_dir, tmp_path, capsys,
                                                  reference_backend):
    cfg = _mini(tiny_idx_dir, ["init"])
    first = runner.run_lab(cfg, tmp_path / "run", progress=False, strict=True)
    path = first.run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # the last record, torn mid-write
    capsys.readouterr()
    again = runner.run_lab({}, first.run_dir, resume=True, progress=False, strict=True)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert again.status == "finished" and again.cells_run == 1
    assert len(store.read_records(first.run_dir)) == _planned(cfg)
    assert all(json.loads(line) for line in path.read_text().splitlines())  # all whole


def test_a_record_always_starts_on_its_own_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"key": "b", "experim')  # a torn fragment
    rec = {"key": "a", "experiment": "x", "variant": {}, "seed": 0, "metrics": {}}
    store.append_record(tmp_path, rec)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1] == json.dumps(rec)


@pytest.mark.parametrize("line, words", [
    (b"42", "expected a cell record (a JSON object), got int"),
    (b"null", "got NoneType"),
    (b"[1,2]", "got list"),
    (b'{"experiment": "init"}', "field 'variant' must be an object, got nothing"),
    (b"\xff\xfe", "not UTF-8 text"),
    (b'{"key": "a", "experim', "not valid JSON"),
])
def test_damaged_metrics_line_names_file_line_and_fault(tiny_idx_dir, tmp_path, capsys, line,
                                                        words, reference_backend):
    first = runner.run_lab(_mini(tiny_idx_dir, ["init"]), tmp_path / "run", progress=False,
                           strict=True)
    path = first.run_dir / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + line + b"\n" + b"".join(lines[1:]))
    with pytest.raises(ValueError, match="line 2") as err:
        store.read_records(first.run_dir)
    assert str(path) in str(err.value) and words in str(err.value)
    capsys.readouterr()
    from bnkit import cli as bnkit_cli
    for argv in (["report", str(first.run_dir)], ["lab", "--resume", str(first.run_dir)]):
        assert bnkit_cli.main(argv) == 2
        err_text = capsys.readouterr().err
        assert f"{path}, line 2" in err_text and words in err_text


@pytest.mark.parametrize("text, words", [
    ('{"profile": "huge", "seeds": 1, "threads": 1, "data": null, "experiments": {}}',
     "unknown profile 'huge'"),
    ('{"profile": "mini", "seeds"', "line 1, column"),
    ("[]", "expected a JSON object, got list"),
    ('{"profile": "mini", "seeds": 1, "threads": 1, "data": null, "experiments": {"x": {}}}',
     "unknown experiment(s) ['x']"),
])
def test_damaged_config_is_named(tmp_path, capsys, text, words):
    from bnkit import cli as bnkit_cli

    (tmp_path / "config.json").write_text(text)
    for argv in (["report", str(tmp_path)], ["lab", "--resume", str(tmp_path)]):
        assert bnkit_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "config.json") in err and words in err, err


def test_a_second_process_on_the_same_run_folder_is_refused(tiny_idx_dir, tmp_path,
                                                            reference_backend):
    first = runner.run_lab(_mini(tiny_idx_dir, ["init"]), tmp_path / "run", progress=False,
                           strict=True)
    before = (first.run_dir / "run.json").read_bytes()
    refused = pytest.raises(ValueError, match=r"in use by another bnkit lab process \(pid ")
    with store.locked(first.run_dir), refused:  # as a running `bnkit lab --resume` holds it
        runner.run_lab({}, first.run_dir, resume=True, progress=False)
    assert (first.run_dir / "run.json").read_bytes() == before  # nothing written
    again = runner.run_lab({}, first.run_dir, resume=True, progress=False)  # lock released
    assert again.status == "finished"


def test_same_error_in_every_cell_of_the_first_experiment_stops_the_run(
        tiny_idx_dir, tmp_path, monkeypatch, capsys, reference_backend):
    from bnkit.lab import convergence

    def broken(ctx, cfg, variant, seed):
        raise TypeError("'bool' object is not iterable")

    monkeypatch.setattr(convergence, "run_cell", broken)
    cfg = _mini(tiny_idx_dir)  # convergence, then init
    res = runner.run_lab(cfg, tmp_path / "run", progress=False, jobs=1)
    n_conv = len(convergence.cells(cfg["experiments"]["convergence"]))
    assert res.status == "failed" and res.errors == n_conv and res.cells_run == 0
    assert "the remaining cells were not run" in res.stopped
    err = capsys.readouterr().err
    assert err.count("cell failed: convergence: ") == n_conv
    assert "TypeError: 'bool' object is not iterable" in err and "test_lab.py" in err
    md = res.report_md.read_text()
    assert "Stopped early" in md and "every cell failed" in md


def test_different_errors_do_not_stop_the_run(tiny_idx_dir, tmp_path, monkeypatch,
                                             reference_backend):
    from bnkit.lab import convergence

    def broken(ctx, cfg, variant, seed):
        raise RuntimeError(f"cell {variant}")

    monkeypatch.setattr(convergence, "run_cell", broken)
    res = runner.run_lab(_mini(tiny_idx_dir), tmp_path / "run", progress=False, jobs=1)
    assert res.stopped is None and res.cells_run == _planned(_mini(tiny_idx_dir, ["init"]))


def test_an_on_eval_callback_returning_a_bar_value_is_a_clear_error():
    from bnkit.demo import DemoData, make_mlp, train_classifier

    x, y = torch.rand(32, 16), torch.arange(32) % 10
    data = DemoData(x, y, x, y, "memory")
    with pytest.raises(TypeError, match="on_eval must return a dict of extra columns or None, "
                                        "got bool True"):
        train_classifier(make_mlp(True, 8, 1, in_features=16), data, 2, eval_every=1,
                         batch_size=8, on_eval=lambda row, m: True)


def test_threads_above_the_bound_are_refused_before_anything_runs(tmp_path):
    import os

    with pytest.raises(ValueError, match=f"this machine has {os.cpu_count()}"):
        config.resolve(["init"], "mini", threads=100000)


def test_config_records_the_data_folder_actually_used(tiny_idx_dir, tmp_path, monkeypatch,
                                                      reference_backend):
    monkeypatch.setenv("BNKIT_DATA", str(tiny_idx_dir))
    res = runner.run_lab(config.resolve(["init"], "mini"), tmp_path / "run", progress=False,
                         strict=True)
    assert store.read_json(res.run_dir / "config.json")["data"] == str(tiny_idx_dir)


def test_kernels_alone_needs_no_data_set(isolated):
    cfg = config.resolve(["kernels"], "mini")
    assert runner.data_folder(cfg) is cfg  # nothing to locate, no error
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        runner.data_folder(config.resolve(["init"], "mini"))


def test_compare_decides_by_two_standard_errors():
    a, b = [0.90, 0.91, 0.92], [0.80, 0.81, 0.79]
    se = statistics.stdev(a) ** 2 / 3 + statistics.stdev(b) ** 2 / 3
    assert (statistics.mean(a) - statistics.mean(b)) > 2 * math.sqrt(se)
    assert sections.compare(a, b) == "holds" and sections.compare(b, a) == "does not hold"
    assert sections.compare(b, a, "a < b") == "holds"
    assert sections.compare([0.9, 0.7, 0.85], b) == "inconclusive"  # within 2 SE
    assert sections.compare([0.9], b) == "inconclusive"  # one seed decides nothing
    assert sections.combine(["holds", "holds"]) == "holds"
    assert sections.combine(["holds", "inconclusive"]) == "inconclusive"
    assert sections.combine(["holds", "does not hold"]) == "mixed"
    with pytest.raises(ValueError, match="claim must be"):
        sections.compare(a, b, "a >= b")


# ----------------------------------------------------------------------------- worker processes

def test_jobs_give_the_same_metrics_as_a_serial_run(tiny_idx_dir, tmp_path, reference_backend):
    """Each cell seeds itself and shared artifacts are built once with a fixed seed, so two
    workers produce exactly the serial run's metrics (robustness and transfer share a CNN
    per seed between cells)."""
    cfg = config.resolve(["init", "robustness", "transfer"], "mini", seeds=2,
                         data=str(tiny_idx_dir))
    serial = runner.run_lab(cfg, tmp_path / "serial", progress=False, jobs=1)
    parallel = runner.run_lab(cfg, tmp_path / "parallel", progress=False, jobs=2)
    assert serial.status == parallel.status == "finished"
    assert parallel.cells_run == serial.cells_run == _planned(cfg)
    one = {r["key"]: r["metrics"] for r in store.read_records(serial.run_dir)}
    two = {r["key"]: r["metrics"] for r in store.read_records(parallel.run_dir)}
    assert one == two
    run = store.read_json(parallel.run_dir / "run.json")
    assert run["sessions"][0]["jobs"] == 2
    # the summaries (tables, verdicts, text) are built from the same numbers
    strip = [line for line in serial.report_md.read_text().splitlines()
             if "Wall time" not in line and "| " not in line]
    assert strip == [line for line in parallel.report_md.read_text().splitlines()
                     if "Wall time" not in line and "| " not in line]


def test_a_failing_cell_in_a_worker_is_recorded_and_shown(tiny_idx_dir, tmp_path, capsys,
                                                          reference_backend):
    """A cell that raises in a worker process: recorded with its traceback, shown with its
    error, and the run goes on (here: a corruption the worker does not know)."""
    cfg = config.resolve(["robustness"], "mini", data=str(tiny_idx_dir),
                         overrides={"robustness": {"corruptions": ["contrast", "nonsense"]}})
    res = runner.run_lab(cfg, tmp_path / "run", jobs=2)
    assert res.status == "failed" and res.errors == 1 and res.cells_run == 2
    err = capsys.readouterr().err
    assert "cell failed: robustness: corruption=nonsense, seed 0" in err
    assert "corruptions.py" in err  # the innermost frame, from the worker
    run = store.read_json(res.run_dir / "run.json")
    assert "Traceback" in run["errors"][0]["traceback"]


_INTERRUPTED = """
import sys
from bnkit import set_backend
from bnkit.lab import config, runner
if __name__ == "__main__":
    set_backend("reference")
    cfg = config.resolve(["init"], "mini", seeds=3, data=sys.argv[1],
                         overrides={"init": {"steps": 300, "eval_every": 100}})
    res = runner.run_lab(cfg, sys.argv[2], jobs=2)
    print("STATUS", res.status, res.cells_run, flush=True)
"""


def test_ctrl_c_stops_the_workers_and_keeps_finished_cells(tiny_idx_dir, tmp_path):
    """Ctrl-C (SIGINT to the main process) in a parallel run: the workers are terminated,
    the finished cells and a partial report are kept, and --resume runs the rest."""
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_idx_dir), str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # "[1/12] init: ...: done in ... s" (stdout is a pipe)
    assert first.startswith("[1/12] init: "), first + proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    status, cells_run = out.split("STATUS ")[1].split()
    assert status == "interrupted" and 1 <= int(cells_run) < 12
    assert len(store.read_records(run_dir)) == int(cells_run)
    assert "PARTIAL report" in (run_dir / "report.md").read_text()
    again = runner.run_lab({}, run_dir, resume=True, progress=False, jobs=1)
    assert again.status == "finished" and again.cells_run == 12 - int(cells_run)


def test_jobs_must_be_a_positive_integer(tiny_idx_dir, tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"jobs must be an integer >= 1 \\(got {bad!r}\\)"):
            runner.run_lab(_mini(tiny_idx_dir, ["init"]), tmp_path / "run", jobs=bad)
    assert not (tmp_path / "run").exists()  # refused before anything is made


def test_systematic_failure_in_workers_stops_the_run(tiny_idx_dir, tmp_path, capsys,
                                                     reference_backend):
    """Every convergence cell fails in the workers with one error (hidden size 0): the run
    stops after the first experiment and terminates the workers."""
    cfg = config.resolve(["convergence", "init"], "mini", data=str(tiny_idx_dir),
                         overrides={"convergence": {"hidden": 0}})
    res = runner.run_lab(cfg, tmp_path / "run", jobs=2)
    n_conv = len(config.experiment_module("convergence").cells(cfg["experiments"]["convergence"]))
    assert res.status == "failed" and "the remaining cells were not run" in res.stopped
    run = store.read_json(res.run_dir / "run.json")
    conv_errors = [e for e in run["errors"] if e["key"].startswith("convergence|")]
    assert len(conv_errors) == n_conv
    assert {e["error"] for e in conv_errors} == {
        "ValueError: hidden must be a positive integer, got 0; pass a layer size or count >= 1"}
    assert res.cells_run < len(config.experiment_module("init").cells(cfg["experiments"]["init"]))
    assert capsys.readouterr().err.count("cell failed: convergence: ") == n_conv


def test_paired_differences_cancel_what_a_seed_does_to_both_sides():
    """Seeds that move both sides alike: unpaired, the spread hides a 2-point gain; paired by
    seed, the differences (2.0, 2.1, 1.9 points) decide it."""
    def recs(*errs):
        return [{"seed": s, "variant": {}, "metrics": {"err": e}} for s, e in enumerate(errs)]

    a, b = recs(0.30, 0.50, 0.40), recs(0.28, 0.479, 0.381)
    assert sections.compare(sections.metric(a, "err"), sections.metric(b, "err")) == \
        "inconclusive"
    diffs = sections.paired(a, b, "err")
    assert diffs == pytest.approx([0.02, 0.021, 0.019])
    verdict, how = sections.decide(diffs, "a > b", 100, unit=" points")
    se = statistics.stdev(diffs) / math.sqrt(3)
    assert verdict == "holds" and f"± {100 * se:.1f} points" in how and "3 seeds paired" in how
    assert sections.decide(diffs, "a < b")[0] == "does not hold"
    assert sections.paired(a, b[:2], "err") == pytest.approx([0.02, 0.021])  # common seeds


def test_batch_size_penalty_is_decided_on_paired_seeds():
    from bnkit.lab import batch_size

    cfg = config.resolve(["batch-size"], "mini")["experiments"]["batch-size"]
    small, big = min(cfg["norm_batches"]), cfg["batch"]

    def recs(errs_small, errs_big):
        out = []
        for norm, k, errs in (("bn", small, errs_small), ("bn", big, errs_big)):
            out += [{"experiment": "batch-size", "variant": {"norm": norm, "norm_batch": k},
                     "seed": s, "metrics": {"test_err": e, "test_acc": 1 - e}}
                    for s, e in enumerate(errs)]
        return out

    # every seed 3 points worse at the small batch, whatever the seed's own level
    sec = batch_size.summarize(cfg, recs([0.23, 0.33, 0.28], [0.20, 0.30, 0.25]))
    assert sec.verdict == "holds"
    assert "difference +3.0 ± 0.0 points (2 standard errors 0.0, 3 seeds paired)" in \
        sec.paragraphs[1]
    # the same mean penalty, but it changes sign across seeds: inconclusive
    sec = batch_size.summarize(cfg, recs([0.28, 0.33, 0.23], [0.20, 0.30, 0.25]))
    assert sec.verdict == "inconclusive"
    # a clear gain at the small batch contradicts the claim
    sec = batch_size.summarize(cfg, recs([0.17, 0.27, 0.22], [0.20, 0.30, 0.25]))
    assert sec.verdict == "does not hold"


def test_every_experiment_module_follows_the_protocol():
    """What docs/lab.md's experiment protocol lists: NAME equal to the EXPERIMENTS key, a
    title, a claim, the three profiles as JSON dicts, and the four functions."""
    import json

    from bnkit.lab.config import EXPERIMENTS, PROFILES, experiment_module

    for name in EXPERIMENTS:
        mod = experiment_module(name)
        assert mod.NAME == name
        assert isinstance(mod.TITLE, str) and mod.TITLE and isinstance(mod.CLAIM, str)
        assert set(mod.PROFILES) == set(PROFILES), name
        for profile in PROFILES:
            cfg = mod.PROFILES[profile]
            assert json.loads(json.dumps(cfg)) == cfg, (name, profile)
            assert mod.requires(cfg) is None or isinstance(mod.requires(cfg), str)
            variants = mod.cells(cfg)
            assert variants and all(json.loads(json.dumps(v)) == v for v in variants)
        assert isinstance(getattr(mod, "USES_DATA", True), bool)
        assert callable(mod.run_cell) and callable(mod.summarize)
