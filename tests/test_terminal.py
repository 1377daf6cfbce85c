"""The command line as people run it: in a terminal, and with its output piped to a log.

A progress bar only draws (and tqdm's update() only returns True) when stderr is a terminal,
so a bug there is invisible to every test that captures output. These tests run `bnkit lab`
and `bnkit demo` as subprocesses under a pseudo-terminal (Python's `pty`), exactly as a
person's shell starts them, and again with stdout and stderr piped.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bnkit.lab import EXPERIMENTS

BNKIT = [sys.executable, "-m", "bnkit"]
TIMEOUT = 600  # seconds; a mini run of every experiment takes well under a minute warm
BAR = re.compile(r"\d+%\|")  # tqdm's bar: "bnkit lab:  50%|█████     | 4/8 [...]"


def _env(**extra) -> dict:
    env = dict(os.environ, COLUMNS="120", LINES="40", **extra)
    env.pop("BNKIT_DEBUG", None)
    return env


def run_in_terminal(argv: list[str], env: dict, cwd: Path) -> tuple[int, str]:
    """Run argv with stdin, stdout and stderr on a new pseudo-terminal (120x40); returns
    (exit code, everything the terminal received). The output is drained while the process
    runs, as a terminal does, so a chatty process never blocks on a full buffer."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every holder of the terminal's other side has closed it
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{argv} did not finish within {TIMEOUT} s in a terminal")
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def run_piped(argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["status"]


def _lab(tiny_idx_dir, out: Path, jobs: int = 2) -> list[str]:
    # the bench's cpu-backend variants are exercised by their own tests
    return BNKIT + ["lab", "--mini", "--data", str(tiny_idx_dir), "--out", str(out),
                    "--jobs", str(jobs)]


@pytest.fixture(scope="module")
def lab_env():
    return _env(BNKIT_BACKEND="reference")


@pytest.mark.parametrize("jobs", [1, 2])  # in this process, and in 2 worker processes
def test_lab_mini_every_experiment_finishes_in_a_terminal(tiny_idx_dir, tmp_path, lab_env,
                                                          jobs):
    code, screen = run_in_terminal(_lab(tiny_idx_dir, tmp_path / "run", jobs), lab_env,
                                   tmp_path)
    assert code == 0, screen[-3000:]
    assert _status(tmp_path / "run") == "finished"
    assert BAR.search(screen), "no progress bar was drawn:\n" + screen[-2000:]
    assert "Status: finished" in screen and "cell failed" not in screen
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(r)["experiment"] for r in records} == set(EXPERIMENTS)


def test_lab_mini_piped_finishes_and_prints_a_line_per_cell(tiny_idx_dir, tmp_path, lab_env):
    proc = run_piped(_lab(tiny_idx_dir, tmp_path / "run"), lab_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _status(tmp_path / "run") == "finished"
    assert not BAR.search(proc.stderr)  # no terminal: no bar
    n = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    lines = re.findall(r"^\[(\d+)/(\d+)\] ([\w-]+): .*, seed \d+: done in [\d.]+ s$",
                       proc.stdout, re.MULTILINE)
    assert len(lines) == n and {int(total) for _, total, _ in lines} == {n}
    assert [int(i) for i, _, _ in lines] == list(range(1, n + 1))


DEMO = ["demo", "--steps", "20", "--eval-every", "10", "--batch-size", "16"]


def test_demo_finishes_in_a_terminal_with_a_progress_bar(tiny_idx_dir, tmp_path):
    code, screen = run_in_terminal(BNKIT + DEMO + ["--data", str(tiny_idx_dir)], _env(),
                                   tmp_path)
    assert code == 0, screen[-3000:]
    assert re.search(r"BN model: +\d+%\|", screen), screen[-2000:]
    assert "no BN acc" in screen and "After 20 steps" in screen


def test_demo_piped_finishes(tiny_idx_dir, tmp_path):
    proc = run_piped(BNKIT + DEMO + ["--data", str(tiny_idx_dir)], _env(), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no BN acc" in proc.stdout and "After 20 steps" in proc.stdout
    assert re.search(r"^BN model: 20 steps, .* test accuracy [\d.]+%$", proc.stdout, re.MULTILINE)


@pytest.mark.parametrize("command", [["lab", "--mini"], DEMO])
def test_data_folder_that_lacks_the_files_exits_2_in_a_terminal(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    argv = BNKIT + command + ["--data", str(empty)] + (["--out", str(out)] if "lab" in command
                                                      else [])
    code, screen = run_in_terminal(argv, _env(), tmp_path)
    assert code == 2, screen[-2000:]
    assert str(empty) in screen and "Traceback" not in screen
    assert not out.exists()  # nothing was made
