"""SyncBatchNorm: batch statistics shared by all processes of a group, on CPU (gloo) or GPU."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional.sync import check_on_every_rank, check_process_group, sync_batch_norm_train
from .act import tail_modules
from .base import NormBase
from .batchnorm import BatchNorm


class SyncBatchNorm(NormBase, _BatchNorm):
    """Batch normalization whose training statistics span every rank of a process group.

    In training, each rank computes (count, mean, M2) of its batch, the ranks all-gather them
    and merge with Chan's formula, n = sum n_r, mean = sum n_r mean_r / n,
    M2 = sum n_r var_r + sum n_r (mean_r - mean)^2, and normalize with
    y = (x - mean) / sqrt(M2/n + eps) * weight + bias. The backward all-reduces
    (sum dy, sum dy (x - mean)). Uneven and empty per-rank batches are exact; running_var gets
    M2/(n - 1) with the global n. With 2 ranks under DDP this equals single-process BN on the
    concatenated batch (see docs/layers/sync.md for the gradient scaling). In eval mode, without
    an initialized process group, or in a group of one rank it is plain `BatchNorm`.

    Args:
        num_features: C, the size of the channel dimension.
        eps: added to the variance (default 1e-5).
        momentum: weight of the new batch in the running average (default 0.1); None for a
            cumulative average.
        affine: learn weight and bias (default True).
        bias: with affine, also learn the bias (default True). Keyword-only, as in torch.
        track_running_stats: keep running statistics (default True).
        process_group: the group to synchronize over (default None: the default group).
        axis: the channel dimension (default 1). Keyword-only.

    In training, every rank must call forward in the same order with the layer configured
    alike (same C, input dtype and rank, axis, track_running_stats, eps, momentum), even with
    an empty batch. One small all-gather of a call header comes first: ranks that disagree,
    or whose input fails validation, make every rank raise before anything is written. A
    departed peer, or one in eval mode (which makes no collective call, as in torch), makes
    the others raise after the process group's timeout: set it with
    `init_process_group(..., timeout=datetime.timedelta(seconds=...))`.

    Shape: input (N, C, *) for axis=1 (any rank >= 2); output the same shape and dtype.

    Example:
        >>> bn = SyncBatchNorm(16)        # plain BN here: no process group is initialized
        >>> bn(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
        >>> model = SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
        >>> type(model[1]).__name__
        'SyncBatchNorm'
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, axis: int = 1, bias: bool = True) -> None:
        check_process_group(process_group)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         bias=bias, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            got = f"{x.dim()}D input of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
                else type(x).__name__
            raise ValueError(f"SyncBatchNorm expected at least 2D input (got {got}); it needs a "
                             "batch and a channel dimension, e.g. x.unsqueeze(0)")

    def _sync_group(self):
        """The group to synchronize over now, or None for plain BN (eval, no group, 1 rank)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return self._scripted(input)
        group = self._sync_group()
        check_on_every_rank(self._check_input_dim, input, group)
        if group is None:
            return self._batch_norm(input, mask)
        momentum, step = self._momentum_and_step()
        rm, rv = self._running_buffers()
        counter = self.num_batches_tracked if step else None  # advanced on every rank alike
        return sync_batch_norm_train(input, rm, rv, self.weight, self.bias, momentum, self.eps,
                                     process_group=group, axis=self.axis, mask=mask,
                                     counter=counter)[0]

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm*d (torch.nn's, including its SyncBatchNorm, and bnkit's) in
        `module` by a bnkit SyncBatchNorm sharing its parameters and buffers.

        The parameters are the same objects (an existing optimizer keeps working) and the
        buffers the same tensors; the training flag and channel axis carry over. Returns the
        converted module (a new object when `module` itself is a BatchNorm).

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
            >>> net = SyncBatchNorm.convert_sync_batchnorm(net)
            >>> isinstance(net[1], SyncBatchNorm)
            True
        """
        check_process_group(process_group)
        out = cls._from_batchnorm(module, process_group) if _is_plain_bn(module) else module
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

    @classmethod
    def _from_batchnorm(cls, bn: nn.Module, process_group) -> SyncBatchNorm:
        """A SyncBatchNorm holding `bn`'s own parameter and buffer objects."""
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(f"cannot convert {type(bn).__name__} before its first forward "
                             "(num_features is still unknown); run one batch through the "
                             "model first, or use a non-lazy BatchNorm")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group, axis=getattr(bn, "axis", 1), bias=bn.bias is not None)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if getattr(bn, name, None) is not None:
                setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


def _is_plain_bn(module: nn.Module) -> bool:
    """torch's BatchNorm1d/2d/3d/SyncBatchNorm, or bnkit's BatchNorm (and its 1d/2d/3d); not
    the rest of bnkit's family, which also derives from torch's _BatchNorm, nor a timm-style
    BN with an activation (a plain SyncBatchNorm would drop it: bnkit.convert(model, "sync")
    keeps it)."""
    if isinstance(module, BatchNorm):
        return True
    return (isinstance(module, _BatchNorm) and not isinstance(module, NormBase)
            and not tail_modules(module))

