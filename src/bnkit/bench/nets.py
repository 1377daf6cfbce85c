"""The networks the benchmarks train and run, each built with a given BN class.

`resnet18` and `mobilenet_v2` follow torchvision's definitions (torchvision/models/resnet.py
and mobilenetv2.py: layers, strides, widths, padding, weight initialization, classifier),
so their BN layers sit where a torchvision user's do; torchvision itself is not needed.
`mlp` (the BN paper's MNIST net), `cnn` (two conv layers) and `resnet_cnn` (a small
CIFAR-style ResNet for the fold benchmark) are the small models.

Example:
    >>> import torch
    >>> from bnkit.bench.nets import mobilenet_v2, resnet18
    >>> resnet18(classes=10)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in mobilenet_v2().modules())
    52
"""
from __future__ import annotations

import torch
from torch import nn

# MobileNetV2's inverted residual stages: expansion t, output channels c, blocks n, stride s
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class BasicBlock(nn.Module):
    """ResNet's basic block: conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU; the
    shortcut is conv1x1-BN (`downsample`) when the stride or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks, same attribute names (conv1, bn1, layer1..4,
    fc), so its state dict has torchvision's keys."""

    def __init__(self, blocks=(2, 2, 2, 2), norm=nn.BatchNorm2d, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (cout, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin, cout, stride, norm)]
            layer += [BasicBlock(cout, cout, 1, norm) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(norm=nn.BatchNorm2d, classes: int = 1000) -> nn.Module:
    """torchvision's resnet18: 7x7/2 stem, 3x3/2 max-pool, 4 stages of 2 BasicBlocks
    (64, 128, 256, 512 channels; strides 1, 2, 2, 2), global average pool, linear."""
    return ResNet((2, 2, 2, 2), norm, classes)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of `divisor`, never 10% below v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int, norm) -> nn.Module:
    """torchvision's Conv2dNormActivation with ReLU6: conv (no bias), BN, ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False), norm(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (when t != 1), 3x3 depthwise, 1x1 linear
    projection + BN; the input is added back when the stride is 1 and the width kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm) -> None:
        super().__init__()
        hidden = round(cin * expand)
        layers = [conv_bn_relu6(cin, hidden, 1, 1, 1, norm)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, hidden, norm),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), norm(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2, same attribute names (features, classifier): a 3x3/2 stem,
    the inverted residual stages of `MOBILENET_V2_STAGES` scaled by `width_mult`, a 1x1 conv
    to 1280 channels, average pool, dropout 0.2 and a linear classifier."""

    def __init__(self, norm=nn.BatchNorm2d, classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features = [conv_bn_relu6(3, cin, 3, 2, 1, norm)]
        for t, c, n, s in MOBILENET_V2_STAGES:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, norm))
                cin = cout
        features.append(conv_bn_relu6(cin, last, 1, 1, 1, norm))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(norm=nn.BatchNorm2d, classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """torchvision's mobilenet_v2 (`MobileNetV2`) with `norm` as its BN class."""
    return MobileNetV2(norm, classes, width_mult)


def resnet_cnn(width: int = 16, norm=nn.BatchNorm2d, classes: int = 10) -> nn.Module:
    """A small CIFAR-style ResNet: 3x3 stem, 3 stages of 2 BasicBlocks (width, 2x, 4x;
    strides 1, 2, 2), average pool, linear; for 3-channel images."""
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2, norm), BasicBlock(cout, cout, 1, norm)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def mlp(bn1d) -> nn.Module:
    """The BN paper's MNIST net: 784-100-100-100-10, sigmoid, BN before each sigmoid."""
    layers, width = [], 784
    for _ in range(3):
        layers += [nn.Linear(width, 100), bn1d(100), nn.Sigmoid()]
        width = 100
    return nn.Sequential(*layers, nn.Linear(100, 10))


def cnn(bn2d) -> nn.Module:
    """Two 3x3 convs (16, 32 channels) each with BN, relu and 2x2 max-pool, then a linear."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), bn2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), bn2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def count_bn(model: nn.Module) -> int:
    """Number of BatchNorm2d layers (torch's, or bnkit's drop-ins) in `model`."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
