"""What a backend module provides: the contract every backend of `bnkit.kernels` meets.

A backend is a module (registered in `bnkit.kernels.BACKENDS`) with the attributes of
`Backend` below; the core (`bnkit.functional.autograd`) calls only these. The primitives
have the reference signatures and results (`bnkit.kernels.reference`, the oracle);
`FusedForward` and `FusedBackward` are optional one-call forms a backend may add (the core
looks them up with getattr and falls back to the primitives when absent or when they
return None); so are InPlaceABN's kernels (`AbnForward`, `AbnBackwardReduce`,
`AbnBackwardElemt`), without which InPlaceABN runs in torch operations over the primitives. tests/test_kernels.py runs one conformance suite over every available
backend.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from ..functional.stats import Stats


@runtime_checkable
class Backend(Protocol):
    """The required part of a backend module."""

    NAME: str

    def available(self) -> bool:
        """Whether it can run on this machine (its dependencies import, a device is there)."""

    def supports(self, x: Tensor, axis: int, mask: Tensor | None) -> bool:
        """Whether it runs this input (device, dtype, layout, size); the rest goes to
        'reference'. Cheap: called once per batch-norm call under 'auto'."""

    def batch_stats(self, x: Tensor, axis: int = 1, mask: Tensor | None = None) -> Stats:
        """Stats(count, mean, biased var) per channel, see bnkit.functional.batch_stats."""

    def normalize(self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None = None,
                  bias: Tensor | None = None, axis: int = 1, act: str = "identity") -> Tensor:
        """y = act((x - mean) * invstd * weight + bias), see bnkit.functional.normalize."""

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor,
                        axis: int = 1) -> tuple[Tensor, Tensor]:
        """(sum_dy, sum_dy_xmu) per channel, see bnkit.functional.backward_reduce."""

    def backward_elemt(self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                       weight: Tensor | None, sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor,
                       axis: int = 1, mask: Tensor | None = None,
                       training: bool = True) -> Tensor:
        """dx, see bnkit.functional.backward_elemt."""

    def act_backward(self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                     weight: Tensor | None, bias: Tensor | None, axis: int = 1,
                     act: str = "identity") -> Tensor:
        """dz = dy * act'(z), z recomputed, see bnkit.functional.act_backward."""


class FusedForward(Protocol):
    """Optional `fused_forward`: the whole forward op in one call -> (y, mean, var, count),
    blending the running buffers itself when given a `momentum`; None to decline."""

    def __call__(self, x, weight, bias, running_mean, running_var, mask, training, eps,
                 axis=1, act="identity", momentum=None): ...


class FusedBackward(Protocol):
    """Optional `fused_backward_op`: the whole backward op in one call -> (dx, dweight,
    dbias); None to decline. (`fused_backward`, the triton form, returns (dx, sum_dy,
    sum_dy_xmu) from the primitives' arguments.)"""

    def __call__(self, dy, x, weight, bias, mean, var, count, mask, training, eps, axis=1,
                 act="identity"): ...


class AbnForward(Protocol):
    """Optional `abn_forward`: InPlaceABN's forward (bnkit.functional.inplace_abn) in one
    call. Statistics (the batch's in training, the running buffers' in eval, or `stats` =
    (mean, var) given), y = act(BN(x)) written into `out` (x itself for the in-place call,
    else a new tensor laid out as x), and with a `momentum` the running buffers blended
    (optional: report it) -> (mean, var, invstd, blended); None to decline."""

    def __call__(self, x, out, weight, bias, running_mean, running_var, stats, training, eps,
                 axis=1, act="leaky_relu", act_param=0.01, momentum=None): ...


class AbnBackwardReduce(Protocol):
    """Optional `abn_backward_reduce`: (sum dz, sum dz (x - mu)) of InPlaceABN's backward from
    y and dy alone (dz = dy act'(z), z and x - mu recovered from y); None to decline. A
    backend with it has `abn_backward_elemt` too, taking the same inputs."""

    def __call__(self, dy, y, weight, bias, invstd, axis=1, act="leaky_relu",
                 act_param=0.01): ...


class AbnBackwardElemt(Protocol):
    """Optional `abn_backward_elemt`: InPlaceABN's dx from y, dy and the (all-reduced) sums."""

    def __call__(self, dy, y, weight, bias, invstd, sum_dz, sum_dz_xmu, count, axis=1,
                 act="leaky_relu", act_param=0.01, training=True): ...


OPTIONAL = {"fused_forward": FusedForward, "fused_backward_op": FusedBackward,
            "fused_backward": None, "status": None, "abn_forward": AbnForward,
            "abn_backward_reduce": AbnBackwardReduce, "abn_backward_elemt": AbnBackwardElemt}


def conforms(module) -> list[str]:
    """The contract's names `module` lacks or has in the wrong kind (empty: it conforms)."""
    missing = [n for n in ("NAME", "available", "supports", "batch_stats", "normalize",
                           "backward_reduce", "backward_elemt", "act_backward")
               if not hasattr(module, n)]
    missing += [n for n in ("available", "supports", "batch_stats", "normalize",
                            "backward_reduce", "backward_elemt", "act_backward")
                if hasattr(module, n) and not callable(getattr(module, n))]
    missing += [n for n in OPTIONAL if hasattr(module, n) and not callable(getattr(module, n))]
    return missing
