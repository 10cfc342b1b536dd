"""A model ready to run: module, card and forward-pass engine, fed uint8 grids through `preprocess.to_tensor`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from core.card import ModelCard
from core.model import PneumoniaNet
from core.preprocess import to_tensor


@dataclass
class LoadedModel:
    """A module in eval mode plus the card that says how to feed and read it."""

    tag: str
    module: PneumoniaNet
    card: ModelCard
    engine: str = "eager"
    # What runs the forward pass (core/engines.py); the module itself for "eager".
    runner: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def logits(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 grids (N, H, W) -> raw logits (N,)."""
        with torch.inference_mode():
            return (self.runner or self.module)(to_tensor(pixels, self.card.preprocess)).float()

    def probabilities(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 grids (N, H, W) -> calibrated pneumonia probabilities (N,)."""
        with torch.inference_mode():
            return torch.sigmoid(self.logits(pixels) / self.card.temperature).numpy().astype(np.float64)

    def labels(self, probabilities: np.ndarray) -> list[str]:
        return [self.card.class_names[int(p >= self.card.threshold)] for p in probabilities]
