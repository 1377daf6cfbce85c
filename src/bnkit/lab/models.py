"""Models of the demo and the lab: the BN paper's sigmoid MLP, a small CNN, a small
ResNet-style net and a row-by-row RNN classifier, each built with a pluggable normalization
layer.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import nn as bnn
from ..nn.registry import get_norm

INIT_STD = 1.0 / 28  # N(0, 1/28^2): the init under which the plain MLP plateaus at 10%


def make_mlp(bn: bool, hidden: int = 100, depth: int = 3, norm: Callable | None = None, *,
             in_features: int = 784, classes: int = 10, init_std: float = INIT_STD,
             seed: int = 0) -> nn.Sequential:
    """The sigmoid MLP of the BN paper: `depth` x [Linear -> (norm) -> Sigmoid] -> Linear.

    Weights are drawn from N(0, init_std^2) with a generator seeded by `seed`, so two calls
    with the same seed and sizes start from the same weights whether or not `bn` is set.
    Biases start at 0; the Linear layers feeding a norm layer have no bias (the norm's
    shift beta replaces it).

    Args:
        bn: Insert a norm layer before each sigmoid.
        hidden: Units per hidden layer (default 100).
        depth: Number of hidden layers (default 3).
        norm: Factory `num_features -> nn.Module` for the norm layer (default None:
            `bnkit.nn.BatchNorm1d`); only valid with bn=True.
        in_features: Input size (default 784 = 28 * 28).
        classes: Output size (default 10).
        init_std: Standard deviation of the initial weights (default 1/28).
        seed: Seed of the weight generator (default 0).

    Shape: input (N, in_features), output logits (N, classes).

    Example:
        >>> model = make_mlp(bn=True)
        >>> model(torch.rand(60, 784)).shape
        torch.Size([60, 10])
    """
    if norm is not None and not bn:
        raise ValueError("norm= is only used with bn=True, got bn=False and norm="
                         f"{norm!r}; pass bn=True to insert it, or drop norm=")
    for name, value in (("hidden", hidden), ("depth", depth), ("in_features", in_features),
                        ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}; pass a layer "
                             "size or count >= 1")
    norm = norm or bnn.BatchNorm1d
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden, bias=not bn)] + ([norm(hidden)] if bn else [])
        layers.append(nn.Sigmoid())
        width = hidden
    layers.append(nn.Linear(width, classes))
    _init_linear(layers, init_std, seed)
    return nn.Sequential(*layers)


def _init_linear(layers, init_std: float, seed: int) -> None:
    """Weights ~ N(0, init_std^2) in layer order from one seeded generator; biases 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * init_std)
                if layer.bias is not None:
                    layer.bias.zero_()


NORMS = ("bn", "ghost", "renorm", "group", "none")


def norm2d(kind: str, channels: int, **kw) -> nn.Module:
    """A normalization layer over (N, C, H, W), by its `bnkit.nn.get_norm` name.

    kind: 'bn' (bnkit BatchNorm2d), 'ghost' (GhostBatchNorm, kw virtual_batch_size),
    'renorm' (BatchRenorm, kw r_max/d_max/momentum), 'group' (torch GroupNorm, kw groups,
    default 4, lowered to divide `channels`), 'none' (identity).

    Example:
        >>> type(norm2d("group", 16)).__name__
        'GroupNorm'
    """
    if kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}: expected one of {NORMS}; pass one of "
                         "those names")
    if kind == "group":
        kw = {"num_groups": divisor_at_most(channels, kw.get("groups", 4))}
    return get_norm(kind, channels, **kw)


def divisor_at_most(channels: int, groups: int) -> int:
    """The largest number of groups <= `groups` that divides `channels`."""
    while channels % groups:
        groups -= 1
    return groups


def make_cnn(widths=(16, 32), norm="bn", classes: int = 10, side: int = 28,
             seed: int = 0, **norm_kw) -> nn.Sequential:
    """Two conv blocks [conv3x3 -> norm -> ReLU -> maxpool2] and a linear classifier.

    `norm` is a kind of `norm2d`, or a callable (channels, side) -> nn.Module for layers
    that need the feature map's side (e.g. torch's LayerNorm over (C, H, W)); side is the
    height and width the layer sees. Convs feeding a norm layer have no bias (the norm's
    shift replaces it). Weights are drawn after torch.manual_seed(seed), so the same seed
    gives the same convs for every norm kind.

    Shape: input (N, 1, side, side), output (N, classes).

    Example:
        >>> make_cnn((4, 8), "bn")(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    torch.manual_seed(seed)
    layers, c_in, at = [], 1, side
    for width in widths:
        layer = norm(width, at) if callable(norm) else norm2d(norm, width, **norm_kw)
        layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=norm == "none"),
                   layer, nn.ReLU(), nn.MaxPool2d(2)]
        c_in, at = width, at // 2
    side = side // 2 ** len(widths)
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(x' + bn(conv(relu(bn(conv(x)))))), x' a 1x1 conv + BN when the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bnn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bnn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.short = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       bnn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


def make_resnet(width: int = 16, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """A small ResNet: stem conv + BN, three basic blocks (width, 2w stride 2, 4w stride 2),
    global average pooling and a linear classifier.

    Shape: input (N, 1, H, W), output (N, classes).

    Example:
        >>> make_resnet(4)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), bnn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


class RowRNN(nn.Module):
    """Classify an image read row by row: (N, 1, S, S) -> S steps of S features -> logits.

    `cell` maps (N, T, F) to per-step hidden states (N, T, H) or a tuple whose first item
    is that (torch.nn.LSTM and bnkit's BNLSTM both do, with batch_first=True).
    """

    def __init__(self, cell: nn.Module, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.cell, self.head = cell, nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(len(x), -1, x.shape[-1])  # (N, S, S): step t is row t
        out = self.cell(seq)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out[:, -1])
