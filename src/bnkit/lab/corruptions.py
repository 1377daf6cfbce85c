"""Image corruptions in torch for (N, 1, H, W) images in [0, 1], at severities 1..5.

Modelled on ImageNet-C (Hendrycks & Dietterich 2019), scaled to 28x28 grey images. Each
takes (x, severity, generator) and returns a new tensor in [0, 1]; severity 0 is the clean
image. Noise is drawn from the given generator, so a seed fixes the corrupted set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: corruption -> parameter at severities 1..5.
LEVELS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),   # noise std
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),    # fraction of salt-and-pepper pixels
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),                # Gaussian blur std in pixels
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),             # factor on the distance to the mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),            # added to every pixel
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),             # downsampled size / original size
}


def gaussian_noise(x, p, gen):
    return x + p * torch.randn(x.shape, generator=gen)


def impulse_noise(x, p, gen):
    """A fraction p of pixels set to 0 or 1 (half each)."""
    u = torch.rand(x.shape, generator=gen)
    return torch.where(u < p / 2, 0.0, torch.where(u > 1 - p / 2, 1.0, x))


def blur(x, p, gen):
    """Separable Gaussian blur with std p pixels (kernel radius ceil(3p)), zero padding."""
    radius = int(torch.ceil(torch.tensor(3 * p)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * p * p))
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(radius, 0))


def contrast(x, p, gen):
    """(x - m) * p + m with m each image's mean."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * p + m


def brightness(x, p, gen):
    return x + p


def pixelate(x, p, gen):
    """Area-downsample to round(p * side) pixels, then nearest-upsample back."""
    side = x.shape[-1]
    small = F.interpolate(x, size=max(1, round(p * side)), mode="area")
    return F.interpolate(small, size=side, mode="nearest")


FUNCS = {"gaussian_noise": gaussian_noise, "impulse_noise": impulse_noise, "blur": blur,
         "contrast": contrast, "brightness": brightness, "pixelate": pixelate}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (0 = clean, 1..5) and clip to [0, 1].

    Shape: x (N, 1, H, W) in [0, 1] -> same shape.

    Example:
        >>> x = torch.rand(2, 1, 28, 28)
        >>> float(corrupt(x, "brightness", 5).min()) >= 0.5
        True
    """
    if name not in FUNCS:
        raise ValueError(f"unknown corruption {name!r}: expected one of {', '.join(FUNCS)}; "
                         "pass one of those names")
    if severity not in range(6):
        raise ValueError(f"severity must be an int in 0..5 (got {severity!r}); 0 is clean")
    if severity == 0:
        return x.clone()
    gen = torch.Generator().manual_seed(seed)
    return FUNCS[name](x, LEVELS[name][severity - 1], gen).clamp(0.0, 1.0)
