"""Batch augmentation: what MixUp / CutMix and the local-contrast change do to images and targets, and that they
stay off unless asked for."""

from __future__ import annotations

import pytest
import torch

from training.augment import AugmentConfig, _gaussian_blur, augment_batch, mix_batch


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8, generator=gen)
    return augment_batch(pixels, AugmentConfig(), gen), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


def test_mixing_is_off_by_default() -> None:
    x, y = _batch()
    mixed, target = mix_batch(x, y, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x) and torch.equal(target, y.float())


def test_mixup_blends_images_and_targets_by_the_same_weight() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    mixed, target = mix_batch(x, y, AugmentConfig(mixup_alpha=0.4, mix_p=1.0), torch.Generator().manual_seed(0))
    # torchvision pairs each image with its neighbour in the batch (a roll by one).
    partner_x, partner_y = x.roll(1, 0), y.roll(1, 0).float()
    differ = y != y.roll(1, 0)
    lam = ((target - partner_y) / (y.float() - partner_y))[differ]
    assert torch.allclose(lam, lam[0]) and 0 < float(lam[0]) < 1
    assert torch.allclose(mixed, lam[0] * x + (1 - lam[0]) * partner_x, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_cutmix_pastes_a_box_and_targets_follow_its_area(seed: int) -> None:
    x, y = _batch()
    torch.manual_seed(seed)
    mixed, target = mix_batch(x, y, AugmentConfig(cutmix_alpha=1.0, mix_p=1.0), torch.Generator().manual_seed(0))
    partner_x, partner_y = x.roll(1, 0), y.roll(1, 0).float()
    pasted = (mixed != x).flatten(1).any(0).float().mean()  # share of pixels taken from the partner
    assert torch.allclose(mixed[(mixed != x)], partner_x[(mixed != x)])
    assert torch.allclose(target, (1 - pasted) * y.float() + pasted * partner_y, atol=0.02)


def _high_pass_energy(x: torch.Tensor) -> float:
    """Standard deviation of the image minus its coarse (sigma 3 px) blur: the local contrast a scanner tunes."""
    return float((x - _gaussian_blur(x, 3.0)).std())


@pytest.mark.parametrize(("amount", "factor"), [(-0.5, 0.5), (0.7, 1.7)])
def test_local_contrast_scales_the_detail_by_the_drawn_amount(amount: float, factor: float) -> None:
    # Only the local-contrast change is on; a mid-grey image with soft detail, so nothing clips.
    only = AugmentConfig(rotate_deg=0, scale=(1, 1), translate=0, shear_deg=0, hflip=0, gamma=(1, 1), window=0,
                         blur_p=0, noise_p=0, erase_p=0, local_contrast_p=1.0,
                         local_contrast_amount=(amount, amount), local_contrast_scale=(3 / 64, 3 / 64))
    gen = torch.Generator().manual_seed(0)
    pixels = (128 + 30 * torch.randn(4, 64, 64, generator=gen)).clamp(0, 255).to(torch.uint8)
    plain = pixels.float().div(255).unsqueeze(1)
    changed = augment_batch(pixels, only, gen)
    assert _high_pass_energy(changed) == pytest.approx(factor * _high_pass_energy(plain), rel=0.1)
    assert float(changed.mean()) == pytest.approx(float(plain.mean()), abs=0.01)  # detail changes, exposure does not


def test_local_contrast_off_by_default_leaves_batches_as_they_were() -> None:
    # Earlier recipes must train bit-identically: with the share at 0 the other local-contrast knobs draw nothing.
    pixels = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    base = augment_batch(pixels, AugmentConfig(), torch.Generator().manual_seed(3))
    other = AugmentConfig(local_contrast_amount=(0.2, 0.3), local_contrast_scale=(0.01, 0.02))
    assert torch.equal(base, augment_batch(pixels, other, torch.Generator().manual_seed(3)))


def test_local_contrast_happens_before_framing_so_padded_borders_stay_black() -> None:
    # A scanner processes the image before it is cropped or padded: flattening must not bleed grey into the
    # zero-padded border a zoom-out leaves (it did when the change ran after the affine step).
    zoom_out = AugmentConfig(rotate_deg=0, scale=(0.6, 0.6), translate=0, shear_deg=0, hflip=0, gamma=(1, 1),
                             window=0, blur_p=0, noise_p=0, erase_p=0, local_contrast_p=1.0,
                             local_contrast_amount=(-0.6, -0.6), local_contrast_scale=(0.1, 0.1))
    pixels = torch.full((2, 64, 64), 200, dtype=torch.uint8)
    out = augment_batch(pixels, zoom_out, torch.Generator().manual_seed(0))
    border = torch.cat([out[..., :8, :].flatten(), out[..., -8:, :].flatten(), out[..., :, :8].flatten(),
                        out[..., :, -8:].flatten()])
    assert float(border.max()) < 1e-3
    assert float(out[..., 28:36, 28:36].mean()) == pytest.approx(200 / 255, abs=0.01)  # the picture is untouched


@pytest.mark.parametrize(("field", "value", "said"), [("local_contrast_amount", (1.0, -0.5), "above high"),
                                                      ("gamma", (1.6, 0.6), "above high"),
                                                      ("local_contrast_amount", (-1.0, 0.5), "above -1"),
                                                      ("local_contrast_scale", (0.0, 0.05), "above 0")])
def test_reversed_or_impossible_ranges_are_refused(field: str, value: tuple[float, float], said: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=said):
        AugmentConfig(**{field: value})


@pytest.mark.parametrize(("amount", "factor"), [(-0.5, 0.5), (0.7, 1.7)])
def test_the_local_contrast_stress_scales_detail_at_its_scale(amount: float, factor: float) -> None:
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    from training.stress import _local_contrast

    rng = np.random.default_rng(0)
    image = Image.fromarray((128 + 20 * rng.standard_normal((200, 300))).clip(0, 255).astype(np.uint8), mode="L")
    stressed = Image.open(io.BytesIO(_local_contrast(amount)(image, rng)))

    def detail(im: Image.Image) -> float:  # the band the stress changes: 10 % of the shorter side
        return float((np.asarray(im, np.float32) - np.asarray(im.filter(ImageFilter.GaussianBlur(20)), np.float32)).std())

    assert detail(stressed) == pytest.approx(factor * detail(image), rel=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the device tool lends one at times)")
def test_augmenting_on_a_gpu_gives_the_cpu_batch_for_the_same_seed() -> None:
    # Training augments where the model trains; a seed must mean the same images on either device.
    cfg = AugmentConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_p=1.0, local_contrast_p=0.5,
                        blur_p=0.5, noise_p=0.5, erase_p=0.5)
    pixels = torch.randint(0, 256, (16, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 2
    batches = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)  # MixUp / CutMix draw from the global generator
        x, y = mix_batch(augment_batch(pixels.to(device), cfg, torch.Generator().manual_seed(2)), labels, cfg,
                         torch.Generator().manual_seed(3))
        assert x.device.type == device
        batches.append((x.cpu(), y.cpu()))
    (x_cpu, y_cpu), (x_gpu, y_gpu) = batches
    # cuDNN convolves in TF32 by default (the blurs): pixels may differ in the third decimal, no more.
    assert (x_cpu - x_gpu).abs().max() < 0.02 and (x_cpu - x_gpu).abs().mean() < 1e-3
    assert torch.equal(y_cpu, y_gpu)
