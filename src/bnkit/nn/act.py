"""BatchNormAct: BN followed by an activation in one module, fused for the common activations."""
from __future__ import annotations

import torch
from torch import nn

from .base import NormBase

# The activations the core fuses (`act=` of bnkit.functional.batch_norm), as modules too.
_FUSABLE = {"identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def resolve_act(act) -> tuple[str | None, nn.Module]:
    """(name fused into the core or None, the activation as a module) for a name or module."""
    if isinstance(act, nn.Module):
        return None, act
    if isinstance(act, str):
        if act not in _FUSABLE:
            raise ValueError(f"unknown activation {act!r}: expected one of {sorted(_FUSABLE)} "
                             "or an nn.Module instance (e.g. act=nn.Hardswish())")
        return act, _FUSABLE[act]()
    raise TypeError(f"act must be an activation name or an nn.Module instance (got "
                    f"{type(act).__name__}); pass e.g. act='relu' or act=nn.Hardswish()")


def tail_modules(bn: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of what a BN-with-activation layer applies after normalizing, in order:
    its `drop` then its `act` child, leaving out nn.Identity ones. For bnkit's BatchNormAct
    and timm-style layers (a BN with `act` and `drop` children); [] for any other layer."""
    children = bn._modules
    if not (isinstance(bn, BatchNormAct) or ("act" in children and "drop" in children)):
        return []
    return [(k, children[k]) for k in ("drop", "act")
            if isinstance(children.get(k), nn.Module) and not isinstance(children[k], nn.Identity)]


class BatchNormAct(NormBase):
    """Batch normalization followed by an activation: y = act(BN(x)).

    BN(x) = (x - mean) / sqrt(var + eps) * weight + bias, per channel, exactly as
    `BatchNorm` (batch statistics in training, running statistics in eval). For act in
    'relu', 'silu', 'gelu', 'identity' the activation and its derivative are fused into the
    core's elementwise passes (dz = dy * act'(z), z recomputed in the backward rather than
    stored); any other nn.Module runs after the BN. `self.act` is always the activation as a
    module, so tools can split the layer back into BN + act (`tail_modules`). The state dict
    has BatchNorm2d's keys (plus the module activation's own, if it has parameters), so it
    loads torch BN checkpoints, and the state dict of its `convert(..., "torch")` form
    (nn.Sequential(BN, [drop,] act)).

    It is not a `torch.nn.modules.batchnorm._BatchNorm`, unlike the rest of the family:
    torch's tools that rebuild a `_BatchNorm` as a torch layer
    (`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, hence Lightning's sync_batchnorm=True)
    would silently drop the activation, so they leave it as it is. Torch's
    `swa_utils.update_bn` and `isinstance(m, _BatchNorm)` idioms skip it as well: use
    `bnkit.recalibrate` and `bnkit.tools.is_bn`, or convert it (`bnkit.convert`) first.

    Args:
        num_features: C, the size of the channel dimension.
        act: 'relu' (default), 'silu', 'gelu', 'identity', or an nn.Module.
        eps, momentum, affine, track_running_stats: as in `BatchNorm` (1e-5, 0.1, True, True).
        axis: the channel dimension (default 1). bias: learn the shift (default True).
            Keyword-only.
        drop: a module applied between the BN and the activation (default None), as in timm's
            BatchNormAct2d (act(drop(BN(x)))); with one, the activation runs as a module.
            Keyword-only.

    Shape: input (N, C, *) for axis=1; output the same shape and dtype.

    Example:
        >>> m = BatchNormAct(8, act="silu")
        >>> m.load_state_dict(torch.nn.BatchNorm2d(8).state_dict())
        <All keys matched successfully>
        >>> bool((m(torch.randn(4, 8, 5, 5)) >= -0.2785).all())   # SiLU's minimum
        True
    """

    def __init__(self, num_features: int, act="relu", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, axis: int = 1, bias: bool = True,
                 drop: nn.Module | None = None, device=None, dtype=None) -> None:
        fused, module = resolve_act(act)
        if drop is not None and not isinstance(drop, nn.Module):
            raise TypeError(f"drop must be None or an nn.Module applied between the BN and the "
                            f"activation (got {type(drop).__name__}); pass e.g. "
                            "drop=nn.Dropout(0.1)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         bias=bias, device=device, dtype=dtype)
        if drop is not None:  # registered only when given: the module tree stays as before
            self.drop = drop
            fused = None  # the activation runs after the drop, as a module
        self.fused = fused
        self.act = module

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return self.act(self._scripted(input))
        y = self._batch_norm(input, mask, self.fused or "identity")
        if self.fused is not None:
            return y
        drop = self._modules.get("drop")
        return self.act(y if drop is None else drop(y))

    def extra_repr(self) -> str:
        name = self.fused if self.fused is not None else "module"
        return f"{super().extra_repr()}, act={name!r}"
