"""Builds the optional C++ extension `bnkit._C` (the 'cpu' backend) at install time.

Metadata lives in pyproject.toml; this file only adds the extension. It compiles against
the installed torch, so install with `pip install --no-build-isolation` after torch.
The build is optional: with BNKIT_BUILD_EXT=0, without torch at build time, or when the
compiler fails, the install still succeeds without `bnkit._C` (bnkit then runs on the
reference backend) and `bnkit/_C.unbuilt` records why, which `bnkit info` prints.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
NOTE = "_C.unbuilt"  # in the package: why bnkit._C is missing


def _note_path(cmd, inplace) -> str:
    base = os.path.join(HERE, "src") if inplace else cmd.build_lib
    return os.path.join(base, "bnkit", NOTE)


def _write_note(cmd, inplace, why: str) -> None:
    for ext in cmd.extensions:  # a library left in build/ by an earlier build must not ship
        stale = os.path.join(cmd.build_lib, *ext.name.split(".")[:-1],
                             os.path.basename(cmd.get_ext_filename(ext.name)))
        if os.path.exists(stale):
            os.remove(stale)
    path = _note_path(cmd, inplace)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(why + "\n")
    print(f"bnkit: C++ extension not built ({why}); bnkit will run on the reference backend",
          file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext whose failure leaves a working pure-Python package behind."""

    def run(self):
        inplace = self.inplace  # setuptools clears it while building
        if os.environ.get("BNKIT_BUILD_EXT", "1").strip() == "0":
            _write_note(self, inplace, "not built: BNKIT_BUILD_EXT=0 at install time")
            return
        if not self.extensions:
            _write_note(self, inplace, "not built: torch was not importable at install "
                        f"time ({_TORCH_ERR})")
            return
        try:
            super().run()
        except Exception as err:  # noqa: BLE001 - any compiler failure: install without it
            _write_note(self, inplace, f"the build failed: {type(err).__name__}: {err}"[:400])
            return
        for path in (_note_path(self, inplace), _note_path(self, False)):
            if os.path.exists(path):
                os.remove(path)

    def get_outputs(self):  # only what was really built
        return [p for p in super().get_outputs() if os.path.exists(p)]


def _arch_flags() -> list[str]:
    """-DBNKIT_AVX2 (the kernel files then target AVX2) when building on an x86-64 CPU that
    has it, unless BNKIT_BUILD_ARCH=generic; the module refuses to import on a CPU without
    it (a wheel built here needs AVX2: x86-64-v3)."""
    if os.environ.get("BNKIT_BUILD_ARCH", "auto").strip() == "generic":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            return ["-DBNKIT_AVX2"] if " avx2" in f.read() else []
    except OSError:
        return []


def _extension():
    """(extensions, build_ext command class), empty when torch cannot be imported."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cflags = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", *_arch_flags()]
    ldflags = []
    if "OpenMP" in torch.__config__.parallel_info():  # at::parallel_for is OpenMP inline
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("src", "bnkit", "csrc", "*.cpp")))
    ext = CppExtension("bnkit._C", sources, extra_compile_args={"cxx": cflags},
                       extra_link_args=ldflags)

    class Build(OptionalBuildExt, BuildExtension.with_options(use_ninja=True)):
        pass

    return [ext], Build


_TORCH_ERR = ""
try:
    EXTENSIONS, BUILD = _extension()
except ImportError as _err:
    EXTENSIONS, BUILD, _TORCH_ERR = [], OptionalBuildExt, str(_err)

setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BUILD})
