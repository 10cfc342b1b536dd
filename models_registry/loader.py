"""Load a stored model into a ready-to-run module, verifying its weights first."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from models_registry.card import MODEL_NAME, WEIGHTS_FILE, ModelCard
from models_registry.engines import Engine, build_runner
from models_registry.store import PRODUCTION, RegistryError, resolve_tag, store_path_of
from training.models import PneumoniaNet, build_model
from training.preprocess import to_tensor


class ModelIntegrityError(RegistryError):
    """The stored weights do not match the sha256 recorded when they were saved."""


@dataclass
class LoadedModel:
    """A module in eval mode plus the card that says how to feed and read it."""

    tag: str
    module: PneumoniaNet
    card: ModelCard
    engine: str = "eager"
    # What runs the forward pass (models_registry/engines.py); the module itself for "eager".
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


def load_model(ref: str = PRODUCTION, name: str = MODEL_NAME, engine: Engine = "eager") -> LoadedModel:
    """Resolve `ref` ('production', a version or a tag), verify and load it in eval mode.

    `engine` chooses how the forward pass runs (models_registry/engines.py); `module`
    stays the eager reference either way.
    """
    tag = resolve_tag(ref, name)
    import bentoml

    stored = bentoml.models.get(tag)
    try:
        card = ModelCard.model_validate(stored.info.metadata)
    except Exception as exc:
        raise RegistryError(f"model {tag} has unusable metadata: {exc}") from None
    weights_path = store_path_of(tag) / WEIGHTS_FILE
    try:
        payload = weights_path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(f"model {tag}: cannot read weights ({exc})") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != card.weights_sha256:
        raise ModelIntegrityError(
            f"model {tag}: weights file {weights_path} is corrupt "
            f"(sha256 {digest[:16]}..., expected {card.weights_sha256[:16]}...); re-import or re-train it"
        )
    module = build_model(card.spec)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as exc:
        raise ModelIntegrityError(f"model {tag}: weights do not fit architecture {card.spec.arch}: {exc}") from None
    module = module.to(memory_format=torch.channels_last).eval()  # oneDNN's fast layout on CPU
    runner = build_runner(module, engine, card.preprocess.image_size)
    return LoadedModel(tag=tag, module=module, card=card, engine=engine, runner=runner)
