"""Tests for the `bnkit` command line: --version, info, demo, errors and registration."""
import os
import subprocess
import sys
import types

import pytest
import torch

import bnkit
from bnkit import cli


@pytest.fixture
def registry(monkeypatch):
    """Private copies of the command tables, so registering in a test leaks nowhere."""
    for name in ("COMMANDS", "HELP", "UNAVAILABLE", "OPTIONAL"):
        monkeypatch.setattr(cli, name, dict(getattr(cli, name)))
    monkeypatch.delenv("BNKIT_DEBUG", raising=False)
    return cli


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _bnkit(*args):
    """Run `python -m bnkit ARGS` in a fresh process with this interpreter."""
    return subprocess.run([sys.executable, "-m", "bnkit", *args], capture_output=True,
                          text=True, timeout=120, check=False)


# ----------------------------------------------------------------------------- version, info


def test_version_subprocess_and_in_process(capsys):
    proc = _bnkit("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"bnkit {bnkit.__version__}"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bnkit {bnkit.__version__}"


def test_info_subprocess_reports_versions_backends_and_cuda():
    proc = _bnkit("info")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines()
                 if ": " in line and not line.startswith(" "))
    assert lines["torch"] == torch.__version__
    assert lines["bnkit"] == bnkit.__version__
    assert lines["CPU cores"].isdigit() and int(lines["torch threads"]) >= 1
    backend, available = lines["backend"].split(" (available: ")
    assert backend == bnkit.get_backend()
    assert available.rstrip(")").split(", ") == bnkit.available_backends()
    assert lines["CUDA"].startswith("not available") != torch.cuda.is_available()
    assert "Fashion-MNIST" in lines


def test_info_prints_backend_status_lines(registry, monkeypatch, capsys):
    from bnkit import kernels

    def broken():
        raise RuntimeError("cache folder unreadable")

    monkeypatch.setitem(sys.modules, "bnkit.kernels.fakewarm",
                        types.SimpleNamespace(status=lambda: "compiled kernels cached (warm)"))
    monkeypatch.setitem(sys.modules, "bnkit.kernels.fakebroken",
                        types.SimpleNamespace(status=broken))
    monkeypatch.setattr(kernels, "available_backends",
                        lambda: ["reference", "fakewarm", "fakebroken"])
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "(available: reference, fakewarm, fakebroken)" in out
    assert "  fakewarm: compiled kernels cached (warm)\n" in out
    assert "  fakebroken: status() failed: RuntimeError('cache folder unreadable')" in out


def test_info_without_dataset_says_how_to_get_it(isolated, capsys):
    assert cli.main(["info"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Fashion-MNIST")]
    assert line[0].startswith("Fashion-MNIST: not found. Fix:")
    assert "apt-get install dataset-fashion-mnist" in line[0] and "BNKIT_DATA" in line[0]


def test_info_with_dataset_names_its_folder(tiny_idx_dir, monkeypatch, capsys):
    monkeypatch.setenv("BNKIT_DATA", str(tiny_idx_dir))
    assert cli.main(["info"]) == 0
    assert f"Fashion-MNIST: {tiny_idx_dir}\n" in capsys.readouterr().out


# ----------------------------------------------------------------------------- demo


def test_demo_runs_on_tiny_data_and_sets_threads(tiny_idx_dir, capsys):
    code = cli.main(["demo", "--data", str(tiny_idx_dir), "--steps", "40", "--eval-every",
                     "20", "--threads", "1", "--batch-size", "32", "--lr", "0.2"])
    out = capsys.readouterr().out
    assert code == 0 and torch.get_num_threads() == 1
    assert "SGD lr 0.2, batch 32, 40 steps, 1 thread(s)" in out
    steps = [line.split("|")[0].strip() for line in out.splitlines() if "|" in line]
    assert steps == ["step", "20", "40"]
    assert "After 40 steps: BN" in out and out.rstrip().splitlines()[-1].startswith("Wall time:")


@pytest.mark.parametrize("command", [["demo"], ["lab", "--mini"]])
def test_missing_dataset_exits_2_with_the_finders_message(isolated, capsys, command):
    out = isolated / "run"
    argv = command + (["--out", str(out)] if "lab" in command else [])
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith(f"bnkit {command[0]}: error: Fashion-MNIST")
    assert "sudo apt-get install dataset-fashion-mnist" in captured.err
    assert f"bnkit {command[0]} --data DIR" in captured.err and "BNKIT_DATA" in captured.err
    assert not out.exists()  # no run folder full of failures


@pytest.mark.parametrize("command", [["demo"], ["lab", "--mini"]])
def test_data_folder_without_the_files_is_an_error_not_a_fallback(tiny_idx_dir, tmp_path,
                                                                 monkeypatch, capsys, command):
    monkeypatch.setenv("BNKIT_DATA", str(tiny_idx_dir))  # a folder that would have worked
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    argv = command + ["--data", str(empty)] + (["--out", str(out)] if "lab" in command else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnkit {command[0]}: error: ") and str(empty) in err
    assert str(tiny_idx_dir) not in err and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--threads", "two"], "argument --threads: must be an integer, got 'two'"),
    (["--threads", "0"], "argument --threads: must be an integer from 1 to"),
    (["--threads", "100000"], f"CPU core; this machine has {os.cpu_count()}), got 100000"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0, got '-1'"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
])
def test_demo_bad_options_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bnkit") and "info" in err and "demo" in err


def test_demo_help_explains_the_thread_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default 1: this small model runs fastest on one thread" in help_text


# ----------------------------------------------------------------------------- extension points


def test_register_runs_a_new_subcommand_and_passes_exit_code(registry, capsys):
    def add(parser):
        parser.add_argument("--n", type=int, default=1)

    def run(args):
        print(f"{args.command} n={args.n}")
        return args.n

    registry.register("echo", add, run, "print n")
    assert cli.main(["echo", "--n", "3"]) == 3
    assert capsys.readouterr().out == "echo n=3\n"
    assert "print n" in cli.build_parser().format_help()


def test_optional_module_registers_only_when_it_imports(registry, monkeypatch, tmp_path):
    module = types.ModuleType("fake_lab_cli", "Run the fake lab.\n\nMore text.")
    module.add_arguments = lambda parser: parser.add_argument("--runs", type=int)
    module.main = lambda args: 0 if args.command == "fakelab" and args.runs == 2 else 1
    monkeypatch.setitem(sys.modules, "fake_lab_cli", module)
    # A module that exists but needs a missing dependency.
    (tmp_path / "fake_broken.py").write_text("import bnkit_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.OPTIONAL.clear()
    registry.OPTIONAL.update({"fakelab": ("fake_lab_cli", ""),
                              "fakereport": ("fake_lab_cli", "rebuild the fake report"),
                              "absent": ("bnkit_no_such_module", ""),
                              "broken": ("fake_broken", "")})
    assert cli.main(["fakelab", "--runs", "2"]) == 0
    assert cli.main(["fakereport", "--runs", "2"]) == 1  # same module, told apart by command
    assert cli.HELP["fakelab"] == "Run the fake lab."  # the docstring's first line
    assert cli.HELP["fakereport"] == "rebuild the fake report"
    cli.build_parser([])  # no subcommand named: every optional module is tried
    assert "absent" not in cli.COMMANDS
    assert "absent" not in cli.UNAVAILABLE  # a module that does not exist is not a problem
    assert cli.UNAVAILABLE["broken"] == ("fake_broken: No module named "
                                         "'bnkit_missing_dependency'")  # present but fails


def test_subcommand_with_a_missing_extra_says_what_to_install(registry, monkeypatch, tmp_path,
                                                              capsys):
    (tmp_path / "fake_needs_extra.py").write_text("import bnkit_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.OPTIONAL.clear()
    registry.OPTIONAL["lab"] = ("fake_needs_extra", "")
    registry.COMMANDS.pop("lab", None)  # as in a fresh process
    assert cli.main(["lab", "--quick", "init"]) == 2  # not argparse's "invalid choice"
    err = capsys.readouterr().err
    assert err.startswith("bnkit lab: error: `bnkit lab` needs packages that are not installed")
    assert "bnkit_missing_dependency" in err and "pip install 'bnkit[lab]'" in err


def test_user_error_in_a_subcommand_exits_2_without_traceback(registry, monkeypatch, capsys):
    def run(args):
        raise ValueError("window must be >= 1, got 0; pass --window 1 or more")

    registry.register("failing", lambda parser: None, run)
    assert cli.main(["failing"]) == 2
    err = capsys.readouterr().err
    assert err == "bnkit failing: error: window must be >= 1, got 0; pass --window 1 or more\n"
    monkeypatch.setenv("BNKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="window must be >= 1"):
        cli.main(["failing"])


def test_optional_modules_are_imported_only_when_needed(registry, monkeypatch, tmp_path, capsys):
    (tmp_path / "fake_marker_cli.py").write_text(
        '"""Marker."""\ndef add_arguments(parser):\n    pass\n\ndef main(args):\n    return 0\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.OPTIONAL.clear()
    registry.OPTIONAL["marker"] = ("fake_marker_cli", "")
    try:
        with pytest.raises(SystemExit):
            cli.main(["demo", "--help"])  # another subcommand: no import
        assert "fake_marker_cli" not in sys.modules
        with pytest.raises(SystemExit):
            cli.main(["--version"])
        assert "fake_marker_cli" not in sys.modules
        assert cli.main(["marker"]) == 0  # named: imported and run
        assert "fake_marker_cli" in sys.modules
        del sys.modules["fake_marker_cli"]
        del cli.COMMANDS["marker"]
        with pytest.raises(SystemExit):
            cli.main(["--help"])  # the full help lists every optional subcommand
        assert "marker" in capsys.readouterr().out
    finally:
        sys.modules.pop("fake_marker_cli", None)
