"""The reference backend: the functional core's pure-torch primitives, always available.

It is the oracle every other backend is tested against, and it accepts every input:
any device, dtype, layout, rank and mask.
"""
from __future__ import annotations

from ..functional.backward import act_backward, backward_elemt, backward_reduce
from ..functional.normalize import normalize
from ..functional.stats import batch_stats

NAME = "reference"
__all__ = [
    "NAME",
    "act_backward",
    "available",
    "backward_elemt",
    "backward_reduce",
    "batch_stats",
    "normalize",
    "supports",
]


def available() -> bool:
    return True


def supports(x, axis, mask) -> bool:
    return True
