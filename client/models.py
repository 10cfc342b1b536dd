"""Typed results, the same for both transports (they mirror the service's HTTP JSON and the proto)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageInfo(BaseModel):
    width: int
    height: int
    mode: str = Field(description="PIL mode of the upload, e.g. L, RGB, I;16")
    format: str


class Prediction(BaseModel):
    """One classified image."""

    model_config = ConfigDict(frozen=True)

    label: Literal["NORMAL", "PNEUMONIA"]
    probability: float = Field(ge=0, le=1, description="calibrated probability of pneumonia")
    threshold: float = Field(description="operating point: probability >= threshold means PNEUMONIA")
    confidence: float = Field(ge=0, le=1, description="calibrated probability of the returned label")
    model: str = Field(description="model tag that produced this prediction")
    image: ImageInfo
    warnings: list[str] = Field(default_factory=list, description="reasons to double-check this result")
    processing_ms: float = Field(description="server time from upload parsed to result, queueing included")
    batch_size: int = Field(description="images in the forward pass that produced this prediction")
    filename: str | None = Field(None, description="the name the image was sent with, if any")
    client_id: str | None = Field(None, description="the caller's identifier sent with the image, if any")

    @property
    def is_pneumonia(self) -> bool:
        return self.label == "PNEUMONIA"


class ModelInfo(BaseModel):
    """The served model and the serving configuration (HTTP `POST /health`, gRPC `GetModelInfo`)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    ready: bool
    model: str
    arch: str
    threshold: float
    temperature: float
    target_sensitivity: float
    validation_metrics: dict[str, Any] = Field(default_factory=dict)
    preprocess: dict[str, Any] = Field(default_factory=dict)
    uptime_s: float
    workers: int
    torch_threads: int
    batching: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)


class ImageUpload(BaseModel):
    """An image to classify: the file's bytes plus an optional name and caller's identifier."""

    model_config = ConfigDict(frozen=True)

    data: bytes = Field(repr=False)
    filename: str | None = None
    client_id: str | None = None
