"""Shared module base for the BN family: parameters, buffers, reset, repr, checkpoints.

Keeps torch's state-dict names (weight, bias, running_mean, running_var, num_batches_tracked)
so checkpoints load both ways between torch.nn and bnkit.nn, including old checkpoints
written before torch added num_batches_tracked.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from .export import scripted_batch_norm


class NormBase(nn.Module):
    """Holds what every BN layer owns; subclasses only write `forward`."""

    _version = 2  # torch's BN state-dict version: 2 added num_batches_tracked

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        _check_constructor(num_features, eps, momentum)
        fk = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats, self.axis = affine, track_running_stats, axis
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **fk))
            # bias=False: a learned scale without shift, as torch's `bias` keyword
            self.register_parameter(
                "bias", nn.Parameter(torch.empty(num_features, **fk)) if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **fk))
            self.register_buffer("running_var", torch.ones(num_features, **fk))
            self.register_buffer("num_batches_tracked", torch.tensor(
                0, dtype=torch.long, **{k: v for k, v in fk.items() if k != "dtype"}))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, step counter 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        axis = f", axis={self.axis}" if self.axis != 1 else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}{axis}")

    def _momentum_and_step(self):
        """(momentum to use now, whether to count a step) in training mode.

        momentum=None is the cumulative average: 1 / (batches seen including this one).
        The counter is advanced by the caller only after the forward succeeded.
        """
        counting = self.training and self.track_running_stats
        if not counting:
            return (0.0 if self.momentum is None else self.momentum), False
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1), True
        return self.momentum, True

    def _uses_batch_stats(self) -> bool:
        """Training mode, or no running statistics to use (torch's `bn_training`)."""
        return self.training or self.running_mean is None

    def _running_buffers(self):
        """The buffers to read/update, or (None, None) when they must not be touched."""
        if not self.training or self.track_running_stats:
            b = self._buffers  # direct: nn.Module.__getattr__ costs ~1 us per lookup
            return b["running_mean"], b["running_var"]
        return None, None

    def _batch_norm(self, input, mask=None, act: str = "identity"):
        """The core op with this layer's parameters and buffers; the step counter advances
        only after the call succeeded (a failed call leaves every state untouched)."""
        momentum, step = self._momentum_and_step()
        rm, rv = self._running_buffers()
        p, b = self._parameters, self._buffers
        counter = b["num_batches_tracked"] if step else None
        batch_stats = self.training or b["running_mean"] is None  # _uses_batch_stats()
        return F.counted_batch_norm(input, rm, rv, p["weight"], p["bias"], batch_stats,
                                    momentum, self.eps, self.axis, mask, act, counter)

    def _scripted(self, input: torch.Tensor, chunked: bool = False) -> torch.Tensor:
        """What torch.jit.script compiles for this layer (`bnkit.nn.export`)."""
        return scripted_batch_norm(input, self.running_mean, self.running_var, self.weight,
                                   self.bias, float(self.eps), self.axis, self.training, chunked)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints older than num_batches_tracked: start counting from 0 as torch does.
            state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                               and self.num_batches_tracked.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _check_constructor(num_features, eps, momentum) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, the number of channels (got "
                         f"{num_features!r}); pass the size of the input's channel dimension")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (got {eps}); the usual value is 1e-5")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be None (cumulative average) or in [0, 1] (got "
                         f"{momentum}); bnkit uses PyTorch's convention: 0.1 here equals 0.9 in "
                         "Keras (m_torch = 1 - m_keras)")
