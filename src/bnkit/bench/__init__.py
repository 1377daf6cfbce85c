"""bnkit's benchmarks: every timing of the project, one concept per module.

    timing      timers, interleaved rounds, medians, the copy-bandwidth probe
    backends    the one place that touches bnkit.kernels (which backends, how to select)
    phases      the phases of a BN call (forward, backward, fwd+bwd, eval) and their traffic
    kernels     the CPU kernel table (bnkit's BN on each backend against torch's)
    gpu         the GPU kernel table (Triton against cuDNN and torch.compile)
    nets        the networks: ResNet-18, MobileNetV2 (torchvision's), the small MLP / CNNs
    models      training steps and eval forwards with torch's BN against bnkit's
    firstcall   import time and the first BN call in a fresh process with an empty HOME
    fold        inference before and after bnkit.fold
    machine     the machine and software the numbers come from
    report      rows and text tables
    cli         `bnkit bench` (and benchmarks/bench_cpu.py)

Example:
    >>> from bnkit.bench import first_call, run_vision_models  # doctest: +SKIP
    >>> run_vision_models(["mobilenet_v2"], batch=16, size=112)  # doctest: +SKIP
"""
from __future__ import annotations

from .cli import add_arguments, main
from .firstcall import first_call
from .fold import bench_fold
from .kernels import CASES, run_case
from .machine import environment
from .models import run_models, run_vision_models
from .nets import mobilenet_v2, resnet18
from .phases import PASSES, PHASES, formula_bn, parse_shape
from .report import format_table, make_row
from .timing import interleaved_medians, perf_timer, time_all

__all__ = ["CASES", "PASSES", "PHASES", "add_arguments", "bench_fold", "environment",
           "first_call", "format_table", "formula_bn", "interleaved_medians", "main",
           "make_row", "mobilenet_v2", "parse_shape", "perf_timer", "resnet18", "run_case",
           "run_models", "run_vision_models", "time_all"]
