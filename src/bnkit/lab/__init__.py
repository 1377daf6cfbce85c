"""bnkit lab: experiments on Fashion-MNIST that test what BatchNorm papers claim, with plots
and a report generated from the measured numbers.

    bnkit lab --quick            # all experiments, about 5 minutes on 2 cores
    bnkit report runs/<stamp>    # rebuild the report from the saved metrics

Example:
    >>> from bnkit.lab import resolve, run_lab
    >>> result = run_lab(resolve(["convergence"]))      # doctest: +SKIP
    >>> result.report_html                              # doctest: +SKIP
"""
from .config import EXPERIMENTS, resolve
from .report import build as build_report
from .runner import RunResult, run_lab

__all__ = ["EXPERIMENTS", "RunResult", "build_report", "resolve", "run_lab"]
