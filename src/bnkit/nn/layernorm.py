"""ChannelLayerNorm: LayerNorm over the channels of (N, C, *) input, at each position."""
from __future__ import annotations

import torch
from torch import nn


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of (N, C, *) input, at each position.

    y[n, :, p] = (x[n, :, p] - mean_c) / sqrt(var_c + eps) * weight + bias, mean and
    variance over the C channels of one position (the "LayerNorm2d" of ConvNeXt). For the
    other convention, over all of (C, *) per sample, use get_norm("groupnorm", C,
    num_groups=1). Same parameters and state dict as nn.LayerNorm(C).

    Example:
        >>> ln = ChannelLayerNorm(4)
        >>> y = ln(torch.randn(2, 4, 3, 3))
        >>> torch.allclose(y.mean(1), torch.zeros(2, 3, 3), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, axis: int = 1, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.axis = axis

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.movedim(self.axis, -1)  # channels last, where layer_norm normalizes
        y = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, self.axis)
