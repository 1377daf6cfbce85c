"""Deployment of models with bnkit layers (docs/deploying.md): torch.onnx.export (dynamo and
legacy) run in onnxruntime, torch.export saved as .pt2, torch.jit.trace and torch.jit.script
saved as TorchScript; the saved files load and run in a process where bnkit cannot be
imported. Oracle: the model's own eager eval output (bnkit's float64-accumulated core),
within float32 rounding (1e-5 relative).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit
import bnkit.nn as bnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploying.md"
TOL = {"rtol": 1e-5, "atol": 1e-5}
C = 6


def _layers():
    """(id, rank of the input, layer) for every layer kind and activation."""
    acts = [(f"act-{a}", 4, lambda a=a: bnn.BatchNormAct(C, act=a))
            for a in ("identity", "relu", "silu", "gelu")]
    return [("bn1d", 3, lambda: bnn.BatchNorm1d(C)),
            ("bn2d", 4, lambda: bnn.BatchNorm2d(C)),
            ("bn3d", 5, lambda: bnn.BatchNorm3d(C)),
            ("axis-last", 3, lambda: bnn.BatchNorm(C, axis=-1)),
            *acts,
            ("frozen", 4, lambda: bnn.FrozenBatchNorm(C)),
            ("ghost", 4, lambda: bnn.GhostBatchNorm(C, virtual_batch_size=4)),
            ("renorm", 4, lambda: bnn.BatchRenorm(C, momentum=0.3)),
            ("sync", 4, lambda: bnn.SyncBatchNorm(C)),
            ("inplace-abn", 4, lambda: bnn.InPlaceABN(C)),
            ("inplace-abn-elu", 4, lambda: bnn.InPlaceABN(C, act="elu", act_param=1.0))]


LAYERS = _layers()
CASE = {c[0]: c for c in LAYERS}


def _front(rank: int, channels_last: bool) -> nn.Module:
    """The conv (or linear, for channels last) a BN follows, so that fold has a pair."""
    if channels_last:
        return nn.Linear(3, C)
    return {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank](3, C, 3, padding=1)


def _input(rank: int, channels_last: bool, n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 7, 3) if channels_last else (n, 3) + (5,) * (rank - 2)
    return torch.randn(shape, generator=g) * 2 + 1


def build(case) -> tuple[nn.Module, torch.Tensor]:
    """A trained, eval-mode Sequential(front, layer) with non-trivial statistics and affine
    parameters, and an input for it."""
    name, rank, make = case
    last = name == "axis-last"
    torch.manual_seed(sum(map(ord, name)))
    model = nn.Sequential(_front(rank, last), make())
    bn = model[1]
    with torch.no_grad():
        model.train()
        for seed in range(3):
            model(_input(rank, last, seed=seed + 10))
        for key in ("weight", "bias"):
            getattr(bn, key).copy_(torch.rand(C) + 0.5 if key == "weight" else torch.randn(C))
        if name == "frozen":
            bn.running_mean.copy_(torch.randn(C))
            bn.running_var.copy_(torch.rand(C) + 0.5)
    return model.eval(), _input(rank, last)


class Bundle(nn.Module):
    """Several models in one, so one export covers them all: forward(list of inputs) ->
    list of outputs."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i, m in enumerate(self.models):
            out.append(m(xs[i]))
        return out


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.fixture(scope="module")
def cases():
    """id -> (eval model, input, eager output); the folded variant of all layers as one
    bundle under 'folded'."""
    out = {}
    for case in LAYERS:
        model, x = build(case)
        with torch.no_grad():
            out[case[0]] = (model, x, model(x))
    folded = Bundle([bnkit.fold(m) for m, _, _ in out.values()]).eval()
    xs = [x for _, x, _ in out.values()]
    with torch.no_grad():
        out["folded"] = (folded, xs, folded(xs))
    return out


IDS = [c[0] for c in LAYERS] + ["folded"]


def _args(x):
    return (x,)


def _close(got, want):
    got, want = (g if isinstance(g, (tuple, list)) else (g,) for g in (got, want))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.as_tensor(g), w, **TOL)


@pytest.fixture(scope="module")
def saved(cases, tmp_path_factory):
    """Every case exported (torch.export), traced and scripted: the outputs in this process
    (key, kind, "here"), and in a fresh process where bnkit is not importable (key, kind)
    after saving as .pt2 and TorchScript files and loading them there. The eval cases go
    as one bundle (each export costs a fixed overhead), the folded bundle as another."""
    root = tmp_path_factory.mktemp("deploy")
    keys = [k for k in IDS if k != "folded"]
    bundles = {"eval": (Bundle([cases[k][0] for k in keys]).eval(), [cases[k][1] for k in keys]),
               "folded": cases["folded"][:2]}
    inputs, outputs = {}, {}
    for name, (model, xs) in bundles.items():
        with torch.no_grad():
            ep = torch.export.export(model, (xs,))
            assert "bnkit" not in str(ep.graph_module.code)
            progs = {"pt2": ep.module(),
                     "trace": _quiet(torch.jit.trace, model, (xs,), check_trace=False),
                     "script": _quiet(torch.jit.script, model)}
            for kind, prog in progs.items():
                outputs[name, kind, "here"] = prog(xs)
        torch.export.save(ep, root / f"{name}.pt2")
        progs["trace"].save(root / f"{name}.trace.pt")
        progs["script"].save(root / f"{name}.script.pt")
        inputs[name] = (xs,)
    torch.save(inputs, root / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], check=False,
                          capture_output=True, text=True, env=_env_without_bnkit(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bnkit not importable" in proc.stdout, proc.stdout
    outputs.update(torch.load(root / "outputs.pt"))
    per_key = {}
    for (name, kind, *where), out in outputs.items():
        if name == "folded":
            per_key[("folded", kind, *where)] = out
        else:
            per_key.update({(k, kind, *where): y for k, y in zip(keys, out)})
    return per_key


def _env_without_bnkit():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


# The child process: a meta-path finder refuses bnkit (also the editable install's .pth),
# checked before anything is loaded.
CHILD = textwrap.dedent("""
    import importlib.abc, sys
    from pathlib import Path

    class NoBnkit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bnkit" or name.startswith("bnkit."):
                raise ImportError("bnkit is blocked in this process")

    sys.meta_path.insert(0, NoBnkit())
    try:
        import bnkit  # noqa: F401
    except ImportError:
        print("bnkit not importable")
    else:
        raise SystemExit("bnkit is importable: the test would prove nothing")
    import torch

    root = Path(sys.argv[1])
    inputs = torch.load(root / "inputs.pt")
    out = {}
    with torch.no_grad():
        for key, xs in inputs.items():
            out[key, "pt2"] = torch.export.load(root / f"{key}.pt2").module()(*xs)
            for kind in ("trace", "script"):
                out[key, kind] = torch.jit.load(root / f"{key}.{kind}.pt")(*xs)
    assert not any(m == "bnkit" or m.startswith("bnkit.") for m in sys.modules)
    torch.save(out, root / "outputs.pt")
""")


@pytest.mark.parametrize("kind", ["pt2", "trace", "script"])
@pytest.mark.parametrize("key", IDS)
def test_export_trace_script_match_eager_here_and_without_bnkit(saved, cases, key, kind):
    _close(saved[key, kind, "here"], cases[key][2])
    _close(saved[key, kind], cases[key][2])


def _onnx_run(path, xs):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = [t for x in xs for t in (x if isinstance(x, list) else [x])]
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: x.numpy() for n, x in zip(names, flat)})


@pytest.mark.parametrize("key", IDS)
def test_onnx_legacy_exporter_runs_in_onnxruntime(cases, key, tmp_path):
    pytest.importorskip("onnxruntime")
    model, x, want = cases[key]
    path = tmp_path / "m.onnx"
    _quiet(torch.onnx.export, model, _args(x), str(path), dynamo=False)
    _close(_onnx_run(path, _args(x)), want)


def test_onnx_dynamo_exporter_runs_in_onnxruntime(cases, tmp_path):
    """One export of every case at once (the dynamo exporter costs seconds per call)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    keys = [k for k in IDS if k != "folded"]
    bundle = Bundle([cases[k][0] for k in keys] + list(cases["folded"][0].models)).eval()
    xs = [cases[k][1] for k in keys] + cases["folded"][1]
    want = [cases[k][2] for k in keys] + cases["folded"][2]
    path = tmp_path / "all.onnx"
    _quiet(torch.onnx.export, bundle, (xs,), str(path), dynamo=True, verbose=False)
    import onnx
    ops = {n.domain for n in onnx.load(str(path)).graph.node}
    assert not any("bnkit" in d for d in ops), ops
    _close(_onnx_run(path, [xs]), want)


def test_first_bnkit_call_of_a_process_may_be_under_torch_export():
    """The kernels are imported on first use: that must not happen on fake tensors (it
    failed with '.numpy() is not supported for tensor subclasses')."""
    code = ("import torch, bnkit.nn as bnn\n"
            "m = bnn.BatchNorm1d(4).eval()\n"
            "x = torch.randn(8, 4)\n"
            "torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), m(x))\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dynamic_batch_size_exports():
    model, x = build(CASE["bn2d"])  # BatchNorm2d
    other = x[:3] * 0.5
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        _close(ep.module()(other), model(other))


def test_training_mode_export_keeps_the_op_and_matches_eager():
    model, x = build(CASE["bn2d"])
    model.train()
    ref = build(CASE["bn2d"])[0].train()  # same seed: equal parameters and buffers
    ep = torch.export.export(model, (x,))
    assert "bnkit.batch_norm_fwd" in str(ep.graph_module.code)
    exported = ep.module()
    for _ in range(2):
        _close(exported(x), ref(x))
    state = exported.state_dict()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(state[f"1.{key}"], getattr(ref[1], key), rtol=1e-6,
                                   atol=1e-7)


def test_trace_in_training_mode_with_running_stats_is_refused_and_touches_nothing():
    model, x = build(CASE["bn2d"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace .* running statistics to "
                                           r"update .* call model\.eval\(\)"):
        _quiet(torch.jit.trace, model, (x,))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_legacy_onnx_export_in_training_mode_is_refused_and_touches_nothing(tmp_path):
    model, x = build(CASE["bn2d"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"cannot record a training-mode batch norm .* "
                                           r"call model\.eval\(\)"):
        _quiet(torch.onnx.export, model, (x,), str(tmp_path / "m.onnx"), dynamo=False,
               training=torch.onnx.TrainingMode.PRESERVE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_trace_of_ghost_training_is_refused():
    model, x = build(CASE["ghost"])
    model[1].track_running_stats = False
    model[1].running_mean = model[1].running_var = None
    with pytest.raises(RuntimeError, match=r"cannot record GhostBatchNorm in training mode"):
        _quiet(torch.jit.trace, model.train(), (x,))


def test_scripted_model_refuses_training_mode_and_works_after_eval():
    model, x = build(CASE["bn2d"])
    scripted = _quiet(torch.jit.script, model.train())
    assert model[1].training and isinstance(model[1], bnn.BatchNorm2d)  # model untouched
    with pytest.raises(torch.jit.Error, match="eval-mode batch norm only"):
        scripted(x)
    with torch.no_grad():
        _close(scripted.eval()(x), model.eval()(x))


def test_scripted_layers_keep_state_dict_keys():
    model, _ = build(CASE["act-identity"])
    scripted = _quiet(torch.jit.script, model)
    assert list(scripted.state_dict()) == list(model.state_dict())


def test_lowering_without_running_stats_uses_batch_statistics():
    """track_running_stats=False: batch statistics in eval too; the lowering keeps that."""
    bn = bnn.BatchNorm(C, axis=-1, track_running_stats=False).eval()
    x = torch.randn(8, 7, C) * 3 + 2
    with torch.no_grad():
        want = bn(x)
        got = torch.export.export(bn, (x,)).module()(x), _quiet(torch.jit.trace, bn, (x,))(x)
    for g in got:
        _close(g, want)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_deploying_doc_examples_run(tmp_path, monkeypatch):
    """Every python block of docs/deploying.md, in order, in one namespace."""
    pytest.importorskip("onnxruntime")
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "deploying_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (the doc)
