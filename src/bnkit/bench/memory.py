"""`bnkit bench --memory`: what a training step keeps for the backward, per BN + activation.

The same ResNet-style and MobileNet-style models (LeakyReLU after every BN) are built once per
variant: torch's BN + LeakyReLU, the same with LeakyReLU(inplace=True), bnkit's BatchNormAct and
InPlaceABN. For each, the bytes autograd saves (`bnkit.tools.saved_tensor_bytes`, each storage
once, parameters excluded) and the median training step (forward and backward, no optimizer),
the variants timed in interleaved rounds (`timing.time_all`) so that drift on a shared machine
hits them alike.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..tools.memory import saved_tensor_bytes
from .timing import time_all

__all__ = ["VARIANTS", "MemoryRow", "format_report", "memory_report", "mobilenet_style",
           "resnet_style", "run_memory"]


# ----------------------------------------------------------------------------- variants
def _torch_norm_act(c: int, act: str) -> nn.Module:
    bn = nn.BatchNorm2d(c)
    return nn.Sequential(bn, nn.LeakyReLU(0.01)) if act == "leaky_relu" else bn


def _bnkit_norm_act(c: int, act: str) -> nn.Module:
    from ..nn import BatchNormAct

    return BatchNormAct(c, nn.LeakyReLU(0.01) if act == "leaky_relu" else "identity")


def _iabn_norm_act(c: int, act: str) -> nn.Module:
    from ..nn import InPlaceABN

    return InPlaceABN(c, act, 0.01)


def _torch_norm_act_inplace(c: int, act: str) -> nn.Module:
    bn = nn.BatchNorm2d(c)
    return nn.Sequential(bn, nn.LeakyReLU(0.01, inplace=True)) if act == "leaky_relu" else bn


# name -> norm_act(channels, act) with act "leaky_relu" or "identity"
VARIANTS: dict[str, Callable[[int, str], nn.Module]] = {
    "torch BN + LeakyReLU": _torch_norm_act,
    "torch BN + LeakyReLU_": _torch_norm_act_inplace,
    "bnkit BatchNormAct": _bnkit_norm_act,
    "InPlaceABN": _iabn_norm_act,
}


class _Basic(nn.Module):
    """ResNet basic block: conv-norm-act, conv-norm, + shortcut, in-place LeakyReLU (the
    torchvision idiom, in every variant)."""

    def __init__(self, cin: int, cout: int, stride: int, norm_act) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_act(cout, "leaky_relu")
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_act(cout, "identity")
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       norm_act(cout, "identity"))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.act(y + (x if self.short is None else self.short(x)))


def resnet_style(norm_act, width: int = 16, blocks: int = 2, num_classes: int = 10) -> nn.Module:
    """A small CIFAR ResNet (3 stages of `blocks` basic blocks, widths w, 2w, 4w) whose BN
    layers are `norm_act(C, act)` with act 'leaky_relu' or 'identity'."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                               norm_act(width, "leaky_relu")]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
            layers.append(_Basic(cin, cout, 2 if stage and not b else 1, norm_act))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def mobilenet_style(norm_act, width: int = 16, num_classes: int = 10) -> nn.Module:
    """A small MobileNet-v1 (depthwise 3x3 then pointwise 1x1, each followed by
    `norm_act(C, 'leaky_relu')`)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                               norm_act(width, "leaky_relu")]
    cin = width
    for cout, stride in ((2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2),
                         (8 * width, 1)):
        layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                   norm_act(cin, "leaky_relu"), nn.Conv2d(cin, cout, 1, bias=False),
                   norm_act(cout, "leaky_relu")]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@dataclass
class MemoryRow:
    """One variant's measurement: saved bytes (parameters excluded) and the median time of
    a training step (forward and backward, no optimizer) in seconds."""

    variant: str
    saved_bytes: int
    step_s: float


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _step(model, x, y) -> Callable[[], None]:
    """One training step without the optimizer: gradients cleared, forward, backward."""
    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
    return step


def memory_report(model_factory: Callable = resnet_style, variants: dict | None = None, *,
                  batch: int = 32, image: int = 32, steps: int = 5, seed: int = 0,
                  num_classes: int = 10) -> list[MemoryRow]:
    """Saved bytes and step time of `model_factory(norm_act)` for each variant's norm_act.

    Args:
        model_factory: builds a model from `norm_act(C, act)`; `resnet_style` (default) or
            `mobilenet_style`, or any factory with that argument (3-channel images in,
            `num_classes` logits out).
        variants: name -> norm_act; default `VARIANTS` (torch BN + LeakyReLU, the same with
            LeakyReLU(inplace=True), bnkit BatchNormAct with a LeakyReLU module, InPlaceABN).
        batch, image: the input batch (batch, 3, image, image). steps: timed rounds (after
            one warm-up step each); each round runs one step of every variant, in rotated
            order, and the median is reported. seed: same weights and data for every variant.
    """
    saved, fns = {}, {}
    for name, norm_act in (variants or VARIANTS).items():
        torch.manual_seed(seed)
        model = model_factory(norm_act).train()
        x = torch.randn(batch, 3, image, image)
        y = torch.randint(0, num_classes, (batch,))
        saved[name] = saved_tensor_bytes(_loss, model, x, y, exclude=model.parameters())
        fns[name] = _step(model, x, y)
    ms = time_all(fns, repeats=steps, warmup=1)
    return [MemoryRow(name, saved[name], ms[name] / 1e3) for name in fns]


REFERENCE = "bnkit BatchNormAct"  # the step-time target compares InPlaceABN with this row


def format_report(rows: list[MemoryRow], title: str = "") -> str:
    """A text table: saved MiB and step ms, each with its ratio to the first row (torch's
    BN + LeakyReLU), and the step's ratio to bnkit's BatchNormAct when that row is there."""
    base = rows[0]
    ref = next((r for r in rows if r.variant == REFERENCE), None)
    lines = [title] if title else []
    lines.append(f"{'variant':<24}{'saved MiB':>11}{'vs first':>10}{'step ms':>10}"
                 f"{'vs first':>10}" + (f"{'vs BNAct':>10}" if ref else ""))
    for r in rows:
        lines.append(f"{r.variant:<24}{r.saved_bytes / 2**20:>11.2f}"
                     f"{r.saved_bytes / base.saved_bytes:>10.3f}{r.step_s * 1e3:>10.1f}"
                     f"{r.step_s / base.step_s:>10.3f}"
                     + (f"{r.step_s / ref.step_s:>10.3f}" if ref else ""))
    return "\n".join(lines)


def run_memory(batch: int = 32, image: int = 32, steps: int = 5) -> dict[str, list[MemoryRow]]:
    """`memory_report` of both model styles -> {"resnet_style": rows, "mobilenet_style": rows}."""
    return {f.__name__: memory_report(f, batch=batch, image=image, steps=steps)
            for f in (resnet_style, mobilenet_style)}


def format_memory(result: dict[str, list[MemoryRow]]) -> str:
    """Both models' tables: ratios against torch's BN + LeakyReLU (the first row) and, for
    the step, against bnkit's BatchNormAct."""
    return "\n\n".join(format_report(rows, f"saved for backward and step time: {name}")
                       for name, rows in result.items())
