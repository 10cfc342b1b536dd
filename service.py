"""BentoML service: batched pneumonia classification of chest X-rays.

    bentoml serve                      # serves the production model from the store

Each upload is validated and reduced to the model's input grid while the
request is parsed (`core.preprocess.prepare`, the same code training used),
so only good images reach the adaptive batcher, and a bad file is answered with
a 400 that names it instead of failing the whole batch it would have joined.
The gRPC endpoint (serving/grpc/) runs the same checks (`prepare_images`) and
joins the same adaptive batches (`classify_prepared`); the HTTP guard
(serving/http/) wraps the BentoML app. `explain` (one image, its prediction plus
a Grad-CAM heatmap) runs the same checks and answers, off the batches, on threads
of its own (serving/explain.py); the web page (serving/ui/) is mounted at /ui.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypeVar

import bentoml
import numpy as np
import torch
from _bentoml_sdk.method import APIMethod
from bentoml.exceptions import ServiceUnavailable
from pydantic import BeforeValidator, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile

import models_registry
from api.models import Explanation, ModelInfo, Prediction, Refused, refusal_summary
from core.card import ModelCard
from core.engines import Engine
from core.inference import LoadedModel
from core.preprocess import ImageRejected, PreparedImage, prepare
from models_registry import RegistryError
from serving import batching, ui
from serving.answers import BATCH_IMAGES, MODEL_INFO, REJECTED, answer
from serving.explain import PREVIEW_SIDE, ExplainerPool, shared_slots
from serving.grpc import server as grpc_server
from serving.http import HttpGuard
from serving.http.decoding import PREDECODED
from serving.http.traffic_metrics import label_by_route
from serving.lifecycle import (READINESS, StartupError, available_memory_mib, check_bentoml_config, check_grpc_port,
                               follow_http_host, check_http_port, forget_dead_workers,
                               http_address, load_settings, memory_warning, respawn_dead_workers,
                               warm_up_in_background)

logger = logging.getLogger("bentoml.pneumonia.lifecycle")
SERVICE_NAME = "pneumonia_classifier"  # BentoML's name for it: its configuration's `services.<name>` key


# ---------------------------------------------------------------- start-up: the model to serve, checked once


def resolve_model(ref: str, service_dir: Path) -> tuple[str, ModelCard]:
    """The tag to serve and its card, or a `StartupError` that says what to do (runs at import)."""
    try:
        tag = models_registry.resolve_service_tag(ref, service_dir)
        return tag, models_registry.read_card(tag)
    except RegistryError as exc:
        raise StartupError(f"cannot serve: {exc}") from None


def preflight(tag: str, engine: Engine = "eager") -> None:
    """Verify (sha256), load and run the model once, in the `bentoml serve` process before workers start.

    Why here: a failure in a worker is retried by circus forever; here it ends the
    server with one line and a non-zero exit code within seconds.
    """
    started = time.monotonic()
    try:
        model = models_registry.load_model(tag, engine=engine)
        size = model.card.preprocess.image_size
        probability = model.probabilities(np.zeros((1, size, size), dtype=np.uint8))
    except RegistryError as exc:  # ModelIntegrityError included: sha mismatch, unreadable or ill-fitting weights
        raise StartupError(f"cannot serve: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to run the model is equally fatal
        raise StartupError(f"cannot serve: model {tag} fails to run ({type(exc).__name__}: {exc})") from None
    if not np.all(np.isfinite(probability)):
        raise StartupError(f"cannot serve: model {tag} returns {probability.tolist()} for a blank image")
    logger.info("model %s verified and runs (%.1f s)", tag, time.monotonic() - started)

SETTINGS = load_settings()  # bad configuration stops `bentoml serve` here with one line
# A missing or unusable model stops `bentoml serve` here with one line (resolve_model above).
MODEL_TAG, CARD = resolve_model(SETTINGS.model, Path(__file__).resolve().parent)
if SETTINGS.batching.dispatcher == "eager":  # before BentoML builds the workers' apps (serving/batching.py)
    batching.install(SETTINGS.batching.slots)
# Uploads to classify are decoded on these threads, off the event loop (serving/http/decoding.py); None: on the loop.
DECODE_POOL = ThreadPoolExecutor(SETTINGS.decode_threads, thread_name_prefix="decode") if SETTINGS.decode_threads else None

def _reject(reason: str, message: str) -> PydanticCustomError:
    REJECTED.labels(reason=reason).inc()
    return PydanticCustomError(reason, message)


def _prepared(read: Callable[[], bytes], size: int, received: float, preview_side: int | None = None) -> PreparedImage:
    """One upload of `size` bytes -> the model's input grid, stamped with when it arrived; raises ImageRejected."""
    if size > SETTINGS.limits.max_bytes:
        raise ImageRejected("too_many_bytes", f"the file is {size:,} bytes, over the limit of {SETTINGS.limits.max_bytes:,} bytes")
    prepared = prepare(read(), CARD.preprocess, SETTINGS.limits, preview_side=preview_side)
    object.__setattr__(prepared, "received", received)
    return prepared


def _decoded(data: bytes, received: float) -> PreparedImage:
    """What the HTTP guard runs on its decode threads for each /classify upload (serving/http/decoding.py)."""
    return _prepared(lambda: data, len(data), received)


def _decoded_for_explain(data: bytes, received: float) -> PreparedImage:
    """The same for an /explain upload, which also keeps a picture of the image to draw the heatmap on."""
    return _prepared(lambda: data, len(data), received, PREVIEW_SIDE)


def _prepare_upload(value: object, to_path: ValidatorFunctionWrapHandler, preview_side: int | None = None) -> PreparedImage:
    """Runs while the request is parsed: decode, validate and preprocess one upload.

    Multipart uploads arrive as Starlette UploadFiles and are read from memory;
    only other inputs (e.g. a path from a Python caller) go through BentoML's
    own file handling, which writes every upload to a temporary file first.
    An upload the HTTP guard has already decoded on its threads (with
    `PNEUMONIA_DECODE_THREADS`) is taken from there (its result, or its refusal).
    """
    received = time.perf_counter()
    try:
        if isinstance(value, UploadFile):
            done = PREDECODED.get()  # set only for the route being parsed, by that route's decoder
            if done is not None and value.filename in done:
                outcome = done[value.filename]
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome
            size = value.size if value.size is not None else value.file.seek(0, 2)
            value.file.seek(0)
            return _prepared(value.file.read, size, received, preview_side)
        path: Path = to_path(value)
        return _prepared(path.read_bytes, path.stat().st_size, received, preview_side)
    except ImageRejected as exc:
        raise _reject(exc.reason, exc.message) from None


def _count_problem(count: int) -> tuple[str, str] | None:
    """(reason, message) when a request carries no images or too many, else None."""
    if count == 0:
        return "no_images", "send at least one image in the 'images' field"
    if count > SETTINGS.max_images_per_request:
        return "too_many_images", f"{count} images in one request; the limit is {SETTINGS.max_images_per_request}"
    return None


def _check_count(value: object) -> object:
    """Refuse over-long lists before any image in them is decoded."""
    if isinstance(value, list) and (problem := _count_problem(len(value))):
        raise _reject(*problem)
    return value


def prepare_images(images: Sequence[bytes]) -> list[PreparedImage]:
    """The checks `POST /classify` runs while parsing, for images that arrived another way (gRPC).

    Count first, then every image; raises `Refused` (400) with one detail per
    refused image, located as pydantic locates them (`["images", index]`).
    """
    if problem := _count_problem(len(images)):
        reason, message = problem
        REJECTED.labels(reason=reason).inc()
        raise Refused(400, message, [{"type": reason, "loc": ["images"], "msg": message}])
    prepared: list[PreparedImage] = []
    details: list[dict[str, Any]] = []
    for index, data in enumerate(images):
        try:
            prepared.append(_prepared(lambda data=data: data, len(data), time.perf_counter()))
        except ImageRejected as exc:
            REJECTED.labels(reason=exc.reason).inc()
            details.append({"type": exc.reason, "loc": ["images", index], "msg": exc.message})
    if details:
        raise Refused(400, refusal_summary(details), details)
    return prepared


T = TypeVar("T")
R = TypeVar("R")


async def off_loop(prepare: Callable[[T], R], uploads: T) -> R:
    """`prepare(uploads)` on a decode thread (the event loop keeps serving meanwhile), or here without decode threads."""
    if DECODE_POOL is None:
        return prepare(uploads)
    return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, prepare, uploads)


def prepare_explain_image(data: bytes) -> PreparedImage:
    """The checks `POST /explain` runs while parsing, for an image that arrived another way (gRPC).

    Raises `Refused` (400) located as pydantic locates it (`["image"]`).
    """
    try:
        return _prepared(lambda: data, len(data), time.perf_counter(), PREVIEW_SIDE)
    except ImageRejected as exc:
        REJECTED.labels(reason=exc.reason).inc()
        raise Refused(400, exc.message, [{"type": exc.reason, "loc": ["image"], "msg": exc.message}]) from None


Upload = Annotated[Path, WrapValidator(_prepare_upload)]
# An image to explain: also keeps the grey picture its heatmap is drawn on.
ExplainUpload = Annotated[Path, WrapValidator(lambda value, to_path: _prepare_upload(value, to_path, PREVIEW_SIDE))]
EXPLAIN_SLOTS = shared_slots(SETTINGS.explain)  # the HTTP guard takes them per /explain call, the gRPC servicer per Explain


def _batched(instance: object, api: str) -> Callable[[list[PreparedImage]], Awaitable[list[Prediction]]] | None:
    """The adaptive batcher of `api` that HTTP requests join, once BentoML has built this worker's app.

    BentoML keeps its dispatchers in the app factory, which the service instance
    reaches only through its self proxy's ASGI app: the factory's route for `api`
    is a partial of its bound endpoint. None until the app is started.
    """
    app = getattr(getattr(getattr(instance, "__self_proxy__", None), "to_async", None), "app", None)
    for route in getattr(getattr(app, "router", None), "routes", ()):
        endpoint = getattr(route, "endpoint", None)
        if getattr(route, "name", None) == api and isinstance(endpoint, functools.partial):
            factory = endpoint.func.__self__  # type: ignore[attr-defined]
            if api in factory.dispatchers:
                return lambda images: factory.batch_infer(api, (), {"images": images})
            local = getattr(instance, api).local  # batching off: one forward pass per call, on the API's thread
            return lambda images: factory._to_thread(local, images=images)
    return None


@bentoml.service(
    name=SERVICE_NAME,
    workers=SETTINGS.worker_count(),
    threads=SETTINGS.batching.slots,  # forward passes at a time per worker (1); torch uses the cores inside each
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    logging={"access": {"enabled": False}},  # replaced by the JSON request log (serving/request_log.py)
    **({} if SETTINGS.tracing else {"tracing": {"excluded_urls": [".*"]}}),  # spans only when asked for (settings.py)
)
class PneumoniaClassifier:
    """Loads the model once per worker, warms it up, then serves batched predictions."""

    stored_model = bentoml.models.BentoModel(MODEL_TAG)  # packs the model into the Bento

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.model: LoadedModel | None = None
        self.explainers: ExplainerPool | None = None
        torch.set_num_threads(SETTINGS.threads_per_worker())
        # In a thread, so the worker listens (and says 503) while the model loads and warms up; the explainers
        # (a few seconds: Captum's import, a traced copy per explain thread) follow once classify is ready.
        warm_up_in_background(self._load_and_warm, delay_s=SETTINGS.warmup_delay_s, then=self._load_explainers,
                              release_file=SETTINGS.warmup_release_file)

    def _load_and_warm(self) -> None:
        model = models_registry.load_model(MODEL_TAG, engine=SETTINGS.engine)
        size = model.card.preprocess.image_size
        for batch in (1, SETTINGS.batching.max_batch_size):  # allocate kernels and buffers before traffic
            model.probabilities(np.zeros((batch, size, size), dtype=np.uint8))
        self.model = model
        forget_dead_workers()  # a replacement for a killed worker: its gauges would count as live forever
        MODEL_INFO.labels(model=MODEL_TAG, arch=CARD.spec.arch, threshold=f"{CARD.threshold:.6f}").set(1)
        # warm_up_in_background marks this worker ready (serving.lifecycle.READINESS) once this returns.

    def _load_explainers(self) -> None:
        """Private model copies for /explain, one per explain thread (serving/explain.py); after readiness."""
        assert self.model is not None
        started = time.monotonic()
        try:
            self.explainers = ExplainerPool(self.model, SETTINGS.explain.max_concurrency)
        except Exception as exc:
            # The cause goes to the log only: its text may name paths and packages of the server.
            logger.error("explainers could not be built (%s: %s): /explain answers 503 explain_unavailable",
                         type(exc).__name__, exc)
            EXPLAIN_SLOTS.settle("explanations are unavailable in this server process: its explainers failed to "
                                 "load (the server's log says why); classification is not affected")
            raise
        EXPLAIN_SLOTS.settle()
        logger.info("explainers ready (%d) after %.2f s", SETTINGS.explain.max_concurrency, time.monotonic() - started)

    @bentoml.on_deployment
    def check_before_workers() -> None:
        """Once, in the `bentoml serve` process before any worker: a bad model, or a gRPC port that cannot be
        bound, exits 1 with one line. The port is then held by this process until it exits (only this server's
        workers can bind it), and workers that would not fit in memory get a warning."""
        respawn_dead_workers()  # before BentoML makes the worker watchers (in a container it would not respawn)
        check_bentoml_config(SERVICE_NAME, {
            "workers": (SETTINGS.worker_count(), "PNEUMONIA_WORKERS"),
            "threads": (SETTINGS.batching.slots, "PNEUMONIA_BATCHING__SLOTS"),
            "traffic.timeout": (SETTINGS.timeout_s, "PNEUMONIA_TIMEOUT_S"),
            "traffic.max_concurrency": (SETTINGS.max_concurrency, "PNEUMONIA_MAX_CONCURRENCY"),
        })
        preflight(MODEL_TAG, SETTINGS.engine)
        http_host, http_port = http_address()
        check_http_port(http_host, http_port)
        if SETTINGS.grpc.enabled:
            follow_http_host(SETTINGS.grpc, http_host)
            check_grpc_port(SETTINGS.grpc, http_host, http_port)
        if warning := memory_warning(SETTINGS.worker_count(), available_memory_mib()):
            logger.warning(warning)
        if not SETTINGS.security.keys():
            logger.warning("no API keys configured (PNEUMONIA_SECURITY__API_KEYS or "
                           "PNEUMONIA_SECURITY__API_KEYS_FILE): the service is open to anyone who can reach it")

    def __is_ready__(self) -> bool:
        return READINESS.ready

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """The gRPC endpoint of this worker, on its own port and this event loop (serving/grpc/server.py)."""
        self.grpc = grpc_server.WorkerGrpc(self, SETTINGS) if SETTINGS.grpc.enabled else None
        if self.grpc is not None:
            await self.grpc.start()

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
        """Classify one or more chest X-rays (multipart field `images`: DICOM, JPEG, PNG, TIFF, ..., any size)."""
        prepared: list[PreparedImage] = images  # type: ignore[assignment]  # validators turned paths into images
        if self.model is None:  # the guard's readiness wait normally answers before a request gets here
            raise ServiceUnavailable("the model is still loading on this server; retry shortly")
        assessments = self.model.assess(np.stack([p.pixels for p in prepared]))
        BATCH_IMAGES.observe(len(prepared))
        done = time.perf_counter()
        return [answer(item, assessment, self.model.card, MODEL_TAG, SETTINGS.validity.mode, len(prepared), done)
                for item, assessment in zip(prepared, assessments)]

    @bentoml.api(route="/explain")
    async def explain(self, image: ExplainUpload) -> Explanation:
        """Explain one chest X-ray (multipart field `image`): the prediction `classify` gives it, plus a Grad-CAM
        heatmap of the evidence for the predicted label (none when the image is refused). For review only: a
        saliency map is not a localisation. At most a few at a time per server (503 with Retry-After beyond)."""
        return await self.explain_prepared(image)  # type: ignore[arg-type]  # the validator made it a PreparedImage

    @bentoml.api(route="/health")
    def health(self) -> ModelInfo:
        """Readiness, the served model with its validation metrics, and the serving configuration."""
        return self.model_info()

    # What the gRPC endpoint (serving/grpc/servicer.py) calls: the same checks, batches and answers as HTTP.

    def is_serving(self) -> bool:
        """Model warm, and the adaptive batcher of `classify` in place (BentoML builds it after start-up hooks)."""
        return READINESS.ready and _batched(self, "classify") is not None

    async def prepare_images(self, images: Sequence[bytes]) -> list[PreparedImage]:
        """`prepare_images` of this module: the checks and preprocessing of `POST /classify`, on a decode thread."""
        return await off_loop(prepare_images, images)

    async def classify_prepared(self, images: list[PreparedImage]) -> list[Prediction]:
        """Classify validated images in the adaptive batches that HTTP requests join."""
        run = _batched(self, "classify")
        if run is None:
            raise ServiceUnavailable("the model is still loading on this server; retry shortly")
        return await run(images)

    async def prepare_explain_image(self, data: bytes) -> PreparedImage:
        """`prepare_explain_image` of this module: the checks and preprocessing of `POST /explain`, on a decode thread."""
        return await off_loop(prepare_explain_image, data)

    async def explain_prepared(self, image: PreparedImage) -> Explanation:
        """The explanation of one validated image, on an explain thread (the caller holds an explain slot)."""
        await EXPLAIN_SLOTS.wait_available(SETTINGS.ready_wait_s)  # ExplainUnavailable: the guard and servicer say it
        pool = self.explainers
        assert pool is not None  # settled without a problem: built
        return await EXPLAIN_SLOTS.run(lambda: pool.explain(image, SETTINGS.validity.mode))

    def model_info(self) -> ModelInfo:
        """The `/health` answer, computed in this worker."""
        card = CARD  # the served model's card, known before its weights are loaded
        return ModelInfo(
            ready=READINESS.ready,
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
            engine=SETTINGS.engine,
            validity={"mode": SETTINGS.validity.mode, "fitted": card.validity is not None,
                      **({"blank_limit": card.validity.blank_std_limit, "outlier_limit": card.validity.outlier_limit,
                          "upright_limit": card.validity.orientation_limit, "partial_limit": card.validity.partial_limit,
                          "level_share_limit": card.validity.level_share_limit} if card.validity else {})},
            site_calibration=_site_summary(card.site_calibration),
        )


def _site_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A site calibration as `/health` shows it: the store's record less the folder it was read from on the
    calibrating machine (a path of another host says nothing to a caller, and may name a site's share)."""
    return None if record is None else {key: value for key, value in record.items() if key != "data_dir"}


# BentoML otherwise derives each response's media type from a freshly generated JSON schema (measured:
# 13% of the event loop's time under load); both APIs answer JSON.
for _api in PneumoniaClassifier.apis.values():
    _api.output_spec.media_type = "application/json"


def _cached_local_call(method: APIMethod, instance: object) -> Callable[..., Any]:
    """BentoML's `APIMethod._local_call`, built once per API and service instance instead of on every access.

    BentoML rebuilds an API's caller, with `inspect.signature` of its function, each time the API is read from
    the service instance: at least twice per request, a visible share of a worker's event loop under load
    (scripts/profile_service.py).
    """
    calls = instance.__dict__.setdefault("_pneumonia_local_calls", {})
    if method.name not in calls:
        calls[method.name] = _bentoml_local_call(method, instance)
    return calls[method.name]


_bentoml_local_call = APIMethod._local_call
APIMethod._local_call = _cached_local_call  # type: ignore[method-assign]

# Request id, security headers, CORS, API keys, rate limit, body and multipart checks, and the readiness wait of
# model routes (a warming worker holds them briefly, then answers 503).
PneumoniaClassifier.add_asgi_middleware(HttpGuard, settings=SETTINGS, upload_routes={"/classify": "images", "/explain": "image"},
                                        explain_slots={"/explain": EXPLAIN_SLOTS}, decoders={"/classify": _decoded, "/explain": _decoded_for_explain},
                                        decode_pool=DECODE_POOL, openapi=lambda: PneumoniaClassifier.openapi_spec.asdict())
# The web page (serving/ui/): static files, no build step, nothing fetched from elsewhere.
PneumoniaClassifier.mount_asgi_app(ui.app, path=ui.PATH, name="ui")
# BentoML's request metrics carry the route, not the raw path: a scanner's URLs cannot grow /metrics without bound.
label_by_route([method.route for method in PneumoniaClassifier.apis.values()])
