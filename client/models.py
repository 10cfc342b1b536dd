"""Typed results, the same for both transports: the contract's models (api.models) plus what the client echoes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from api.models import DicomInfo, Heatmap, ImageInfo, ModelInfo, Refusal, Validity
from api.models import Explanation as _WireExplanation
from api.models import Prediction as _WirePrediction

__all__ = ["DicomInfo", "Explanation", "Heatmap", "ImageInfo", "ImageUpload", "ModelInfo", "Prediction", "Refusal",
           "Validity"]


class Prediction(_WirePrediction):
    """One classified image: the served prediction, plus the name and identifier it was sent with."""

    filename: str | None = Field(None, description="the name the image was sent with, if any")
    client_id: str | None = Field(None, description="the caller's identifier sent with the image, if any")

    @property
    def is_pneumonia(self) -> bool:
        return self.label == "PNEUMONIA"

    @property
    def refused(self) -> bool:
        """True when the image got no verdict (not a frontal chest X-ray, blank, ...): see `refusal`."""
        return self.status == "refused"


class Explanation(_WireExplanation):
    """One explained image: its prediction (as `classify` gives it) and, unless it was refused, its heatmap.

    `heatmap.overlay_png` / `heatmap.image_png` are PNG bytes; `heatmap.grid` the map as rows of floats in [0, 1].
    """

    prediction: Prediction


class ImageUpload(BaseModel):
    """An image to classify: the file's bytes plus an optional name and caller's identifier."""

    model_config = ConfigDict(frozen=True)

    data: bytes = Field(repr=False)
    filename: str | None = None
    client_id: str | None = None
