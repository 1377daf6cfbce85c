"""InPlaceABN and InPlaceABNSync: BN + an invertible activation that keep only their output
for the backward (docs/layers/inplace_abn.md)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..functional.inplace_abn import check_invertible, inplace_abn, inplace_abn_sync_train
from ..functional.sync import check_on_every_rank
from .act import BatchNormAct

_MODULES = {"leaky_relu": lambda p: nn.LeakyReLU(p), "elu": lambda p: nn.ELU(p),
            "identity": lambda p: nn.Identity()}


class InPlaceABN(BatchNormAct):
    """In-place activated batch normalization: y = act(BN(x)), keeping only y for the backward.

    The value, gradients and running statistics are those of `BatchNorm` followed by the
    activation (torch's leaky_relu / elu with `act_param`, or none): the layer computes
    z = weight * (x - mean) / sqrt(var + eps) + bias and y = act(z), and its backward
    recovers z from y by inverting the activation and x - mean from z by inverting the
    affine map, so the input x is not kept (Rota Bulò et al., CVPR 2018). Next to a
    convolution, which keeps its own input, a conv + BN + leaky-ReLU block then keeps one
    full-size tensor instead of three.

    The input is overwritten with the output when that is safe: `inplace` is True, x was
    produced by an autograd operation (not a leaf: never a parameter, an input tensor that
    requires grad, or a tensor created without autograd), is not a view and was not kept by
    the operation that produced it (sigmoid, exp, another InPlaceABN). Code that reads x
    after the call (a pre-activation shortcut, `y = abn(x); out = y + x`) then reads the
    output, as with torch's `inplace=True` activations: pass `x.clone()`, or build the layer
    with `inplace=False` (the backward still keeps only y). Another consumer that saved x
    for its own backward before the call makes that backward raise torch's "modified by an
    inplace operation" error instead of computing a wrong gradient.

    ReLU is not accepted: it maps every negative z to 0, so z cannot be recovered from y.
    Channels whose weight is near zero relative to their bias (|weight| * 64 <= |bias|, or
    |weight| < 1e-12) cannot be inverted to the output's precision: for those channels only,
    the layer keeps a copy of their input as well, so the gradients stay exact.

    Unlike the `inplace_abn` package, whose forward scales by |weight| + eps (so a weight
    never reaches zero or changes sign), the weight here is BatchNorm's own: checkpoints of
    torch's BatchNorm2d load with the same function, negative weights included. Load an
    `inplace_abn` checkpoint with `load_inplace_abn_state_dict` to keep its function.

    Args:
        num_features: C, the size of the channel dimension.
        act: 'leaky_relu' (default), 'elu' or 'identity'.
        act_param: leaky_relu's negative slope or elu's alpha, > 0 (default 0.01).
        eps, momentum, affine, track_running_stats: as in `BatchNorm` (1e-5, 0.1, True,
            True).
        axis: the channel dimension (default 1). bias: learn the shift (default True).
        inplace: overwrite the input when safe (default True). Keyword-only.

    Shape: input (N, C, *) for axis=1 (any rank >= 2); output the same shape and dtype.

    State dict: BatchNorm2d's keys (weight, bias, running_mean, running_var,
    num_batches_tracked), which are also the `inplace_abn` package's.

    Example:
        >>> abn = InPlaceABN(8)
        >>> h = torch.nn.Conv2d(3, 8, 3)(torch.randn(4, 3, 6, 6))
        >>> y = abn(h)
        >>> y is h                     # a conv output: overwritten
        True
    """

    def __init__(self, num_features: int, act: str = "leaky_relu", act_param: float = 0.01,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, axis: int = 1, bias: bool = True,
                 inplace: bool = True, device=None, dtype=None) -> None:
        check_invertible(act, act_param)
        super().__init__(num_features, _MODULES[act](act_param), eps, momentum, affine,
                         track_running_stats, axis=axis, bias=bias, device=device, dtype=dtype)
        self.activation, self.act_param, self.inplace = act, float(act_param), bool(inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return self.act(self._scripted(input))
        group = self._sync_group()
        if group is None:
            self._check_input_dim(input)
        else:  # a rejected input makes the peers raise too, instead of waiting
            check_on_every_rank(self._check_input_dim, input, group)
        momentum, step = self._momentum_and_step()
        rm, rv = self._running_buffers()
        if group is None:
            y = inplace_abn(input, rm, rv, self.weight, self.bias, self._uses_batch_stats(),
                            momentum, self.eps, axis=self.axis, act=self.activation,
                            act_param=self.act_param, inplace=self.inplace)
            positions = y.numel()
        else:
            y, positions = inplace_abn_sync_train(
                input, rm, rv, self.weight, self.bias, momentum, self.eps, process_group=group,
                axis=self.axis, act=self.activation, act_param=self.act_param,
                inplace=self.inplace)
        if step and positions > 0:
            self.num_batches_tracked.add_(1)
        return y

    def _sync_group(self):
        """The group to synchronize over now: none (InPlaceABNSync overrides this)."""

    def extra_repr(self) -> str:
        base = super(BatchNormAct, self).extra_repr()
        param = f"[{self.act_param}]" if self.activation != "identity" else ""
        return f"{base}, act={self.activation!r}{param}, inplace={self.inplace}"


class InPlaceABNSync(InPlaceABN):
    """`InPlaceABN` whose training statistics span every rank of a process group.

    As `SyncBatchNorm`: the ranks all-gather a call header and their (count, mean, var),
    merge them with Chan's formula and normalize; the backward all-reduces (sum dz,
    sum dz (x - mean)), with dz = dy act'(z) recovered from the output. weight/bias
    gradients are this rank's share (DDP reduces them). In eval mode, without an initialized
    process group, or in a group of one rank it is plain `InPlaceABN`.

    Args: as `InPlaceABN`, plus process_group (default None: the default group).

    Example:
        >>> abn = InPlaceABNSync(8)     # plain InPlaceABN here: no process group
        >>> abn(torch.randn(4, 8, 3)).shape
        torch.Size([4, 8, 3])
    """

    def __init__(self, num_features: int, act: str = "leaky_relu", act_param: float = 0.01,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, *, axis: int = 1,
                 bias: bool = True, inplace: bool = True, device=None, dtype=None) -> None:
        from ..functional.sync import check_process_group

        check_process_group(process_group)
        super().__init__(num_features, act, act_param, eps, momentum, affine,
                         track_running_stats, axis=axis, bias=bias, inplace=inplace,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _sync_group(self):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


def load_inplace_abn_state_dict(layer: InPlaceABN, state_dict: dict, strict: bool = True):
    """Load a state dict saved from the `inplace_abn` package's InPlaceABN/ABN into `layer`,
    keeping its function: that package scales by |weight| + eps, so the weight is loaded as
    |weight| + layer.eps (the other keys are the same). Returns load_state_dict's result.
    A state dict of torch's BatchNorm loads with plain `load_state_dict`."""
    sd = dict(state_dict)
    if sd.get("weight") is not None:
        sd["weight"] = sd["weight"].abs() + layer.eps
    return layer.load_state_dict(sd, strict=strict)
