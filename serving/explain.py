"""Explanations, served beside `classify` without getting in its way.

`POST /explain` (service.py) and the Explain RPC (serving/grpc/servicer.py) answer one
image with the prediction `classify` gives plus a Grad-CAM heatmap (core/explain.py).
A heatmap needs a forward and a backward pass with gradients, so explanations never
join the adaptive batches: each worker process has

- `ExplainSlots`: admission. At most `max_concurrency + max_waiting` explanations in
  the process; the HTTP guard and the gRPC servicer take a slot before any image is
  decoded and refuse a call that finds none at once (503 / UNAVAILABLE with
  Retry-After), so a burst is shed instead of queued;
- a thread pool of `max_concurrency` threads, not the one thread that runs the
  classify batches, so the event loop keeps decoding uploads and classify's batches
  keep running while an explanation computes. The threads run at a lower CPU
  priority (`nice`, Linux): when explanations and classify want the same cores,
  the scheduler gives classify most of them;
- `ExplainerPool`: one private model copy (`core.explain.Explainer`) per thread, so
  Captum's hooks and gradients never touch a module another thread is running.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import bentoml
import numpy as np

from api.models import SALIENCY_CAVEAT, Explanation, Heatmap
from core.explain import GRID_SIZE, METHOD, OVERLAY_MAX_SIDE, Explainer
from core.inference import LoadedModel
from core.preprocess import PreparedImage
from serving.answers import answer
from serving.lifecycle import WorkerRefused
from settings import ExplainSettings

T = TypeVar("T")

EXPLANATIONS = bentoml.metrics.Counter(
    name="pneumonia_explanations_total",
    documentation="Explain calls by outcome: heatmap (answered with one), refused (the image was refused, no heatmap), "
    "busy (turned away: every explain slot of the worker taken)",
    labelnames=["outcome"],
)
EXPLAIN_SECONDS = bentoml.metrics.Histogram(
    name="pneumonia_explain_seconds",
    documentation="Time an explanation took on its thread (prediction, Grad-CAM and drawing), without waiting",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

PREVIEW_SIDE = OVERLAY_MAX_SIDE  # what `prepare` keeps of an image to explain: the picture the heatmap is drawn on


class ExplainRefused(WorkerRefused):
    """An explain call this worker turns away with 503 (busy, loading or broken), before its image is decoded."""


class ExplainBusy(ExplainRefused):
    """Every explain slot of this worker is taken: retry after `retry_after_s`."""

    def __init__(self, settings: ExplainSettings) -> None:
        super().__init__(
            f"the server is already computing as many explanations as it allows ({settings.max_concurrency} at once, "
            f"{settings.max_waiting} waiting, per server process); retry after {settings.retry_after_s} s "
            "(classification is not affected)", "explain_busy", settings.retry_after_s)


class ExplainUnavailable(ExplainRefused):
    """This worker cannot explain: its explainers are still being built (`not_ready`, retry after a few seconds) or
    failed to build (`explain_unavailable`: no Retry-After; it will not recover, though another worker may answer)."""


class ExplainSlots:
    """Admission and threads of one worker's explanations (see the module docstring)."""

    def __init__(self, settings: ExplainSettings) -> None:
        self.settings = settings
        self.capacity = settings.max_concurrency + settings.max_waiting
        self.in_use = 0
        self.problem: str | None = None  # why this worker's explainers could not be built
        self._settled = threading.Event()  # built, or failed to build
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="explain",
                                            initializer=_lower_priority, initargs=(settings.nice,))

    def acquire(self) -> None:
        """Take a slot, or raise `ExplainBusy` (counted) when none is free."""
        with self._lock:
            if self.in_use >= self.capacity:
                EXPLANATIONS.labels(outcome="busy").inc()
                raise ExplainBusy(self.settings)
            self.in_use += 1

    def release(self) -> None:
        with self._lock:
            self.in_use = max(0, self.in_use - 1)

    def settle(self, problem: str | None = None) -> None:
        """The explainers are built (`problem` None) or cannot be (`problem` says why): called once per worker."""
        self.problem = problem
        self._settled.set()

    async def wait_available(self, wait_s: float) -> None:
        """Return once the explainers are built; a worker that just became ready builds them for a few seconds, so
        wait up to `wait_s` for that. Raise `ExplainUnavailable` when they failed, or are still being built then."""
        deadline = time.monotonic() + wait_s
        while not self._settled.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.problem is not None:
            raise ExplainUnavailable(self.problem, "explain_unavailable", None)
        if not self._settled.is_set():
            raise ExplainUnavailable("explanations are still loading on this server; retry shortly", "not_ready",
                                     self.settings.retry_after_s)

    async def run(self, work: Callable[[], T]) -> T:
        """Run `work` on one of the explain threads (never the classify batch thread, never the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)


def _lower_priority(steps: int) -> None:
    """Raise this thread's nice value by `steps` (Linux schedules threads one by one; lowering needs no privilege)."""
    if not steps or not hasattr(os, "setpriority"):
        return
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + steps))
    except OSError:  # not permitted in this sandbox: run at the same priority
        pass


_SLOTS: dict[int, ExplainSlots] = {}
_SLOTS_LOCK = threading.Lock()


def shared_slots(settings: ExplainSettings) -> ExplainSlots:
    """The one `ExplainSlots` of this process for these settings: HTTP and gRPC calls share its slots."""
    with _SLOTS_LOCK:
        slots = _SLOTS.get(id(settings))
        if slots is None or slots.settings is not settings:
            slots = _SLOTS[id(settings)] = ExplainSlots(settings)
        return slots


class ExplainerPool:
    """`count` private copies of the served model, one per explain thread; built once per worker at warm-up."""

    def __init__(self, model: LoadedModel, count: int) -> None:
        self.tag = model.tag
        self.card = model.card
        self._free: queue.SimpleQueue[Explainer] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(Explainer(model))
        size = model.card.preprocess.image_size
        blank = np.zeros((size, size), dtype=np.uint8)
        explainer = self._free.get()
        try:  # allocate the backward pass's kernels and buffers before the first call
            explainer.heatmap(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8),
                              self.card.class_names[1], blank)
        finally:
            self._free.put(explainer)

    def explain(self, item: PreparedImage, mode: Literal["refuse", "warn", "off"]) -> Explanation:
        """The prediction `classify` gives for `item`, and its heatmap unless the image is refused (blocking)."""
        started = time.perf_counter()
        explainer = self._free.get()
        try:
            assessment = explainer.assess(item.pixels)
            prediction = answer(item, assessment, self.card, self.tag, mode, batch_size=1, counted=False)
            if prediction.status == "refused" or prediction.label is None:
                EXPLANATIONS.labels(outcome="refused").inc()
                reason = prediction.refusal.reason if prediction.refusal else "refused"
                note = (f"No heatmap: the image was refused ({reason}), so there is no verdict to explain. "
                        + SALIENCY_CAVEAT)
                return Explanation(prediction=prediction, heatmap=None, note=note)
            picture = item.preview if item.preview is not None else item.pixels
            heatmap = explainer.heatmap(item.pixels, prediction.label, picture)
        finally:
            self._free.put(explainer)
        EXPLANATIONS.labels(outcome="heatmap").inc()
        EXPLAIN_SECONDS.observe(time.perf_counter() - started)
        note = (f"Grad-CAM heatmap of the evidence for {heatmap.target} in the model's last convolutional stage "
                f"({heatmap.layer}), {GRID_SIZE}x{GRID_SIZE} over the whole image. " + SALIENCY_CAVEAT)
        # processing_ms counts from the upload parsed to the heatmap drawn, like classify's (queueing included)
        prediction = prediction.model_copy(
            update={"processing_ms": round((time.perf_counter() - getattr(item, "received", started)) * 1000, 2)})
        return Explanation(
            prediction=prediction,
            heatmap=Heatmap(method=METHOD, target=heatmap.target, layer=heatmap.layer,
                            grid=np.round(heatmap.grid.astype(np.float64), 4).tolist(),
                            overlay_png=heatmap.overlay_png, image_png=heatmap.image_png,
                            width=heatmap.width, height=heatmap.height),
            note=note,
        )
