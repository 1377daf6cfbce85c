"""The environment of a lab run: versions, threads, CPU, backends, git revision.

Saved as `env.json` next to the metrics so that numbers can be traced to the machine and
code that produced them.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "numpy", "matplotlib", "tqdm", "triton")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else platform.processor(), else 'unknown'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    """Output of a read-only git command in this package's checkout, or None."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_revision() -> str | None:
    """'<commit>' or '<commit>+dirty' when tracked files changed; None outside a checkout."""
    rev = _git("rev-parse", "HEAD")
    if not rev:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return rev + ("+dirty" if dirty else "")


def collect_env() -> dict:
    """Versions, threads, CPU and git revision of this process, as a JSON-able dict.

    Example:
        >>> env = collect_env()
        >>> env["threads"] >= 1
        True
    """
    import torch

    from .. import __version__, kernels

    return {
        "bnkit": __version__,
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "backend": kernels.get_backend(),
        "backends_available": kernels.available_backends(),
        "cuda": torch.cuda.is_available(),
        "git": git_revision(),
    }
