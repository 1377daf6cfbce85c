"""What a user installing the package relies on: its license, typing marker, build
requirements, what `import bnkit` makes reachable, and what the Makefile installs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

import bnkit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_the_declared_license():
    assert PYPROJECT["project"]["license"] == "BSD-3-Clause"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text  # clause 3
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_build_requires_a_setuptools_that_reads_the_license_string():
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.fullmatch(r"setuptools>=(\d+)", req)[1]) >= 77  # PEP 639 strings


def test_package_is_typed():
    assert (Path(bnkit.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["bnkit"]


def test_data_and_demo_are_reachable_after_import_bnkit():
    code = ("import sys, bnkit; assert 'bnkit.demo' not in sys.modules; "
            "print(bnkit.data.load_fashion_mnist.__name__, bnkit.demo.make_mlp.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["load_fashion_mnist", "make_mlp"]


def test_star_import_shadows_no_standard_library_module():
    namespace: dict = {}
    exec("from bnkit import *", namespace)  # noqa: S102 - the statement under test
    shadowed = sorted(n for n in namespace if n in sys.stdlib_module_names)
    assert shadowed == []
    assert callable(bnkit.inspect)  # still reachable by its full name


def _recipe_line(target: str) -> str:
    """The prerequisites of a Makefile target."""
    match = re.search(rf"^{target}:(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return match[1]


def test_make_demo_installs_triton_only_with_a_gpu_and_make_test_always():
    makefile = (ROOT / "Makefile").read_text()
    assert "gpu" not in _recipe_line("demo").split()
    assert "nvidia-smi" in makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "gpu" in _recipe_line("test").split()
    stamp = re.search(r"^\$\(STAMP\):.*?\n\n", makefile, re.MULTILINE | re.DOTALL)[0]
    assert "[gpu]" not in stamp and "torch==2.13.0" in stamp
