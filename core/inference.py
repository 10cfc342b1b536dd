"""A model ready to run: module, card, forward-pass engine and validity gate, fed uint8 grids."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from core.card import ModelCard
from core.engines import Runner
from core.model import PneumoniaNet
from core.preprocess import to_tensor
from core.validity import ValidityGate, ValidityOutcome, ValidityReason, level_share, undo


@dataclass(frozen=True)
class Assessment:
    """One image's answer: the calibrated probability and what the validity gate found."""

    probability: float
    validity: ValidityOutcome | None  # None: the model carries no gate
    logit: float = 0.0  # raw, before the card's temperature

    @property
    def gate_refusal(self) -> str | None:
        """Why the validity gate refuses the image (its reason), or None when it may be answered or there is no gate."""
        return None if self.validity is None else self.validity.reason


@dataclass
class LoadedModel:
    """A module in eval mode plus the card that says how to feed and read it."""

    tag: str
    module: PneumoniaNet
    card: ModelCard
    runner: Runner = field(repr=False)  # (N, 1, H, W) -> (logits, gate features); core/engines.py
    engine: str = "eager"
    gate: ValidityGate | None = field(default=None, repr=False)

    def forward(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 grids (N, H, W) -> (raw logits (N,), pooled features (N, D)), one pass."""
        with torch.inference_mode():
            logits, features = self.runner(to_tensor(pixels, self.card.preprocess))
            return logits.float(), features.float()

    def logits(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 grids (N, H, W) -> raw logits (N,)."""
        return self.forward(pixels)[0]

    def probabilities(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 grids (N, H, W) -> calibrated pneumonia probabilities (N,)."""
        return self.calibrated(self.logits(pixels))

    def calibrated(self, logits: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(logits / self.card.temperature).numpy().astype(np.float64)

    def assess(self, pixels: np.ndarray | torch.Tensor) -> list[Assessment]:
        """Probabilities and validity outcomes of a batch of uint8 grids, from one forward pass."""
        logits, features = self.forward(pixels)
        probabilities = self.calibrated(logits)
        raw = logits.numpy().astype(np.float64)
        if self.gate is None:
            return [Assessment(float(p), None, float(z)) for p, z in zip(probabilities, raw)]
        grids = np.asarray(pixels)
        outcomes = self.gate.assess(features, _spread(grids), level_share(grids))
        named = self._name_transformations(grids, outcomes)
        return [Assessment(float(p), v, float(z)) for p, v, z in zip(probabilities, named, raw)]

    def _name_transformations(self, grids: np.ndarray, outcomes: list[ValidityOutcome]) -> list[ValidityOutcome]:
        """Refusals that look inverted or rotated: undo that and check again (one extra pass, refused images only).

        A chest X-ray that becomes valid once turned back is named for its transformation
        ("rotated", "inverted"), so the client knows what to fix; anything else is not a chest X-ray.
        """
        assert self.gate is not None
        retry = [i for i, o in enumerate(outcomes)
                 if o.reason in ("not_a_chest_xray", "inverted", "rotated") and undo(grids[i], o.suspected) is not None]
        if not retry:
            return outcomes
        undone = np.stack([undo(grids[i], outcomes[i].suspected) for i in retry])
        again = self.gate.assess(self.forward(undone)[1], _spread(undone), level_share(undone))
        outcomes = list(outcomes)
        for i, second in zip(retry, again):
            first = outcomes[i]
            if second.valid:
                reason: ValidityReason = "inverted" if first.suspected == "inverted" else "rotated"
                message = self.gate.orientation_message(first.suspected, first.upright_probability)
            else:
                reason = "not_a_chest_xray"
                message = self.gate.not_a_chest_xray_message(first.outlier_score, first.upright_probability)
            outcomes[i] = dataclasses.replace(first, reason=reason, message=message)
        return outcomes

    def labels(self, probabilities: np.ndarray) -> list[str]:
        return [self.card.class_names[int(p >= self.card.threshold)] for p in probabilities]


def _spread(grids: np.ndarray) -> np.ndarray:
    """Standard deviation of each grid's grey levels (0-255): what the blank check reads."""
    return grids.reshape(len(grids), -1).std(axis=1)
