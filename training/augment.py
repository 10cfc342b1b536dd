"""Radiograph-appropriate augmentation, applied to whole batches of uint8 grids.

The aim is robustness to acquisition differences (exposure, contrast curve,
cropping, positioning, sharpness, noise), the known gap between this
collection's training and test images. Runs batched on tensors so that two CPU
cores are spent on the model, not on per-image Python.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision.transforms import v2


class AugmentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rotate_deg: float = Field(10.0, ge=0)
    scale: tuple[float, float] = (0.85, 1.15)
    aspect: tuple[float, float] = (1.0, 1.0)
    translate: float = Field(0.08, ge=0, description="fraction of the side")
    shear_deg: float = Field(5.0, ge=0)
    hflip: float = Field(0.5, ge=0, le=1)
    gamma: tuple[float, float] = (0.6, 1.6)
    window: float = Field(0.15, ge=0, lt=0.5, description="max fraction clipped at either end of the grey range")
    blur_p: float = Field(0.25, ge=0, le=1)
    noise_p: float = Field(0.3, ge=0, le=1)
    noise_std: float = Field(0.03, ge=0)
    erase_p: float = Field(0.25, ge=0, le=1)
    # Scanner processing: vendors sharpen or flatten local contrast (unsharp masking at a coarse scale) by
    # different amounts, and a model that reads flatter normal lungs as pneumonia fails at a new site. Off by default.
    local_contrast_p: float = Field(0.0, ge=0, le=1, description="share of images whose local contrast is changed "
                                    "as a scanner's processing would (0: off)")
    local_contrast_amount: tuple[float, float] = Field((-0.6, 1.0), description="unsharp-mask amount range: below 0 "
                                                       "flattens local contrast, above 0 enhances it")
    local_contrast_scale: tuple[float, float] = Field((0.02, 0.25), description="scale of that contrast as a fraction "
                                                      "of the image side (log-uniform Gaussian sigma)")
    # Batch-level mixing (torchvision's MixUp / CutMix): soft targets instead of squeezed ones; off by default.
    mixup_alpha: float = Field(0.0, ge=0, description="MixUp Beta(alpha, alpha) strength (0: off)")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(alpha, alpha) strength (0: off)")
    mix_p: float = Field(0.5, ge=0, le=1, description="share of batches mixed when MixUp or CutMix is on "
                         "(one of the two, at random, when both are)")

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> AugmentConfig:
        for name, value in self:
            if isinstance(value, tuple) and value[0] > value[1]:
                raise ValueError(f"{name}: low {value[0]} is above high {value[1]}")
        if self.local_contrast_amount[0] <= -1:
            raise ValueError(f"local_contrast_amount: low {self.local_contrast_amount[0]} must be above -1")
        if self.local_contrast_scale[0] <= 0:
            raise ValueError(f"local_contrast_scale: low {self.local_contrast_scale[0]} must be above 0")
        for name in ("scale", "aspect", "gamma"):  # drawn log-uniform
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name}: low {getattr(self, name)[0]} must be above 0")
        return self


def _affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    shear = uniform(-cfg.shear_deg, cfg.shear_deg) * math.pi / 180
    scale = torch.exp(uniform(math.log(cfg.scale[0]), math.log(cfg.scale[1])))
    # Width / height ratio change: the collection's images were squashed to squares from many aspect ratios.
    # No draw when it is off, so runs without it keep the random stream (and weights) they had before it existed.
    aspect = (torch.exp(uniform(math.log(cfg.aspect[0]), math.log(cfg.aspect[1]))).sqrt()
              if cfg.aspect != (1.0, 1.0) else torch.ones(n))
    flip = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)
    tx, ty = uniform(-cfg.translate, cfg.translate) * 2, uniform(-cfg.translate, cfg.translate) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    # grid_sample maps output to input coordinates, so dividing by scale zooms in.
    sx, sy = scale * aspect, scale / aspect
    theta[:, 0, 0] = cos / sx * flip
    theta[:, 0, 1] = (-sin + torch.tan(shear)) / sx
    theta[:, 1, 0] = sin / sy * flip
    theta[:, 1, 1] = cos / sy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with reflected borders; the kernel spans three sigmas each way
    unless `radius` says otherwise."""
    radius = min(radius or max(1, math.ceil(3 * sigma)), min(x.shape[-2:]) - 1)
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def _local_contrast(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Unsharp masking by a random amount at a random scale, on a random share of the batch."""
    n, side = x.shape[0], min(x.shape[-2:])
    chosen = torch.rand(n, generator=gen) < cfg.local_contrast_p
    (a_lo, a_hi), (s_lo, s_hi) = cfg.local_contrast_amount, cfg.local_contrast_scale
    amount = torch.rand(n, generator=gen) * (a_hi - a_lo) + a_lo
    sigma = torch.exp(torch.rand(n, generator=gen) * (math.log(s_hi) - math.log(s_lo)) + math.log(s_lo)) * side
    for i in torch.nonzero(chosen).flatten().tolist():
        image = x[i : i + 1]
        x[i : i + 1] = image + float(amount[i]) * (image - _gaussian_blur(image, float(sigma[i])))
    return x


def augment_batch(pixels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """uint8 (N, H, W) -> augmented float (N, 1, H, W) in [0, 1], ready for `preprocess.to_tensor`.

    Works where `pixels` live (a GPU spares the training loop's CPU the per-pixel work); every random draw
    comes from the CPU generator `gen` either way, so a seed gives the same augmentation on any device.
    """
    x = pixels.float().div_(255.0).unsqueeze(1)
    n, device = x.shape[0], x.device
    # The scanner processes the whole image before anyone crops or pads it: changing local contrast after the
    # affine step would smear its zero-padded borders into the picture, a framing cue no scanner makes.
    if cfg.local_contrast_p > 0:  # no draws when off: runs without it keep their random stream
        x = _local_contrast(x, cfg, gen)
    x = _affine(x, cfg, gen)
    # Exposure: a random grey-level window, then a random gamma curve.
    low = (torch.rand(n, 1, 1, 1, generator=gen) * cfg.window).to(device)
    high = (1.0 - torch.rand(n, 1, 1, 1, generator=gen) * cfg.window).to(device)
    x = ((x - low) / (high - low)).clamp_(0.0, 1.0)
    log_g = torch.rand(n, 1, 1, 1, generator=gen) * (math.log(cfg.gamma[1]) - math.log(cfg.gamma[0])) + math.log(cfg.gamma[0])
    x = x.clamp_min(1e-4).pow(torch.exp(log_g).to(device))
    # Sharpness: blur a random subset with one Gaussian kernel.
    blur = (torch.rand(n, generator=gen) < cfg.blur_p).to(device)
    if blur.any():
        sigma = float(torch.rand(1, generator=gen)) * 1.0 + 0.5
        x[blur] = _gaussian_blur(x[blur], sigma, radius=3)  # a fixed kernel: earlier runs stay reproducible
    # Sensor noise.
    noisy = (torch.rand(n, 1, 1, 1, generator=gen) < cfg.noise_p).float().to(device)
    x = x + noisy * torch.randn(x.shape, generator=gen).to(device) * cfg.noise_std
    # Random erasing: occluders, markers, cropped-off regions.
    h, w = x.shape[-2:]
    for i in torch.nonzero(torch.rand(n, generator=gen) < cfg.erase_p).flatten().tolist():
        area = float(torch.rand(1, generator=gen)) * 0.08 + 0.02
        aspect = math.exp(float(torch.rand(1, generator=gen)) * 2 * math.log(3) - math.log(3))
        eh = min(h, int(round(math.sqrt(area * h * w * aspect))))
        ew = min(w, int(round(math.sqrt(area * h * w / aspect))))
        top = int(torch.randint(0, h - eh + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - ew + 1, (1,), generator=gen))
        x[i, :, top : top + eh, left : left + ew] = float(torch.rand(1, generator=gen))
    return x.clamp_(0.0, 1.0)


def mix_batch(x: torch.Tensor, target: torch.Tensor, cfg: AugmentConfig,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix a share of batches (torchvision's, not hand-written): images (N, 1, H, W) in [0, 1] and
    PNEUMONIA labels (N,) -> mixed images and soft PNEUMONIA targets (N,), both unchanged when mixing is off."""
    mixers: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=2))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=2))
    if not mixers or float(torch.rand(1, generator=gen)) >= cfg.mix_p:
        return x, target.float()
    mixer = mixers[int(torch.randint(len(mixers), (1,), generator=gen))]
    mixed, soft = mixer(x, target.long())
    return mixed, soft[:, 1]
