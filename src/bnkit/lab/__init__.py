"""bnkit lab: experiments on Fashion-MNIST that test what BatchNorm papers claim, with plots
and a report generated from the measured numbers.

    bnkit lab --quick            # all experiments, about 5 minutes on 2 cores
    bnkit report runs/<stamp>    # rebuild the report from the saved metrics

The names below are imported on first access, so `bnkit.demo`, which uses only
`bnkit.lab.train` and `bnkit.lab.models`, does not load the runner and the report (nor
matplotlib, an extra the demo does not need).

Example:
    >>> from bnkit.lab import resolve, run_lab
    >>> result = run_lab(resolve(["convergence"]))      # doctest: +SKIP
    >>> result.report_html                              # doctest: +SKIP
"""
from __future__ import annotations

import importlib

__all__ = ["EXPERIMENTS", "RunResult", "build_report", "resolve", "run_lab"]

_WHERE = {"EXPERIMENTS": ("config", "EXPERIMENTS"), "resolve": ("config", "resolve"),
          "build_report": ("report", "build"), "RunResult": ("runner", "RunResult"),
          "run_lab": ("runner", "run_lab")}


def __getattr__(name: str):
    if name in _WHERE:
        module, attr = _WHERE[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
