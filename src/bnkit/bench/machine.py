"""The machine and software a benchmark's numbers come from (printed and stored in the JSON)."""
from __future__ import annotations

import os
import platform

import torch

from . import backends


def load() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '0.81 1.20 1.33'."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform's guess, else 'unknown')."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def torch_huge_pages() -> str:
    """Whether torch's CPU allocator asks for huge pages (THP_MEM_ALLOC_ENABLE=1). Large
    fresh outputs cost 3-4x less with them, for torch and bnkit alike; bnkit advises huge
    pages on its own large outputs either way, so the ratios on large shapes depend on it
    (docs/performance.md)."""
    return "on (THP_MEM_ALLOC_ENABLE=1)" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" \
        else "off (set THP_MEM_ALLOC_ENABLE=1 to compare against torch with them)"


def environment() -> dict:
    """CPU, cores, threads, versions, torch's huge pages, backends and the load before."""
    from .. import __version__

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "torch": torch.__version__, "bnkit": __version__,
            "torch huge pages": torch_huge_pages(), "backends": backends.status(),
            "load_before": load()}
