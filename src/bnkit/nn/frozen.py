"""FrozenBatchNorm: BN with fixed statistics and affine, for fine-tuning and detection backbones."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from .base import check_constructor, unwrap_converted
from .export import scripted_batch_norm

_KEYS = ("weight", "bias", "running_mean", "running_var")


class FrozenBatchNorm(nn.Module):
    """Batch normalization with every statistic and parameter frozen: an eval-mode BN, always.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel, in train
    and eval mode alike. weight, bias, running_mean, running_var (and num_batches_tracked,
    kept so that freeze -> unfreeze is exact) are buffers: never updated, never returned by
    `parameters()`. The input still gets its gradient, dx = dy * weight / sqrt(running_var +
    eps) (the eval-mode BN backward). The state dict has torch's BN keys, so it loads the
    state dict of a torch.nn.BatchNorm{1,2,3}d or bnkit BatchNorm (a missing
    num_batches_tracked, as in torchvision's FrozenBatchNorm2d, is accepted).

    Args:
        num_features: C, the size of the channel dimension.
        eps: added to the variance (default 1e-5).
        axis: the channel dimension (default 1; -1 for channels-last). Keyword-only.

    Shape: input (N, C, *) for axis=1 (any rank >= 2); output the same shape and dtype.

    Example:
        >>> bn = torch.nn.BatchNorm2d(4).eval()
        >>> frozen = FrozenBatchNorm.from_module(bn)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(frozen.train()(x), bn(x), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, axis: int = 1, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_constructor(num_features, eps, None)
        fk = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.axis = num_features, eps, axis
        self.momentum = 0.1  # not used here: the momentum `to_batchnorm` gives back
        self.register_buffer("weight", torch.ones(num_features, **fk))
        self.register_buffer("bias", torch.zeros(num_features, **fk))
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize with the frozen statistics; `mask` is accepted (and checked) for
        interface parity with BatchNorm, but fixed statistics make it irrelevant."""
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return scripted_batch_norm(input, self.running_mean, self.running_var, self.weight,
                                       self.bias, float(self.eps), self.axis, False)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps, axis=self.axis, mask=mask)

    def extra_repr(self) -> str:
        axis = f", axis={self.axis}" if self.axis != 1 else ""
        return f"{self.num_features}, eps={self.eps}{axis}"

    @classmethod
    def from_module(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A FrozenBatchNorm equal to `bn` in eval mode (torch or bnkit BN, or another frozen).

        Copies eps, axis, momentum (for `to_batchnorm`), the running statistics, the step
        counter (0 if absent) and weight/bias (1 and 0 when `bn` has no affine).
        Raises TypeError for a module that is not a BN layer, ValueError for one without
        per-channel running statistics.
        """
        _check_freezable(bn)
        rm = bn.running_mean
        frozen = cls(bn.num_features, bn.eps, axis=getattr(bn, "axis", 1), device=rm.device,
                     dtype=rm.dtype)
        frozen.momentum = getattr(bn, "momentum", 0.1)
        with torch.no_grad():
            for key in _KEYS:
                src = getattr(bn, key, None)
                if src is not None:
                    getattr(frozen, key).copy_(src)
            if getattr(bn, "num_batches_tracked", None) is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen.train(bn.training)

    def to_batchnorm(self):
        """An equivalent bnkit BatchNorm: trainable weight/bias, the same running statistics,
        step counter, eps, axis, momentum and train/eval mode."""
        from .batchnorm import BatchNorm

        bn = BatchNorm(self.num_features, self.eps, self.momentum, axis=self.axis,
                       device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            for key in _KEYS + ("num_batches_tracked",):
                getattr(bn, key).copy_(getattr(self, key))
        return bn.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        unwrap_converted(self, state_dict, prefix)  # its convert(..., "torch") form
        key = prefix + "num_batches_tracked"
        if key not in state_dict:  # torchvision FrozenBatchNorm2d and pre-v2 torch checkpoints
            state_dict[key] = self.num_batches_tracked.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _check_freezable(bn) -> None:
    """A BN layer with per-channel running statistics, and no activation we would drop."""
    if not isinstance(bn, nn.Module) or not hasattr(bn, "running_mean") \
            or not hasattr(bn, "num_features"):
        raise TypeError(f"FrozenBatchNorm.from_module expects a BatchNorm layer (torch.nn or "
                        f"bnkit.nn) (got {type(bn).__name__}); pass a module with "
                        "running_mean, running_var and num_features")
    from .act import BatchNormAct

    if isinstance(bn, BatchNormAct):
        raise TypeError(f"FrozenBatchNorm.from_module would drop the activation of "
                        f"{type(bn).__name__} (got act={bn.act}); freeze it as "
                        "nn.Sequential(FrozenBatchNorm.from_module(m), m.act)")
    rm, c = bn.running_mean, bn.num_features
    if rm is None or bn.running_var is None:
        raise ValueError(f"cannot freeze {type(bn).__name__} without running statistics (got "
                         "track_running_stats=False); estimate them first with "
                         "track_running_stats=True (a few training-mode batches)")
    if tuple(rm.shape) != (c,):
        raise ValueError(f"FrozenBatchNorm needs one running statistic per channel: expected "
                         f"running_mean of shape ({c},) (got {tuple(rm.shape)}, e.g. per-step "
                         "statistics of RecurrentBatchNorm); freeze a plain BN layer instead")
