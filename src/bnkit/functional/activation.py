"""Activations that BatchNormAct fuses into the elementwise pass, with their derivatives.

Each entry maps a name to (f(z), f'(z)); the backward multiplies dy by f'(z) before BN's
own reduce and elementwise steps (dz = dy * f'(z)).
"""
from __future__ import annotations

import math

import torch

from ..errors import BNValueError


def _relu_grad(z):
    return (z > 0).to(z.dtype)


def _silu_grad(z):
    s = torch.sigmoid(z)  # d/dz z*s(z) = s + z s (1 - s)
    return s * (1 + z * (1 - s))


def _gelu_grad(z):
    # exact GELU z * Phi(z): Phi(z) + z * phi(z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


ACTIVATIONS = {
    "identity": (None, None),
    "relu": (torch.relu, _relu_grad),
    "silu": (torch.nn.functional.silu, _silu_grad),
    "gelu": (torch.nn.functional.gelu, _gelu_grad),
}


def check_act(act: str) -> str:
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise BNValueError(f"unknown activation {act!r}: expected one of "
                           f"{sorted(ACTIVATIONS)}; pass a module instead for anything else")
    return act


def apply_act(z, act: str):
    fn = ACTIVATIONS[act][0]
    return z if fn is None else fn(z)


def act_grad(dy, z, act: str):
    """dz = dy * f'(z); identity returns dy unchanged."""
    grad = ACTIVATIONS[act][1]
    return dy if grad is None else dy * grad(z.to(dy.dtype) if dy.dtype != z.dtype else z)
