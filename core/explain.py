"""Class-activation heatmaps (Grad-CAM) of a loaded model, for a person reviewing a result.

Grad-CAM (Selvaraju et al. 2017) weighs the feature maps of one convolutional
layer by the gradient of the explained class's score with respect to them,
sums them and keeps the positive part: where, in that layer's coarse grid, the
features pushed the model towards the class. The maths is Captum's
`LayerGradCam`; this module chooses the layer, the class and the views, and
draws the result.

- The layer: the last convolutional stage of the backbone (`CAM_LAYERS`, keyed
  by `ModelSpec.arch` like the validity gate's `core.model.FEATURE_LAYERS`), the
  coarsest and most class-specific feature maps (7x7 for a 224 px input).
- The class: the predicted label. The model has one logit (pneumonia); NORMAL's
  score is its negative, so a NORMAL verdict gets the map of the evidence against
  pneumonia.
- The views: a model that averages the logits of the image and its mirror image
  (`spec.tta_hflip`) gets the average of both views' maps, the mirror's flipped
  back. Both views go through the backbone as one batch of two.
- The members: an ensemble (`spec.members` > 1) averages its networks' logits, so
  its map is the average of each network's map of its own logit (which is the sum of
  the Grad-CAMs of the averaged logit at each network's layer: the weights scale by
  1/members and the positive part commutes with that).
- The result: a `GRID_SIZE` x `GRID_SIZE` grid over the whole image (the model
  sees the whole image, squashed to a square), scaled so that its peak is 1, and
  a PNG of it drawn over the image at the image's own aspect ratio.

Everything runs on a private copy of the module (`Explainer`), never the one
that classifies, so the hooks Captum registers for a call can never touch a
forward pass of `classify`; the copy is in eval mode (no dropout, BatchNorm's
running statistics) and nothing is random, so one input always gives the same
grid and the same PNG bytes.

A saliency map is not a localisation: in published comparisons such maps
localise findings worse than radiologists do. It shows what the model used,
for review; it is not evidence of where disease is.
"""

from __future__ import annotations

import copy
import functools
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.engines import build_runner
from core.inference import Assessment, LoadedModel
from core.model import ModelSpec, PneumoniaNet
from core.preprocess import to_tensor

# The layer Grad-CAM reads, per architecture: the backbone's last convolutional stage, by its module name.
CAM_LAYERS: dict[str, str] = {
    "mobilenet_v3_small": "features.12",  # features[-1]: 1x1 conv to 576 channels, 7x7 at 224 px
    "mobilenet_v3_large": "features.16",
    "efficientnet_b0": "features.8",
    "resnet18": "layer4",
    "regnet_x_400mf": "trunk_output.block4",
}
METHOD = "Grad-CAM"
GRID_SIZE = 28  # the grid clients get: 28x28 = 784 values, enough to draw the 7x7 map smoothly
OVERLAY_MAX_SIDE = 512  # longer side of the PNGs, or the original's when smaller
OVERLAY_ALPHA = 0.55  # colour weight where the map is 1; it falls to 0 with the map, so cold areas stay grey
COLOUR_MAP = "turbo"  # matplotlib's: dark blue (low) to red (high)


def cam_layer(spec: ModelSpec) -> str:
    """The name (within the backbone) of the layer Grad-CAM reads for this architecture."""
    try:
        return CAM_LAYERS[spec.arch]
    except KeyError:
        raise ValueError(f"no Grad-CAM layer is known for architecture {spec.arch!r}; add it to core.explain.CAM_LAYERS") from None


@dataclass(frozen=True)
class Heatmap:
    """One image's Grad-CAM map and its pictures."""

    grid: np.ndarray  # float32 (GRID_SIZE, GRID_SIZE) in [0, 1], top row first, over the whole image
    target: str  # the class explained (the predicted label)
    layer: str
    overlay_png: bytes  # the map drawn over the image
    image_png: bytes  # the image alone, the same size
    width: int
    height: int


class Explainer:
    """Predictions and Grad-CAM maps from a private copy of a loaded model (one thread at a time).

    `model` gives the weights, card, validity gate and engine; the copy gets its
    own eager module (for gradients) and its own runner with the same engine
    (for the prediction: the numbers `classify` gives for the image alone).
    """

    def __init__(self, model: LoadedModel) -> None:
        from captum.attr import LayerGradCam  # imported here: its import (matplotlib, ~1.5 s) only where used
        from matplotlib import colormaps

        module: PneumoniaNet = copy.deepcopy(model.module).eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)  # gradients flow to the layer's activations only
        self.module = module
        self.card = model.card
        size = model.card.preprocess.image_size
        self.model = LoadedModel(tag=model.tag, module=module, card=model.card, engine=model.engine,
                                 runner=build_runner(module, model.engine, size), gate=model.gate)
        self.layer = cam_layer(model.card.spec)
        self._cams = [LayerGradCam(functools.partial(self._score, net), net.get_submodule(self.layer))
                      for net in module.networks()]
        lut = colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))[:, :3]
        self._colours = np.round(lut * 255).astype(np.float32)

    def _score(self, net: torch.nn.Module, x: torch.Tensor, sign: float) -> torch.Tensor:
        """The explained class's score per view: a member network's logit (PNEUMONIA) or its negative (NORMAL)."""
        if x.shape[1] != self.module.spec.in_channels:
            x = x.expand(-1, self.module.spec.in_channels, -1, -1)
        return net(x).squeeze(1) * sign

    def assess(self, pixels: np.ndarray) -> Assessment:
        """Probability and validity of one uint8 grid, as `LoadedModel.assess` gives them."""
        return self.model.assess(pixels[None])[0]

    def grid(self, pixels: np.ndarray, target: str) -> np.ndarray:
        """The (GRID_SIZE, GRID_SIZE) Grad-CAM map of `target` for one uint8 grid, peak scaled to 1 (all 0: none)."""
        sign = 1.0 if target == self.card.class_names[1] else -1.0
        x = to_tensor(pixels, self.card.preprocess)
        mirrored = self.module.spec.tta_hflip
        views = torch.cat([x, torch.flip(x, dims=(3,))]) if mirrored else x
        with torch.enable_grad():
            maps = sum(cam.attribute(views, additional_forward_args=(sign,), relu_attributions=True).detach()
                       for cam in self._cams) / len(self._cams)
        maps = maps[:, 0].float()  # (views, h, w)
        cam = (maps[0] + torch.flip(maps[1], dims=(1,))) / 2 if mirrored else maps[0]
        grid = F.interpolate(cam[None, None], size=(GRID_SIZE, GRID_SIZE), mode="bilinear", align_corners=False)[0, 0]
        peak = float(grid.max())
        grid = grid / peak if peak > 0 else torch.zeros_like(grid)
        return grid.clamp_(0.0, 1.0).numpy().astype(np.float32)

    def heatmap(self, pixels: np.ndarray, target: str, picture: np.ndarray) -> Heatmap:
        """The map of `target` for `pixels` (the model's grid), drawn over `picture` (the grey image to show)."""
        grid = self.grid(pixels, target)
        return Heatmap(grid=grid, target=target, layer=self.layer, **self.draw(grid, picture))

    def draw(self, grid: np.ndarray, picture: np.ndarray) -> dict:
        """PNGs of `picture` (uint8 grey, any size) with `grid` drawn over it, and of `picture` alone."""
        height, width = picture.shape
        heat = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR))
        heat = np.clip(heat, 0.0, 1.0)[..., None]
        colour = self._colours[np.round(heat[..., 0] * 255).astype(np.uint8)]
        alpha = OVERLAY_ALPHA * heat
        blended = picture[..., None].astype(np.float32) * (1 - alpha) + colour * alpha
        overlay = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        return {"overlay_png": _png(Image.fromarray(overlay, mode="RGB")),
                "image_png": _png(Image.fromarray(picture, mode="L")), "width": width, "height": height}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # zlib level 1: a 512 px overlay encodes in ~20 ms instead of ~90 ms at level 6, for ~25% more bytes (measured)
    image.save(buffer, format="PNG", compress_level=1)  # no timestamps or metadata: same image, same bytes
    return buffer.getvalue()
