"""MobileNetV3-Small, module for module as torchvision builds it, without importing torchvision.

Why a copy: importing torchvision imports `torch._dynamo` (through `torchvision.ops`), about
6.5 s of CPU per process on the 2-core machine, in every serving process (the `bentoml
serve` process that checks the model, and each worker) and every CLI command that loads a
model. Serving needs only this one architecture's forward pass. The copy builds the same
modules in the same order under the same names, so state dicts are interchangeable and a
seeded build draws the same initial weights as torchvision's;
tests/test_model.py holds it to torchvision on both, and on a trained model's answers.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn


class Bottleneck(NamedTuple):
    """One inverted-residual block: torchvision's `InvertedResidualConfig` at width 1.0."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    squeeze_excite: bool
    hardswish: bool
    stride: int


SMALL: tuple[Bottleneck, ...] = (  # torchvision's `_mobilenet_v3_conf("mobilenet_v3_small")`
    Bottleneck(16, 3, 16, 16, True, False, 2),
    Bottleneck(16, 3, 72, 24, False, False, 2),
    Bottleneck(24, 3, 88, 24, False, False, 1),
    Bottleneck(24, 5, 96, 40, True, True, 2),
    Bottleneck(40, 5, 240, 40, True, True, 1),
    Bottleneck(40, 5, 240, 40, True, True, 1),
    Bottleneck(40, 5, 120, 48, True, True, 1),
    Bottleneck(48, 5, 144, 48, True, True, 1),
    Bottleneck(48, 5, 288, 96, True, True, 2),
    Bottleneck(96, 5, 576, 96, True, True, 1),
    Bottleneck(96, 5, 576, 96, True, True, 1),
)
SMALL_LAST_CHANNEL = 1024
_BatchNorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class Conv2dNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation: torchvision's `Conv2dNormActivation`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: type[nn.Module] | None = nn.ReLU) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            _BatchNorm(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Channel gating from the block's global average: torchvision's `SqueezeExcitation` with a hard sigmoid."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (k x k), optional squeeze-excitation, project (1x1); residual when shapes allow."""

    def __init__(self, cfg: Bottleneck) -> None:
        super().__init__()
        activation = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.in_channels:
            layers.append(Conv2dNormActivation(cfg.in_channels, cfg.expanded, 1, activation=activation))
        layers.append(Conv2dNormActivation(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride, groups=cfg.expanded,
                                         activation=activation))
        if cfg.squeeze_excite:
            layers.append(SqueezeExcitation(cfg.expanded, _make_divisible(cfg.expanded // 4)))
        layers.append(Conv2dNormActivation(cfg.expanded, cfg.out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(nn.Module):
    """features -> global average -> classifier, initialised as torchvision does."""

    def __init__(self, blocks: tuple[Bottleneck, ...], last_channel: int, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, blocks[0].in_channels, 3, 2, activation=nn.Hardswish)]
        layers += [InvertedResidual(cfg) for cfg in blocks]
        last_conv = 6 * blocks[-1].out_channels
        layers.append(Conv2dNormActivation(blocks[-1].out_channels, last_conv, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_small(dropout: float = 0.2) -> MobileNetV3:
    """torchvision's `mobilenet_v3_small(weights=None, dropout=dropout)`."""
    return MobileNetV3(SMALL, SMALL_LAST_CHANNEL, dropout=dropout)
