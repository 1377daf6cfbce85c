"""A read-only install with a read-only, empty HOME: the first layer call runs on the fast
backend (the compiled extension), writes nothing anywhere, and needs no compiler or cache.

The installed package (its sources and bnkit._C) is copied into a folder made read-only, and
a child process imports it from there with HOME read-only too. Permission bits do not stop
root, so the test also compares every file under both folders before and after: nothing may
be created or changed (Python's own bytecode cache is switched off in the child, as a
read-only site-packages holds the one pip wrote at install time).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import bnkit

CHILD = """
import json, os, time
import torch
t = time.perf_counter()
import bnkit
from bnkit.bench.backends import selected
bn = bnkit.nn.BatchNorm2d(3)
x = torch.randn(4, 3, 5, 5, requires_grad=True)
(bn(x) * torch.linspace(-1, 1, 25).view(5, 5)).sum().backward()
print(json.dumps({"bnkit": bnkit.__file__, "backend": selected(x.detach()),
                  "native": bnkit.kernels.native_module() is not None,
                  "steps": int(bn.num_batches_tracked), "grad": bool(x.grad.abs().sum() > 0),
                  "ms": (time.perf_counter() - t) * 1e3}))
"""


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) | stat.S_IROTH |
                (stat.S_IXOTH if p.is_dir() or mode & stat.S_IXUSR else 0))


@pytest.mark.skipif("cpu" not in bnkit.available_backends(),
                    reason="the fast backend needs the C++ extension bnkit._C")
def test_read_only_install_and_home_use_the_fast_backend_and_write_nothing(tmp_path):
    tmp_path.chmod(0o755)
    site, home = tmp_path / "site", tmp_path / "home"
    shutil.copytree(Path(bnkit.__file__).parent, site / "bnkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    for root in (site, home):
        _read_only(root)
    before = {str(r): _tree(r) for r in (site, home)}
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    try:
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=str(home),
                             capture_output=True, text=True, timeout=300, check=False)
    finally:
        for root in (site, home):
            for p in [root, *root.rglob("*")]:
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bnkit"].startswith(str(site)), r
    assert r["backend"] == "cpu" and r["native"], r
    assert r["steps"] == 1 and r["grad"], r
    assert "warn" not in out.stderr.lower(), out.stderr[-2000:]
    after = {str(r_): _tree(r_) for r_ in (site, home)}
    assert after == before, "files were written or changed under the install or HOME"
