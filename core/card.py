"""The metadata stored with every model: what serving needs to reproduce training exactly."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.model import ModelSpec
from core.preprocess import PreprocessConfig
from core.validity import ValidityConfig

MODEL_NAME = "pneumonia-classifier"
CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")  # label index 0 and 1 everywhere
WEIGHTS_FILE = "weights.pt"


class ModelCard(BaseModel):
    """Saved as the BentoML model's metadata; validated again on every load."""

    model_config = ConfigDict(extra="ignore")

    spec: ModelSpec
    preprocess: PreprocessConfig
    class_names: tuple[str, str] = CLASS_NAMES
    temperature: float = Field(1.0, gt=0)
    threshold: float = Field(0.5, ge=0, le=1, description="pneumonia probability at or above which the label is PNEUMONIA")
    target_sensitivity: float = Field(0.98, gt=0, le=1)
    val_metrics: dict[str, Any] = Field(default_factory=dict)
    training_config: dict[str, Any] = Field(default_factory=dict)
    data_fingerprint: str = ""
    code_version: str = ""
    weights_sha256: str = ""
    training_seconds: float | None = None
    site_calibration: dict[str, Any] | None = Field(
        None, description="when set: temperature and threshold were re-fitted on a site's own data (models_registry.calibrate)"
    )
    validity: ValidityConfig | None = Field(
        None, description="the input-validity gate (core/validity.py); its arrays are in validity.npz beside the weights"
    )

    @field_validator("class_names")
    @classmethod
    def _labels_are_the_trained_ones(cls, names: tuple[str, str]) -> tuple[str, str]:
        """Output 0 is NORMAL and 1 PNEUMONIA in every model trained here: a card naming them otherwise (swapped, or
        other labels) would make the service call pneumonia NORMAL, or fail every answer."""
        if tuple(names) != CLASS_NAMES:
            raise ValueError(f"class_names must be {list(CLASS_NAMES)} (output 0 and 1 of the network), not {list(names)}")
        return names
