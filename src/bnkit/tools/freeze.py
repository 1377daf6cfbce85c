"""Freeze every BN layer (fixed statistics and affine, in train and eval mode) and back.

freeze turns each BN layer into a `bnkit.nn.FrozenBatchNorm` holding its running statistics
and affine parameters as buffers; y = (x - running_mean) / sqrt(running_var + eps) * weight +
bias whatever model.train() says, with no parameter to train. A layer with an activation
(bnkit's BatchNormAct, timm's BatchNormAct2d) becomes nn.Sequential(FrozenBatchNorm, [drop,]
act), keeping its dropout and activation. unfreeze gives back trainable layers with the same
state. A layer frozen by `freeze` (or `convert(..., "frozen")`) remembers its source layer,
so unfreeze restores the same class and options (momentum, affine, bias, requires_grad,
ghost/renorm settings, activation) with the current buffers: freeze -> unfreeze leaves the
state dict bit-identical, num_batches_tracked included. Both work in place, like torch's
`convert_sync_batchnorm`; inplace=False works on a copy.
"""
from __future__ import annotations

import copy

from torch import nn

from .convert import UNFROZEN, build, convert, copy_state
from .walk import check_module, is_frozen_bn, replace_all, working_copy


def freeze(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Replace every BN layer by a FrozenBatchNorm with the same statistics and affine.

    Frozen layers normalize with their running statistics in train and eval mode and have no
    parameters (weight and bias become buffers). A layer with an activation (bnkit's
    BatchNormAct, timm's BatchNormAct2d) becomes nn.Sequential(FrozenBatchNorm, [drop,] act).
    Layers with per-step statistics (recurrent BN) are left alone.

    Works in place, like torch's `convert_sync_batchnorm`: layers are replaced in their
    parents and the model is returned (a new object only when `model` is itself a BN layer).

    Args:
        model: any nn.Module.
        inplace: change `model` itself (default True); False freezes a deep copy.

    Returns: the frozen model.

    Raises: ValueError naming the layer for a BN without running statistics
    (track_running_stats=False); the model is unchanged then.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> type(freeze(net)[1]).__name__
        'FrozenBatchNorm'
    """
    check_module(model, "freeze")
    return convert(model, "frozen", inplace=inplace)


def unfreeze(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Replace every frozen BN layer by a trainable one with the same state.

    A layer frozen by `freeze` becomes its original class again (options, activation and
    requires_grad included) with the frozen layer's current buffers; any other
    FrozenBatchNorm becomes a bnkit BatchNorm (`FrozenBatchNorm.to_batchnorm`), and a
    torchvision-style FrozenBatchNorm2d a bnkit BatchNorm2d. The training flag is the frozen
    layer's. Works in place like `freeze`.

    Args:
        model: any nn.Module.
        inplace: change `model` itself (default True); False unfreezes a deep copy.

    Returns: the unfrozen model (a new object only when `model` is itself a frozen layer).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> type(unfreeze(freeze(net))[1]).__name__
        'BatchNorm2d'
    """
    check_module(model, "unfreeze")
    work = working_copy(model, "unfreeze", inplace)
    wrappers = [m for m in work.modules() if _frozen_wrapper(m)]
    inner = {id(w[0]) for w in wrappers}  # restored with their wrapper
    return replace_all(work, _thaw,
                       select=lambda m: _frozen_wrapper(m) or (is_frozen_bn(m)
                                                               and id(m) not in inner))


def _frozen_wrapper(module: nn.Module) -> bool:
    """nn.Sequential(FrozenBatchNorm, [drop,] act) made by freeze from a layer with an
    activation."""
    return isinstance(module, nn.Sequential) and UNFROZEN in module.__dict__


def _thaw(name: str, frozen: nn.Module) -> nn.Module:
    source = frozen.__dict__.get(UNFROZEN)
    if source is not None:  # the layer `freeze` replaced: same class and options
        bn = frozen[0] if isinstance(frozen, nn.Sequential) else frozen
        ref = bn.running_mean
        new = copy.deepcopy(source).to(device=ref.device, dtype=ref.dtype)
        copy_state(bn, new)
        return new.train(bn.training)
    if hasattr(frozen, "to_batchnorm"):
        return frozen.to_batchnorm()
    return build("batchnorm", name, frozen, {})  # torchvision-style FrozenBatchNorm2d
