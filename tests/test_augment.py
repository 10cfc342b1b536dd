"""Batch augmentation: what MixUp / CutMix do to images and targets, and that they stay off unless asked for."""

from __future__ import annotations

import pytest
import torch

from training.augment import AugmentConfig, augment_batch, mix_batch


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
