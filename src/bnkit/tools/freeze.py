"""Freeze every BN layer (fixed statistics and affine, in train and eval mode) and back.

freeze turns each BN layer into a `bnkit.nn.FrozenBatchNorm` holding its running statistics
and affine parameters as buffers; y = (x - running_mean) / sqrt(running_var + eps) * weight +
bias whatever model.train() says, with no parameter to train. unfreeze gives back trainable
layers with the same state. A layer frozen by `freeze` (or `convert(..., "frozen")`)
remembers its source layer, so unfreeze restores the same class and options (momentum, affine,
bias, requires_grad, ghost/renorm settings) with the current buffers: freeze -> unfreeze
leaves the state dict bit-identical, num_batches_tracked included.
"""
from __future__ import annotations

import copy

from torch import nn

from .convert import UNFROZEN, build, convert, copy_state
from .walk import is_frozen_bn, replace_all, working_copy


def freeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every BN layer by a FrozenBatchNorm with the same statistics and affine.

    Frozen layers normalize with their running statistics in train and eval mode and have no
    parameters (weight and bias become buffers). Layers with per-step statistics (recurrent BN)
    are left alone.

    Args:
        model: any nn.Module.
        inplace: change `model` itself instead of a copy. Default False.

    Returns: the frozen model (a deep copy unless inplace=True).

    Raises: ValueError naming the layer for a BN without running statistics
    (track_running_stats=False); TypeError naming it for a BatchNormAct with an activation.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> type(freeze(net)[1]).__name__
        'FrozenBatchNorm'
    """
    return convert(model, "frozen", inplace=inplace)


def unfreeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every frozen BN layer by a trainable one with the same state.

    A layer frozen by `freeze` becomes its original class again (options and requires_grad
    included) with the frozen layer's current buffers; any other FrozenBatchNorm becomes a
    bnkit BatchNorm (`FrozenBatchNorm.to_batchnorm`), and a torchvision-style
    FrozenBatchNorm2d a bnkit BatchNorm2d. The training flag is the frozen layer's.

    Args:
        model: any nn.Module.
        inplace: change `model` itself instead of a copy. Default False.

    Returns: the unfrozen model (a deep copy unless inplace=True).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> type(unfreeze(freeze(net))[1]).__name__
        'BatchNorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze expects an nn.Module (got {type(model).__name__}); pass the "
                        "model")
    work = working_copy(model, "unfreeze", inplace)
    return replace_all(work, _thaw, select=is_frozen_bn)


def _thaw(name: str, frozen: nn.Module) -> nn.Module:
    source = frozen.__dict__.get(UNFROZEN)
    if source is not None:  # the layer `freeze` replaced: same class and options
        ref = frozen.running_mean
        new = copy.deepcopy(source).to(device=ref.device, dtype=ref.dtype)
        copy_state(frozen, new)
        return new.train(frozen.training)
    if hasattr(frozen, "to_batchnorm"):
        return frozen.to_batchnorm()
    return build("bnkit", name, frozen, {})  # torchvision-style FrozenBatchNorm2d
