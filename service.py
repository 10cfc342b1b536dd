"""BentoML service: batched pneumonia classification of chest X-rays.

    bentoml serve                      # serves the production model from the store

Each upload is validated and reduced to the model's input grid while the
request is parsed (`training.preprocess.prepare`, the same code training used),
so only good images reach the adaptive batcher, and a bad file is answered with
a 400 that names it instead of failing the whole batch it would have joined.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import bentoml
import numpy as np
import torch
from bentoml.exceptions import ServiceUnavailable
from pydantic import BaseModel, BeforeValidator, Field, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile

import models_registry
from serving import grpc_endpoint
from serving.http_guard import HttpGuard
from serving.lifecycle import ReadinessGate, load_settings, preflight, resolve_model, warm_up_in_background
from training.preprocess import ImageRejected, PreparedImage, prepare

SETTINGS = load_settings()  # bad configuration stops `bentoml serve` here with one line
# A missing or unusable model stops `bentoml serve` here with one line (serving/lifecycle.py).
MODEL_TAG, CARD = resolve_model(SETTINGS.model, Path(__file__).resolve().parent)

PREDICTIONS = bentoml.metrics.Counter(
    name="pneumonia_predictions_total", documentation="Classified images by predicted label", labelnames=["label", "model"]
)
PROBABILITY = bentoml.metrics.Histogram(
    name="pneumonia_probability",
    documentation="Calibrated pneumonia probabilities served (watch for drift)",
    labelnames=["model"],
    buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)),
)
REJECTED = bentoml.metrics.Counter(
    name="pneumonia_rejected_inputs_total", documentation="Uploads refused before inference, by reason", labelnames=["reason"]
)
MODEL_INFO = bentoml.metrics.Gauge(
    name="pneumonia_model_info", documentation="The served model (value 1)", labelnames=["model", "arch", "threshold"]
)


def _reject(reason: str, message: str) -> PydanticCustomError:
    REJECTED.labels(reason=reason).inc()
    return PydanticCustomError(reason, message)


def _prepare_upload(value: object, to_path: ValidatorFunctionWrapHandler) -> PreparedImage:
    """Runs while the request is parsed: decode, validate and preprocess one upload.

    Multipart uploads arrive as Starlette UploadFiles and are read from memory;
    only other inputs (e.g. a path from a Python caller) go through BentoML's
    own file handling, which writes every upload to a temporary file first.
    """
    received = time.perf_counter()
    try:
        if isinstance(value, UploadFile):
            size = value.size if value.size is not None else value.file.seek(0, 2)
            value.file.seek(0)
            read = value.file.read
        else:
            path: Path = to_path(value)
            size, read = path.stat().st_size, path.read_bytes
        if size > SETTINGS.limits.max_bytes:
            raise ImageRejected("too_many_bytes", f"the upload is {size:,} bytes, over the limit of {SETTINGS.limits.max_bytes:,} bytes")
        prepared = prepare(read(), CARD.preprocess, SETTINGS.limits)
    except ImageRejected as exc:
        raise _reject(exc.reason, exc.message) from None
    object.__setattr__(prepared, "received", received)
    return prepared


def _check_count(value: object) -> object:
    """Refuse over-long lists before any image in them is decoded."""
    if isinstance(value, list):
        if not value:
            raise _reject("no_images", "send at least one image in the 'images' field")
        if len(value) > SETTINGS.max_images_per_request:
            raise _reject(
                "too_many_images",
                f"{len(value)} images in one request; the limit is {SETTINGS.max_images_per_request}",
            )
    return value


Upload = Annotated[Path, WrapValidator(_prepare_upload)]


class ImageInfo(BaseModel):
    width: int
    height: int
    mode: str = Field(description="PIL mode of the upload, e.g. L, RGB, I;16")
    format: str


class Prediction(BaseModel):
    label: Literal["NORMAL", "PNEUMONIA"]
    probability: float = Field(ge=0, le=1, description="calibrated probability of pneumonia")
    threshold: float = Field(description="operating point: probability >= threshold means PNEUMONIA")
    confidence: float = Field(ge=0, le=1, description="calibrated probability of the returned label")
    model: str = Field(description="model tag that produced this prediction")
    image: ImageInfo
    warnings: list[str] = Field(default_factory=list, description="reasons to double-check this result")
    processing_ms: float = Field(description="server time from upload parsed to result, queueing included")
    batch_size: int = Field(description="images in the forward pass that produced this prediction")


class Health(BaseModel):
    ready: bool
    model: str
    arch: str
    threshold: float
    temperature: float
    target_sensitivity: float
    validation_metrics: dict
    preprocess: dict
    uptime_s: float
    workers: int
    torch_threads: int
    batching: dict
    limits: dict


@bentoml.service(
    name="pneumonia_classifier",
    workers=SETTINGS.worker_count(),
    threads=1,  # one forward pass at a time per worker; torch uses the cores inside it
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    logging={"access": {"enabled": False}},  # replaced by the JSON request log (serving/request_log.py)
)
class PneumoniaClassifier:
    """Loads the model once per worker, warms it up, then serves batched predictions."""

    stored_model = bentoml.models.BentoModel(MODEL_TAG)  # packs the model into the Bento

    def __init__(self) -> None:
        self.ready = False
        self.started = time.monotonic()
        self.model: models_registry.LoadedModel | None = None
        torch.set_num_threads(SETTINGS.threads_per_worker())
        # In a thread, so the worker listens (and says 503) while the model loads and warms up.
        warm_up_in_background(self._load_and_warm, delay_s=SETTINGS.warmup_delay_s)

    def _load_and_warm(self) -> None:
        model = models_registry.load_model(MODEL_TAG, engine=SETTINGS.engine)
        size = model.card.preprocess.image_size
        for batch in (1, SETTINGS.batching.max_batch_size):  # allocate kernels and buffers before traffic
            model.probabilities(np.zeros((batch, size, size), dtype=np.uint8))
        self.model = model
        MODEL_INFO.labels(model=MODEL_TAG, arch=CARD.spec.arch, threshold=f"{CARD.threshold:.6f}").set(1)
        self.ready = True

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the `bentoml serve` process before any worker: a bad model exits 1 with one line."""
        preflight(MODEL_TAG, SETTINGS.engine)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """The gRPC endpoint of this worker, on its own port and this event loop (serving/grpc_endpoint.py)."""
        self.grpc = await grpc_endpoint.start(self, SETTINGS) if SETTINGS.grpc.enabled else None

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop()

    @bentoml.api(
        batchable=SETTINGS.batching.enabled,
        max_batch_size=SETTINGS.batching.max_batch_size,
        max_latency_ms=SETTINGS.batching.max_latency_ms,
    )
    def classify(self, images: Annotated[list[Upload], BeforeValidator(_check_count)]) -> list[Prediction]:
        """Classify one or more chest X-rays (multipart field `images`, JPEG/PNG/TIFF/..., any size)."""
        prepared: list[PreparedImage] = images  # type: ignore[assignment]  # validators turned paths into images
        if self.model is None:  # ReadinessGate normally answers before a request gets here
            raise ServiceUnavailable("the model is still loading on this server; retry shortly")
        probabilities = self.model.probabilities(np.stack([p.pixels for p in prepared]))
        card = self.model.card
        done = time.perf_counter()
        results = []
        for item, probability in zip(prepared, probabilities):
            label = card.class_names[int(probability >= card.threshold)]
            PREDICTIONS.labels(label=label, model=MODEL_TAG).inc()
            PROBABILITY.labels(model=MODEL_TAG).observe(float(probability))
            results.append(
                Prediction(
                    label=label,
                    probability=round(float(probability), 6),
                    threshold=card.threshold,
                    confidence=round(float(probability if label == "PNEUMONIA" else 1 - probability), 6),
                    model=MODEL_TAG,
                    image=ImageInfo(width=item.width, height=item.height, mode=item.mode, format=item.format),
                    warnings=list(item.warnings),
                    processing_ms=round((done - getattr(item, "received", done)) * 1000, 2),
                    batch_size=len(prepared),
                )
            )
        return results

    @bentoml.api(route="/health")
    def health(self) -> Health:
        """Readiness, the served model with its validation metrics, and the serving configuration."""
        card = CARD  # the served model's card, known before its weights are loaded
        return Health(
            ready=self.ready,
            model=MODEL_TAG,
            arch=card.spec.arch,
            threshold=card.threshold,
            temperature=card.temperature,
            target_sensitivity=card.target_sensitivity,
            validation_metrics=card.val_metrics,
            preprocess=card.preprocess.model_dump(),
            uptime_s=round(time.monotonic() - self.started, 1),
            workers=SETTINGS.worker_count(),
            torch_threads=torch.get_num_threads(),
            batching=SETTINGS.batching.model_dump(),
            limits={**SETTINGS.limits.model_dump(), "max_images_per_request": SETTINGS.max_images_per_request},
        )


# BentoML otherwise derives each response's media type from a freshly generated JSON schema (measured:
# 13% of the event loop's time under load); both APIs answer JSON.
for _api in PneumoniaClassifier.apis.values():
    _api.output_spec.media_type = "application/json"

# Outermost of ours: request id, security headers, CORS, API keys, rate limit, body and multipart checks.
PneumoniaClassifier.add_asgi_middleware(HttpGuard, settings=SETTINGS, upload_routes={"/classify": "images"})
# Model routes wait briefly for a warming worker, then answer 503 (serving/lifecycle.py).
PneumoniaClassifier.add_asgi_middleware(ReadinessGate, paths=["/classify"], wait_s=SETTINGS.ready_wait_s)
