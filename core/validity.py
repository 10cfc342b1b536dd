"""The input-validity gate's maths: is this image a frontal chest X-ray the model may answer?

Fitted during training on training X-rays only (training/gate.py) and stored with the
model (its card holds the limits, `validity.npz` beside the weights the arrays), so
the registry, a Bento and site calibration carry it. At serving it runs on the features of the same
batched forward pass that classifies the image, so it costs a few small matrix
products per batch.

The checks, in order (the grey-level and partial-view ones since 2026-11-28):

- `blank`: almost no grey-level variation (a black, white or flat upload).
- `not_a_chest_xray`: the image's features lie far from those of chest X-rays.
  Per tapped layer, the Mahalanobis distance to the training features (Ledoit-Wolf
  covariance), standardised by its spread on training images; the score is the
  largest over layers (Lee et al. 2018 use the same feature ensemble). This is a
  model of what a chest X-ray looks like, not a list of what it is not.
- `inverted`, `rotated`, `cropped`: a multinomial logistic regression on the same
  features, fitted on training X-rays and their own inverted, rotated and cropped
  versions; the image is refused when its probability of being an upright, whole,
  correctly polarised chest X-ray is below the limit.
- `not_a_chest_xray` also, before the learned checks: almost every pixel of the grid in a handful of grey levels (a
  binarised or posterised picture, a DICOM window far too narrow), which the feature checks let through: such an
  image was called PNEUMONIA with confidence. Gates fitted before 2026-11-28 have no such limit.
- `cropped` also: a binary logistic regression on the same features, fitted on training X-rays against their own
  partial views (a band of the image: a half, a middle strip) and X-rays side by side or tiled; the image is
  refused when its probability of being such a view is over its own limit. Gates fitted before 2026-11-28 have no
  such check (`partial_limit` None).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

ValidityReason = Literal["blank", "not_a_chest_xray", "inverted", "rotated", "cropped"]
# Classes of the orientation head, in the order of its weight rows.
ORIENTATION_CLASSES: tuple[str, ...] = ("upright", "inverted", "rotated_90", "rotated_180", "rotated_270", "cropped")
VALIDITY_FILE = "validity.npz"
LEVELS = 4  # the grey levels `level_share` counts: a binarised image puts ~90 % of its pixels in 2, a chest X-ray ~8 %


def level_share(grids: np.ndarray) -> np.ndarray:
    """Per uint8 grid, the share of its pixels in its `LEVELS` most common grey levels."""
    flat = np.asarray(grids).reshape(len(grids), -1)
    return np.array([np.sort(np.bincount(row, minlength=256))[-LEVELS:].sum() / row.size for row in flat])


class ValidityConfig(BaseModel):
    """Stored in the model card: which features the gate reads, its limits, and how it was measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[str, ...] = Field(description="modules whose globally pooled outputs are the gate's features")
    layer_dims: tuple[int, ...]
    blank_std_limit: float = Field(description="grey-level standard deviation (0-255) below which an image is blank")
    outlier_limit: float = Field(description="largest accepted standardised Mahalanobis score")
    orientation_limit: float = Field(description="smallest accepted probability of an upright, whole chest X-ray")
    partial_limit: float | None = Field(None, description="largest accepted probability of a part of a chest X-ray "
                                        "or of several side by side; None: no such check (an older gate)")
    level_share_limit: float | None = Field(None, description="largest accepted share of the grid's pixels in its "
                                            f"{LEVELS} most common grey levels; None: no such check (an older gate)")
    arrays_sha256: str = ""
    figures: dict = Field(default_factory=dict, description="false refusals and catch rates measured when fitted")


@dataclass(frozen=True)
class ValidityOutcome:
    """What the gate found for one image; `reason` is None when the image may be answered."""

    reason: ValidityReason | None
    outlier_score: float
    upright_probability: float
    pixel_std: float
    message: str = ""
    suspected: str = ""  # the likeliest ORIENTATION_CLASSES transformation, when the image is not upright
    partial_probability: float | None = None  # None: the gate has no partial-view check
    level_share: float | None = None  # None: not measured (the gate has no grey-level check, or no grids were given)

    @property
    def valid(self) -> bool:
        return self.reason is None


@dataclass
class ValidityGate:
    """The fitted gate: configuration plus arrays (per-layer Gaussians and the orientation head)."""

    config: ValidityConfig
    means: list[torch.Tensor]
    precisions: list[torch.Tensor]
    score_mean: torch.Tensor  # per layer, of the scaled distance on training images
    score_std: torch.Tensor
    head_mean: torch.Tensor
    head_scale: torch.Tensor
    head_weight: torch.Tensor  # (classes, features)
    head_bias: torch.Tensor
    partial_weight: torch.Tensor | None = None  # (features,): the partial-view check, on the head's standardised features
    partial_bias: torch.Tensor | None = None  # (1,)

    def to_bytes(self) -> bytes:
        arrays = {"score_mean": self.score_mean, "score_std": self.score_std, "head_mean": self.head_mean,
                  "head_scale": self.head_scale, "head_weight": self.head_weight, "head_bias": self.head_bias}
        if self.partial_weight is not None and self.partial_bias is not None:
            arrays["partial_weight"], arrays["partial_bias"] = self.partial_weight, self.partial_bias
        for i, (mean, precision) in enumerate(zip(self.means, self.precisions)):
            arrays[f"mean_{i}"], arrays[f"precision_{i}"] = mean, precision
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v.numpy().astype(np.float32) for k, v in arrays.items()})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, config: ValidityConfig, payload: bytes) -> "ValidityGate":
        digest = hashlib.sha256(payload).hexdigest()
        if config.arrays_sha256 and digest != config.arrays_sha256:
            raise ValueError(f"validity arrays are corrupt (sha256 {digest[:16]}..., expected {config.arrays_sha256[:16]}...)")
        data = np.load(io.BytesIO(payload))
        t = {k: torch.from_numpy(data[k]) for k in data.files}
        n = len(config.layers)
        return cls(config, [t[f"mean_{i}"] for i in range(n)], [t[f"precision_{i}"] for i in range(n)],
                   t["score_mean"], t["score_std"], t["head_mean"], t["head_scale"], t["head_weight"], t["head_bias"],
                   t.get("partial_weight"), t.get("partial_bias"))

    def layer_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, sum of layer dims) pooled features -> (N, layers) standardised Mahalanobis scores."""
        scores, start = [], 0
        for dim, mean, precision in zip(self.config.layer_dims, self.means, self.precisions):
            centred = features[:, start:start + dim] - mean
            scores.append(((centred @ precision) * centred).sum(1) / dim)
            start += dim
        return (torch.stack(scores, 1) - self.score_mean) / self.score_std

    def orientation(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, classes) probabilities of ORIENTATION_CLASSES."""
        return torch.softmax(((features - self.head_mean) / self.head_scale) @ self.head_weight.T + self.head_bias, 1)

    def partial(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) probabilities of a partial view (a band, X-rays side by side); zeros without the
        check."""
        if self.partial_weight is None or self.partial_bias is None:
            return torch.zeros(len(features))
        return torch.sigmoid(((features - self.head_mean) / self.head_scale) @ self.partial_weight + self.partial_bias)

    def assess(self, features: torch.Tensor, pixel_std: np.ndarray,
               levels: np.ndarray | None = None) -> list[ValidityOutcome]:
        """One outcome per image from its pooled features and the grey-level spread of its input grid.

        An image that is not upright is reported by the transformation the head finds most
        likely (`suspected`); `LoadedModel.assess` undoes it and checks again before naming it.
        """
        features = features.float()
        outlier = self.layer_scores(features).amax(1)
        orientation = self.orientation(features)
        partial = self.partial(features)
        c = self.config
        outcomes = []
        has_partial = c.partial_limit is not None and self.partial_weight is not None
        for i in range(len(features)):
            score, probs, std = float(outlier[i]), orientation[i], float(pixel_std[i])
            figures = {"partial_probability": float(partial[i]) if has_partial else None,
                       "level_share": float(levels[i]) if levels is not None and c.level_share_limit is not None else None}
            upright = float(probs[0])
            suspected = ORIENTATION_CLASSES[int(probs[1:].argmax()) + 1]
            if std < c.blank_std_limit:
                outcome = ValidityOutcome("blank", score, upright, std,
                                          f"the image is nearly uniform (grey-level spread {std:.1f}, limit {c.blank_std_limit:.1f})",
                                          **figures)
            elif c.level_share_limit is not None and levels is not None and levels[i] > c.level_share_limit:
                # suspected "": nothing to turn back (LoadedModel would re-check it and quote another check)
                outcome = ValidityOutcome("not_a_chest_xray", score, upright, std,
                                          FEW_LEVELS.format(levels[i], LEVELS, c.level_share_limit), **figures)
            elif score > c.outlier_limit:
                outcome = ValidityOutcome("not_a_chest_xray", score, upright, std,
                                          self.not_a_chest_xray_message(score, upright), suspected, **figures)
            elif upright < c.orientation_limit:
                reason: ValidityReason = "inverted" if suspected == "inverted" else "cropped" if suspected == "cropped" else "rotated"
                outcome = ValidityOutcome(reason, score, upright, std, self.orientation_message(suspected, upright), suspected,
                                          **figures)
            elif c.partial_limit is not None and float(partial[i]) > c.partial_limit:
                outcome = ValidityOutcome("cropped", score, upright, std, PARTIAL.format(float(partial[i]), c.partial_limit),
                                          "cropped", **figures)
            else:
                outcome = ValidityOutcome(None, score, upright, std, **figures)
            outcomes.append(outcome)
        return outcomes

    def not_a_chest_xray_message(self, outlier_score: float, upright: float) -> str:
        """Why an image is not a chest X-ray, quoting the check that failed: the outlier score when it is over its
        limit, else the upright/whole probability (refused by that check, and still refused when turned back)."""
        c = self.config
        if outlier_score > c.outlier_limit:
            return NOT_A_CHEST_XRAY.format(outlier_score, c.outlier_limit)
        return NOT_A_CHEST_XRAY_BY_ORIENTATION.format(upright, c.orientation_limit)

    def orientation_message(self, suspected: str, upright: float) -> str:
        what = {"inverted": "the grey levels look inverted (bone dark); check the photometric interpretation",
                "cropped": "it looks like part of one; send the whole frontal view"}.get(
            suspected, f"it looks {suspected.replace('_', ' ')} degrees; send it upright")
        return (f"not an upright, whole frontal chest X-ray: {what} (probability of an upright whole chest X-ray "
                f"{upright:.3f}, limit {self.config.orientation_limit:.3f})")


NOT_A_CHEST_XRAY = "the image does not look like a frontal chest X-ray (outlier score {:.2f}, limit {:.2f})"
FEW_LEVELS = ("the image is almost only a few grey levels ({:.0%} of its pixels in {} levels, limit {:.0%}): a "
              "binarised or posterised picture, or a DICOM window far too narrow; send the X-ray with its grey scale")
PARTIAL = ("not one whole frontal chest X-ray: it looks like part of one (a band, a half) or several side by side; "
           "send one whole frontal view (probability of a partial or combined view {:.3f}, limit {:.3f})")
# Refused by the upright/whole check, and still refused when turned back: the outlier score passed, so name the check
# that did not.
NOT_A_CHEST_XRAY_BY_ORIENTATION = ("the image does not look like a frontal chest X-ray: not upright and whole, nor "
                                   "when turned back (probability of an upright whole chest X-ray {:.3f}, limit {:.3f})")


def undo(grid: np.ndarray, suspected: str) -> np.ndarray | None:
    """The grid with a suspected transformation reversed; None for one that cannot be reversed (a crop)."""
    if suspected == "inverted":
        return 255 - grid
    if suspected.startswith("rotated_"):
        return np.ascontiguousarray(np.rot90(grid, -int(suspected.removeprefix("rotated_")) // 90))
    return None
