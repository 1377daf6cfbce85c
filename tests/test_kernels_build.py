"""Installing without the C++ extension: setup.py's build of bnkit._C is optional. A
compiler that fails, or BNKIT_BUILD_EXT=0, still exits 0, builds no library and leaves
`bnkit/_C.unbuilt` saying why (read by bnkit.kernels.build_info for `bnkit info`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build(tmp_path, **env):
    """setup.py build_ext --inplace in a copy of the sources; -> (result, package folder)."""
    src = tmp_path / "src" / "bnkit"
    shutil.copytree(ROOT / "src" / "bnkit" / "csrc", src / "csrc")
    (src / "__init__.py").write_text("")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    (src / "_version.py").write_text("__version__ = '0'\n")
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                         cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=600, check=False)
    return res, src


@pytest.mark.parametrize("env,why", [
    ({"CC": "false", "CXX": "false", "BNKIT_BUILD_EXT": "1"}, "the build failed"),
    ({"BNKIT_BUILD_EXT": "0"}, "BNKIT_BUILD_EXT=0")])
def test_install_without_the_extension_succeeds_and_says_why(tmp_path, env, why):
    res, pkg = _build(tmp_path, **env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not list(pkg.glob("_C*.so")) and not list(tmp_path.glob("build/**/_C*.so"))
    note = (pkg / "_C.unbuilt").read_text()
    assert why in note
    assert "C++ extension not built" in res.stderr  # one clear line in the install log


def test_missing_extension_message_names_the_reason_and_fix(tmp_path, monkeypatch):
    from bnkit.kernels import build_info

    note = tmp_path / "_C.unbuilt"
    monkeypatch.setattr(build_info, "NOTE", str(note))
    text = build_info.extension_error(ImportError("No module named 'bnkit._C'"))
    assert "No module named 'bnkit._C'" in text and "--no-build-isolation" in text
    note.write_text("not built: BNKIT_BUILD_EXT=0 at install time\n")
    text = build_info.extension_error(ImportError("x"))
    assert text.startswith("not built: BNKIT_BUILD_EXT=0") and "--no-build-isolation" in text
