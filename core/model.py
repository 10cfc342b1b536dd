"""Model definitions: one factory from an architecture config, used by training and the registry.

The registry stores `ModelSpec` next to the weights and rebuilds the module
through `build_model`, so a stored model can always be reconstructed exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from core import mobilenet

Architecture = Literal["mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "regnet_x_400mf", "efficientnet_b0"]


class ModelSpec(BaseModel):
    """Everything needed to rebuild the module before loading its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Architecture = "mobilenet_v3_small"
    in_channels: int = Field(1, ge=1, le=3)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    tta_hflip: bool = Field(
        True, description="average the logits of the image and its mirror image (test-time augmentation)"
    )
    members: int = Field(
        1, ge=1, le=8, description="networks of this architecture whose logits are averaged: an ensemble stored and "
        "served as one model (training.ensemble)"
    )


def _replace_first_conv(module: nn.Module, in_channels: int) -> None:
    """Swap the stem convolution for one taking `in_channels`; pretrained RGB filters are summed."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d) and child.in_channels == 3:
            new = nn.Conv2d(
                in_channels,
                child.out_channels,
                kernel_size=child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                bias=child.bias is not None,
            )
            with torch.no_grad():
                summed = child.weight.sum(dim=1, keepdim=True)
                new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, new)
            return
    raise ValueError("no 3-channel stem convolution found")


def _torchvision_backbone(spec: ModelSpec, pretrained: bool) -> nn.Module:
    """The architecture from torchvision, imported only here: importing torchvision imports torch._dynamo, about
    6.5 s of CPU per process, which the default architecture (core/mobilenet.py) spares every serving process."""
    import torchvision  # noqa: PLC0415

    weights = "DEFAULT" if pretrained else None
    factory = getattr(torchvision.models, spec.arch)
    if spec.arch.startswith("mobilenet") or spec.arch.startswith("efficientnet"):
        return factory(weights=weights, dropout=spec.dropout) if not pretrained else factory(weights=weights)
    return factory(weights=weights)


def _backbone(spec: ModelSpec, pretrained: bool) -> nn.Module:
    if spec.arch == "mobilenet_v3_small" and not pretrained:
        net: nn.Module = mobilenet.mobilenet_v3_small(dropout=spec.dropout)
    else:
        net = _torchvision_backbone(spec, pretrained)
    # A single logit for PNEUMONIA: the last Linear layer becomes out_features=1.
    last_linear = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    for name, child in net.named_modules():
        if child is last_linear:
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, nn.Linear(last_linear.in_features, 1))
    if spec.in_channels != 3:
        _replace_first_conv(net, spec.in_channels)
    # torchvision's MobileNet/EfficientNet use BatchNorm momentum 0.01, tuned for long
    # ImageNet schedules; a short from-scratch run needs running statistics that keep up.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return net


class PneumoniaNet(nn.Module):
    """Backbone(s) + optional mirror TTA; maps (N, C, H, W) to pneumonia logits (N,).

    An ensemble (`spec.members` > 1) averages its networks' logits, so it is stored,
    calibrated, gated and served as one model. The first network stays `backbone`
    (a single model's weights keep their names); the others are `others`.
    """

    def __init__(self, spec: ModelSpec, pretrained: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = _backbone(spec, pretrained)
        self.others = nn.ModuleList(_backbone(spec, pretrained) for _ in range(spec.members - 1))

    def networks(self) -> tuple[nn.Module, ...]:
        """Every member network, the first (`backbone`, the one the validity gate reads) first."""
        return (self.backbone, *self.others)

    def members_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The members' mean logit for one view of the batch (no mirror view); backbone(x) is the first pass."""
        return sum(net(x).squeeze(1) for net in self.networks()) / len(self.networks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.spec.in_channels:
            x = x.expand(-1, self.spec.in_channels, -1, -1)
        logits = self.members_logits(x)  # first, so WithFeatures keeps the un-mirrored backbone pass's stage outputs
        if self.spec.tta_hflip and not self.training:
            logits = (logits + self.members_logits(torch.flip(x, dims=(3,)))) / 2
        return logits


# Stage outputs the validity gate reads, per architecture: where resolution or width changes, plus the last.
FEATURE_LAYERS: dict[str, tuple[str, ...]] = {
    "mobilenet_v3_small": ("features.3", "features.6", "features.8", "features.11", "features.12"),
    "mobilenet_v3_large": ("features.3", "features.6", "features.10", "features.12", "features.16"),
    "efficientnet_b0": ("features.2", "features.3", "features.4", "features.6", "features.8"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "regnet_x_400mf": ("trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"),
}


class WithFeatures(nn.Module):
    """(N, C, H, W) -> (logits (N,), pooled features (N, D)) in one forward pass.

    The features are the global averages of the backbone's stage outputs
    (FEATURE_LAYERS), taken from the first backbone pass (the un-mirrored one
    when the model also averages a mirror image; the first member of an
    ensemble); the validity gate reads them.
    Forward hooks record them, which TorchScript's tracing follows like any op.
    """

    def __init__(self, model: PneumoniaNet) -> None:
        super().__init__()
        self.model = model
        self.layers = FEATURE_LAYERS[model.spec.arch]
        self._pooled: list[torch.Tensor] = []
        for name in self.layers:
            model.backbone.get_submodule(name).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._pooled.append(output.mean(dim=(2, 3)))

    def layer_dims(self) -> tuple[int, ...]:
        """Width of each layer's pooled output, from one small forward pass."""
        size = 64
        with torch.inference_mode():
            self.forward(torch.zeros(1, self.model.spec.in_channels, size, size))
            return tuple(p.shape[1] for p in self._last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._pooled = []
        logits = self.model(x)
        self._last = self._pooled[: len(self.layers)]
        self._pooled = []
        return logits, torch.cat(self._last, dim=1)


def build_model(spec: ModelSpec, pretrained: bool = False) -> PneumoniaNet:
    """A fresh module for `spec`; `pretrained` needs network access to torchvision's weights."""
    return PneumoniaNet(spec, pretrained=pretrained)
