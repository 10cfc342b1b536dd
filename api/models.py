"""The JSON bodies of the HTTP API; the gRPC messages carry the same fields (api/proto)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema, model_validator


class DicomInfo(BaseModel):
    """What a DICOM upload says about its acquisition and encoding; never anything about the patient.

    `sop_instance_uid` and `study_instance_uid` are echoed so a client can match results to its objects.
    """

    model_config = ConfigDict(frozen=True)

    photometric_interpretation: str = Field(description="MONOCHROME1 (shown inverted) or MONOCHROME2, ...")
    bits_allocated: int
    bits_stored: int
    transfer_syntax: str = Field(description="name of the transfer syntax, e.g. JPEG-LS Lossless Image Compression")
    transfer_syntax_uid: str
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = Field(None, description="Body Part Examined")
    pixel_spacing_mm: tuple[float, float] | None = Field(None, description="(row, column) spacing in mm")
    pixel_spacing_source: str | None = Field(None, description="PixelSpacing, or ImagerPixelSpacing (at the detector)")
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    voi: str | None = Field(None, description="how stored values became grey levels: voi_lut, window, min_max "
                            "(full range) or identity (8-bit data shown as stored); null when not decoded (refused)")
    window_center: float | None = Field(None, description="the window applied (voi 'window')")
    window_width: float | None = None


class ImageInfo(BaseModel):
    width: int
    height: int
    mode: str = Field(description="PIL mode of the upload, e.g. L, RGB, I;16 (DICOM: of its stored values)")
    format: str = Field(description="detected file format, e.g. JPEG, PNG, DICOM")
    dicom: DicomInfo | None = Field(None, description="DICOM uploads only: acquisition and encoding tags")


class Refusal(BaseModel):
    """Why an image got no verdict: `reason` is a code of api.reasons.REFUSAL_REASONS."""

    model_config = ConfigDict(frozen=True)

    reason: str
    message: str


class Validity(BaseModel):
    """The input-validity gate's measurements of one image against the served model's limits."""

    model_config = ConfigDict(frozen=True)

    outlier_score: float = Field(description="distance from chest X-ray features; above outlier_limit: not a chest X-ray")
    outlier_limit: float
    upright_probability: float = Field(description="probability of an upright, whole, correctly polarised chest X-ray")
    upright_limit: float = Field(description="below it: inverted, rotated or cropped")
    grey_level_spread: float = Field(description="standard deviation of the grey levels (0-255) the model saw")
    blank_limit: float = Field(description="below it: blank")
    # The checks added on 2026-11-28; null for a model whose gate was fitted before them.
    partial_probability: float | None = Field(None, description="probability of part of a chest X-ray (a half, a "
                                              "band) or several side by side; above partial_limit: cropped")
    partial_limit: float | None = None
    level_share: float | None = Field(None, description="share of the pixels in the 4 most common grey levels; above "
                                      "level_share_limit: not a chest X-ray (binarised, posterised)")
    level_share_limit: float | None = None


class Prediction(BaseModel):
    """One image's answer, as `POST /classify` returns it (one per image, in request order).

    `status` "ok": `label`, `probability` and `confidence` are set. "refused": the image is
    not one the model may answer (not a frontal chest X-ray, blank, inverted, rotated, a crop,
    a DICOM object of another kind); `refusal` says why and the verdict fields are null.
    """

    model_config = ConfigDict(frozen=True)

    status: Literal["ok", "refused"] = "ok"
    label: Literal["NORMAL", "PNEUMONIA"] | None
    probability: float | None = Field(ge=0, le=1, description="calibrated probability of pneumonia")
    threshold: float = Field(description="operating point: probability >= threshold means PNEUMONIA")
    confidence: float | None = Field(ge=0, le=1, description="calibrated probability of the returned label")
    model: str = Field(description="model tag that produced this prediction")
    image: ImageInfo
    refusal: Refusal | None = Field(None, description="why the image got no verdict (status refused)")
    validity: Validity | None = Field(None, description="the input-validity gate's measurements (null: no gate)")
    warnings: list[str] = Field(default_factory=list, description="reasons to double-check this result")
    processing_ms: float = Field(description="server time from upload parsed to result, queueing included")
    batch_size: int = Field(description="images in the forward pass that produced this prediction")

    @model_validator(mode="after")
    def _verdict_or_refusal(self) -> Prediction:
        """"ok" carries a verdict and no refusal, "refused" a refusal and no verdict: a client reading an answer
        that is neither (another server, a proxy) must not take it for one."""
        verdict = (self.label, self.probability, self.confidence)
        if self.status == "ok" and (None in verdict or self.refusal is not None):
            raise ValueError("an 'ok' prediction needs label, probability and confidence, and no refusal")
        if self.status == "refused" and (self.refusal is None or verdict != (None, None, None)):
            raise ValueError("a 'refused' prediction needs a refusal, and no label, probability or confidence")
        return self


def _from_base64(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
    return value


# PNG bytes: base64 (standard alphabet, no line breaks) in JSON, raw bytes in Python and in gRPC messages.
PngBytes = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(lambda data: base64.b64encode(data).decode("ascii"), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}),
]

SALIENCY_CAVEAT = (
    "A saliency map shows which parts of the image drove the model's output; it is not a localisation of disease "
    "(in published comparisons such maps localise findings worse than radiologists do). For review only."
)


class Heatmap(BaseModel):
    """Where the evidence for `target` lay, by Grad-CAM over the model's last convolutional stage.

    `grid` covers the whole image (top row first), values in [0, 1], 1 at the strongest
    evidence; `overlay_png` draws it over the image, `image_png` is the same image
    without it (for a client's own opacity control), both `width` x `height`, the
    aspect ratio of the upload. Not a localisation: see `Explanation.note`.
    """

    model_config = ConfigDict(frozen=True)

    method: str = Field(description="how the map was computed, e.g. Grad-CAM")
    target: Literal["NORMAL", "PNEUMONIA"] = Field(description="the class explained: the predicted label")
    layer: str = Field(description="the model layer whose activations and gradients were used")
    grid: list[list[float]] = Field(description="rows x columns, values in [0, 1], the whole image, top row first")
    overlay_png: PngBytes = Field(description="PNG (base64 in JSON): the map in colour over the grey image")
    image_png: PngBytes = Field(description="PNG (base64 in JSON): the grey image alone, the same size")
    width: int = Field(description="width of both PNGs in pixels")
    height: int = Field(description="height of both PNGs in pixels")


class Explanation(BaseModel):
    """`POST /explain`: the image's prediction, exactly as `POST /classify` gives it, plus a heatmap.

    A refused image (status "refused") gets no heatmap: `heatmap` is null and `note` says why.
    """

    model_config = ConfigDict(frozen=True)

    prediction: Prediction
    heatmap: Heatmap | None = Field(None, description="null when the image was refused")
    note: str = Field(description="what the heatmap is and is not, or why there is none")


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
    engine: str = ""
    validity: dict[str, Any] = Field(default_factory=dict, description="the input-validity gate: `mode` (refuse, warn, "
                                     "off), `fitted`, and its limits as each prediction's `validity` names them")
    site_calibration: dict[str, Any] | None = Field(
        None, description="set when `threshold` and `temperature` were fitted on a site's own X-rays: the site data's "
        "fingerprint and counts, and the figures before and after, each at its own threshold; "
        "`validation_metrics` stay the source model's, measured at the source's threshold")


class ErrorDetail(BaseModel):
    """One reason a request was refused: `type` is a code of api.reasons, `loc` where (e.g. ["images", 1])."""

    type: str
    loc: list[str | int] = Field(default_factory=list)
    msg: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx body the service writes; the shape of BentoML's own validation errors."""

    error: str
    detail: list[ErrorDetail] = Field(default_factory=list)


# pydantic's own heading ("1 validation error for Input"), which BentoML puts in `error`: it says nothing.
PYDANTIC_HEADING = re.compile(r"\d+ validation errors? for \w+")


def refusal_summary(details: list[dict[str, Any]]) -> str:
    """The `error` line of a refusal of images: the first one's message, with which image it is when the
    request had a list, and how many more the `detail` list holds."""
    first = details[0]
    loc = first.get("loc") or []
    where = f"image {loc[1]}: " if len(loc) >= 2 and isinstance(loc[1], int) and loc[0] == "images" else ""
    more = len(details) - 1
    return f"{where}{first.get('msg', '')}" + (f" (and {more} more refused: see detail)" if more else "")


def error_body(message: str, details: list[dict[str, Any]]) -> bytes:
    """The JSON bytes of an `ErrorBody` (json.dumps spacing, as the service always wrote them)."""
    return json.dumps({"error": message, "detail": details}).encode()


class Refused(Exception):
    """A request refused as a whole: its HTTP status and the `ErrorBody` fields that say why.

    Raised by the server's own checks for callers that are not HTTP (the gRPC
    servicer), which map it with api.status.
    """

    def __init__(self, status: int, message: str, details: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    @property
    def reasons(self) -> list[str]:
        return [str(d.get("type")) for d in self.details]
