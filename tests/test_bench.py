"""bnkit.bench: the tables' bookkeeping, the model definitions against torchvision's and
against torch's BN in float64, the first-call probe, and the package's import rules.
No timing is asserted (times depend on the machine); ratios are checked to follow from the
times they are made of.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

import pytest
import torch

import bnkit
from bnkit import bench
from bnkit.bench import backends, cli, models, nets
from bnkit.bench.firstcall import first_call

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def reference_backend():
    """The models on the reference backend: the compiled kernels have their own tests."""
    previous = bnkit.get_backend()
    bnkit.set_backend("reference")
    yield
    bnkit.set_backend(previous)


# ---- bnkit bench: options, rows and JSON ---------------------------------------------------

def _bench_args(*extra: str, **kw):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--no-compile", "--no-models", "--no-first-call", "--repeats", "1",
                              "--warmup", "0", *extra])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("field,value,message", [
    ("threads", 0, r"--threads must be an integer from 1 to \d+ \(4 per CPU core"),
    ("threads", 100000, r"this machine has \d+\), got 100000"),
    ("repeats", 0, r"--repeats must be >= 1 and --warmup >= 0 \(got 0 and 0\)"),
    ("shapes", "8", r"at least N and C.*\(got '8'\)"),
    ("model_batch", 1, r"batch >= 2, an image size >= 32.*\(got batch 1, size 112.*--model-batch"),
    ("model_size", 16, r"\(got batch 16, size 16, width 1.0\)")])
def test_bench_rejects_bad_options(field, value, message):
    args = _bench_args(**{field: value})
    args.models = field.startswith("model")
    with pytest.raises(ValueError, match=message):
        bench.main(args)


def test_models_and_no_models_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        _bench_args("--models")  # with --no-models from _bench_args
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_rows_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(_bench_args(shapes="6x4x5x5", json=str(path), threads=1)) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(path.read_text())
    rows = data["rows"]
    variants = {f"bnkit {n}" for n in backends.cpu_backends()} | {"torch"}
    for layout in ("nchw", "nhwc"):
        for phase in bench.PHASES:
            got = {r["variant"]: r for r in rows if r["layout"] == layout and r["phase"] == phase}
            assert set(got) == variants
            for r in got.values():  # ratio and bandwidth follow from the times
                assert r["x_torch"] == pytest.approx(got["torch"]["ms"] / r["ms"])
                nbytes = 6 * 4 * 5 * 5 * 4
                assert r["gbps"] == pytest.approx(bench.PASSES[phase] * nbytes / (r["ms"] * 1e6))
        copy_ = [r for r in rows if r["layout"] == layout and r["variant"] == "copy_"]
        assert len(copy_) == 1 and copy_[0]["pct_copy"] == pytest.approx(100.0)
    assert data["env"]["torch threads"] == 1 and "load_after" in data["env"]
    assert data["models"] == data["vision_models"] == [] and data["first_call"] is None
    assert "6x4x5x5" in capsys.readouterr().out


def test_sections_follow_the_options():
    keys = lambda *a: [s.key for s in cli.sections(_bench_args(*a), 1)]
    assert keys() == ["rows"]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    only = parser.parse_args(["--models"])
    assert [s.key for s in cli.sections(only, 1)] == ["models", "vision_models", "first_call"]
    full = parser.parse_args([])
    assert [s.key for s in cli.sections(full, 1)] == ["rows", "models", "vision_models",
                                                      "first_call"]


def test_bench_models_alone_through_the_command(tmp_path, capsys, monkeypatch, reference_backend):
    """`--models`: the model sections only, printed and in the JSON (tiny sizes)."""
    monkeypatch.setattr(backends, "cpu_backends", lambda: ["reference"])
    path = tmp_path / "models.json"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--models", "--no-first-call", "--repeats", "1", "--warmup", "0",
                              "--model-batch", "2", "--model-size", "32", "--model-width",
                              "0.25", "--json", str(path)])
    assert bench.main(args) == 0
    data = json.loads(path.read_text())
    assert data["rows"] == [] and data["first_call"] is None
    assert {(r["model"], r["variant"]) for r in data["models"]} == {
        (m, v) for m in ("mlp", "cnn") for v in ("torch", "bnkit auto", "bnkit reference")}
    assert [(r["model"], r["phase"]) for r in data["vision_models"]] == [
        (m, p) for m in nets.MODELS for p in ("train step", "eval")]
    out = capsys.readouterr().out
    assert "resnet18      2x3x32x32  train step" in out and "mobilenet_v2" in out


@pytest.mark.parametrize("training", [True, False])
def test_bench_formula_matches_torch(training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64, generator=g) * 2 + 0.5
    w, b = (torch.randn(3, dtype=torch.float64, generator=g) for _ in range(2))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    want = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    torch.testing.assert_close(bench.formula_bn(x, rm, rv, w, b, training), want)


# ---- the networks ---------------------------------------------------------------------------

def test_networks_match_torchvision_sizes():
    """Parameter counts torchvision documents for resnet18 and mobilenet_v2, the number of
    BN layers, and the output shape of a small input."""
    r, m = nets.resnet18(), nets.mobilenet_v2()
    assert sum(p.numel() for p in r.parameters()) == 11_689_512
    assert sum(p.numel() for p in m.parameters()) == 3_504_872
    assert nets.count_bn(r) == 20 and nets.count_bn(m) == 52
    assert list(r.state_dict())[:2] == ["conv1.weight", "bn1.weight"]  # torchvision's keys
    assert "features.18.1.running_var" in m.state_dict() and "classifier.1.weight" in m.state_dict()
    x = torch.randn(2, 3, 32, 32)
    assert r(x).shape == m(x).shape == (2, 1000)
    assert nets.mobilenet_v2(classes=7, width_mult=0.5)(x).shape == (2, 7)
    assert [nets.make_divisible(v) for v in (32 * 0.5, 24 * 0.35, 1280 * 1.4)] == [16, 8, 1792]


@pytest.mark.parametrize("name", sorted(nets.MODELS))
def test_converted_models_equal_torch_in_float64(name, reference_backend):
    """The bnkit model of `model_pair` against the torch one it came from: same output,
    parameter gradients and running statistics in training, same output in eval."""
    ref, bnk = models.model_pair(name, classes=10)
    assert nets.count_bn(bnk) == nets.count_bn(ref)
    assert all(isinstance(m, bnkit.nn.BatchNorm2d) for m in bnk.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    ref, bnk = ref.double(), bnk.double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    outs = []
    for model in (ref, bnk):
        torch.manual_seed(1)  # the same dropout mask (MobileNetV2's classifier)
        y = model.train()(x)
        y.square().sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-12)
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for (n, p), q in zip(ref.named_parameters(), bnk.parameters()):
        # within 1e-9 of each tensor's largest gradient; BN biases followed by a conv and
        # another BN have a true gradient of 0 (rounding noise of ~1e-11 x scale here)
        err = (q.grad - p.grad).abs().max()
        assert err <= 1e-9 * p.grad.abs().max() + 1e-12 * scale, (n, float(err))
    for (n, b), c in zip(ref.named_buffers(), bnk.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(bnk.eval()(x), ref.eval()(x), rtol=1e-9, atol=1e-12)


def test_model_pair_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"model must be one of \['mobilenet_v2', "
                                         r"'resnet18'\] \(got 'vgg'\)"):
        models.model_pair("vgg")


def test_vision_model_rows(reference_backend):
    rows = models.run_vision_models(batch=2, size=32, repeats=1, warmup=0, width_mult=0.25)
    assert [(r["model"], r["phase"]) for r in rows] == [
        (m, p) for m in nets.MODELS for p in ("train step", "eval")]
    for r in rows:
        assert r["input"] == "2x3x32x32" and r["torch_ms"] > 0 and r["bnkit_ms"] > 0
        assert r["x_torch"] == pytest.approx(r["torch_ms"] / r["bnkit_ms"])
    assert bnkit.get_backend() == "reference"


# ---- first call -----------------------------------------------------------------------------

def test_first_call_probe_in_a_fresh_home():
    r = first_call((4, 3, 5, 5), timeout=300, env={"BNKIT_BACKEND": "reference"})
    assert "error" not in r, r
    assert r["backend"] == "reference" and r["bnkit"] == bnkit.__version__
    assert r["home"] != os.path.expanduser("~") and r["home_files_before"] == 0
    assert r["shape"] == [4, 3, 5, 5]
    for key in ("import_torch_ms", "import_bnkit_ms", "first_call_ms", "second_call_ms"):
        assert 0 < r[key] < 300_000


def test_first_call_reports_a_failed_process():
    r = first_call((4, 3, 5, 5), timeout=300, env={"BNKIT_BACKEND": "no-such-backend"})
    assert set(r) == {"error", "shape"} and "the process failed (exit 1)" in r["error"]
    assert "no-such-backend" in r["error"]


# ---- fold -------------------------------------------------------------------------------------

def test_bench_fold_smoke():
    r = bench.bench_fold("torch", batch=2, size=8, width=4, repeats=2, warmup=0)
    assert r["folded_pairs"] == r["bn_layers"] == 15 and r["max_rel_diff"] < 1e-5
    assert r["speedup"] == pytest.approx(r["unfolded_ms"] / r["folded_ms"])
    with pytest.raises(ValueError, match="norm must be one of"):
        bench.bench_fold("group")


# ---- import rules -----------------------------------------------------------------------------

def _private_uses(path: Path) -> list[str]:
    """`from X import _name` and `mod._name` where mod was imported from bnkit (relative or
    absolute): private names taken from another bnkit module."""
    tree = ast.parse(path.read_text())
    bnkit_names, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            ours = node.level > 0 or (node.module or "").startswith("bnkit")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                if ours:
                    bnkit_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            bnkit_names |= {a.asname or a.name for a in node.names if a.name.startswith("bnkit")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bnkit_names and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_bench_package_uses_no_private_names():
    files = sorted((ROOT / "src" / "bnkit" / "bench").glob("*.py"))
    files += [ROOT / "benchmarks" / n for n in ("bench_cpu.py", "bench_fold.py", "bench_gpu.py")]
    files += [ROOT / "src" / "bnkit" / "lab" / "kernels.py"]
    assert len(files) > 10
    assert [f for path in files for f in _private_uses(path)] == []


def test_private_use_detector_finds_both_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .phases import _hidden\nfrom .. import kernels\nkernels._native\n")
    assert _private_uses(bad) == ["bad.py:1 imports _hidden", "bad.py:3 uses kernels._native"]


def _import_graph(package: Path, name: str) -> dict[str, set[str]]:
    """{module: modules of the same package it imports at any level} from the source."""
    graph = {}
    for path in package.glob("*.py"):
        mod = f"{name}.{path.stem}" if path.stem != "__init__" else name
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                deps |= {f"{name}.{t.split('.')[0]}" for t in targets}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(name + "."):
                deps.add(".".join(node.module.split(".")[:3]))
        graph[mod] = {d for d in deps if (package / f"{d.rsplit('.', 1)[-1]}.py").exists()}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as a path of module names, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return []
    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_bench_modules_import_one_way():
    graph = _import_graph(ROOT / "src" / "bnkit" / "bench", "bnkit.bench")
    assert graph["bnkit.bench.timing"] == set() and "bnkit.bench.cli" in graph
    assert _cycle({k: v - {"bnkit.bench"} for k, v in graph.items()}) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_bench_touches_kernels_internals():
    """`backends` is the one module of the package that imports bnkit.kernels."""
    users = [p.name for p in (ROOT / "src" / "bnkit" / "bench").glob("*.py")
             if "from .. import kernels" in p.read_text() or "from ..kernels" in p.read_text()]
    assert users == ["backends.py"]


def test_old_modules_are_gone():
    assert not (ROOT / "src" / "bnkit" / "bench.py").exists()
    assert not (ROOT / "src" / "bnkit" / "bench_gpu.py").exists()
    assert not (ROOT / "src" / "bnkit" / "tools" / "fold_bench.py").exists()


def test_bench_memory_section_through_the_command_and_json(tmp_path, capsys):
    """`--memory --json`: the memory section's rows reach the JSON file as objects (they are
    dataclasses), with InPlaceABN saving less than torch's BN + LeakyReLU."""
    path = tmp_path / "memory.json"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--no-models", "--no-first-call", "--no-compile", "--memory",
                              "--shapes", "4x3x5x5", "--repeats", "1", "--warmup", "0",
                              "--json", str(path)])
    assert bench.main(args) == 0
    data = json.loads(path.read_text())
    for style in ("resnet_style", "mobilenet_style"):
        rows = {r["variant"]: r for r in data["memory"][style]}
        assert set(rows) == set(bench.memory.VARIANTS)
        assert all(r["saved_bytes"] > 0 and r["step_s"] > 0 for r in rows.values())
        assert rows["InPlaceABN"]["saved_bytes"] < rows["torch BN + LeakyReLU"]["saved_bytes"]
    assert "saved for backward and step time: resnet_style" in capsys.readouterr().out
