"""Shared module base for the BN family: parameters, buffers, reset, repr, checkpoints.

Keeps torch's state-dict names (weight, bias, running_mean, running_var, num_batches_tracked)
so checkpoints load both ways between torch.nn and bnkit.nn, including old checkpoints
written before torch added num_batches_tracked.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import functional as F
from ..errors import BNShapeError, BNTypeError, BNValueError
from .export import scripted_batch_norm


class NormBase(nn.Module):
    """Holds what every BN layer owns; subclasses only write `forward`.

    The layers that hold BN running statistics and compute nothing but BN also derive from
    torch's `_BatchNorm` (declared on each class, e.g. `class BatchNorm(NormBase,
    _BatchNorm)`), so torch's tools and `isinstance` idioms see them; NormBase comes first
    in their MRO, so its methods (and bnkit's forward) are the ones that run. NormBase
    itself stays a plain Module for layers torch's tools would rebuild wrongly
    (`BatchNormAct`: torch would drop the activation).
    """

    _version = 2  # torch's BN state-dict version: 2 added num_batches_tracked

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 bias: bool = True, device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # not _BatchNorm.__init__: the registration below is ours
        check_constructor(num_features, eps, momentum)
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

    def _check_input_dim(self, input) -> None:
        """torch's _BatchNorm hook (its _NormBase version raises NotImplementedError): a
        tensor with a batch and a channel dimension. The core checks the rest at the call."""
        if not isinstance(input, torch.Tensor) or input.dim() < 2:
            got = f"{input.dim()}D input of shape {tuple(input.shape)}" \
                if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"{type(self).__name__} expected at least 2D input (got {got}); "
                             "it needs a batch and a channel dimension, e.g. x.unsqueeze(0)")

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
        unwrap_converted(self, state_dict, prefix)
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints older than num_batches_tracked: start counting from 0 as torch does.
            state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                               and self.num_batches_tracked.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def unwrap_converted(layer, state_dict, prefix) -> None:
    """Accept the state dict of the layer's `convert(..., "torch")` form: the torch BN at
    child "0", then the layer's drop/act modules at "1", "2" (nn.Sequential or the fx module
    that moves the channel axis). Keys move in place, before torch's loading sees them."""
    if any(prefix + k in state_dict for k in ("weight", "running_mean", "running_var")):
        return
    if not any(k.startswith(prefix + "0.") for k in state_dict):
        return
    from .act import tail_modules

    names = [""] + [name + "." for name, _ in tail_modules(layer)]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        head, _, rest = key[len(prefix):].partition(".")
        if head.isdigit() and int(head) < len(names):
            state_dict[prefix + names[int(head)] + rest] = state_dict.pop(key)


def check_constructor(num_features, eps, momentum) -> None:
    """The constructor's arguments, with bnkit.errors' classes (TypeError for a wrong type,
    ValueError + RuntimeError for a negative size, as torch's layer reports them)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise BNTypeError(f"num_features must be a positive int, the number of channels (got "
                          f"{num_features!r}); pass the size of the input's channel dimension")
    if num_features <= 0:
        raise BNShapeError(f"num_features must be a positive int, the number of channels (got "
                           f"{num_features!r}); pass the size of the input's channel "
                           "dimension")
    for name, v in (("eps", eps), ("momentum", momentum)):
        if v is None and name == "momentum":
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            fix = "1e-5" if name == "eps" else "0.1, or None for the cumulative average"
            raise BNTypeError(f"{name} must be a real number (got {v!r}); pass a float such as "
                              f"{fix}")
    if not eps >= 0:
        raise BNValueError(f"eps must be >= 0 (got {eps}); the usual value is 1e-5")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise BNValueError(f"momentum must be None (cumulative average) or in [0, 1] (got "
                           f"{momentum}); bnkit uses PyTorch's convention: 0.1 here equals 0.9 "
                           "in Keras (m_torch = 1 - m_keras)")
