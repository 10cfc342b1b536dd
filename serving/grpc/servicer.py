"""`pneumonia.v1.Classifier`, answered by the service instance of this worker (service.py).

A `Classify` call is not a second inference path. Its image bytes go through
the checks and preprocessing of `POST /classify` (`prepare_images`, the same
code, under the same limits) and join the same adaptive batches as HTTP calls
(`classify_prepared`): a gRPC call and an HTTP call that arrive together share
one forward pass. Refusals map to gRPC status codes with api.status; every call
that reaches the checks writes one request-log line (transport `grpc`), and its
request id comes back as trailing metadata.

The client's deadline bounds the call: when it expires gRPC cancels the
handler, which abandons its place in the batch (a batch already running finishes).

`Explain` runs the checks of `POST /explain` (`prepare_explain_image`) and the
same explanation (`explain_prepared`), under the same explain slots as HTTP calls
(serving/explain.py): a call that finds none free ends UNAVAILABLE at once, with
a `retry-after` trailer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from bentoml.exceptions import BentoMLException

from api.grpc import explanation_message, model_info_message, pb, pb_grpc, prediction_message
from api.models import Explanation, ModelInfo, Prediction, Refused
from api.status import REASONS_METADATA_KEY, REQUEST_ID_HEADER, RETRY_AFTER_HEADER, grpc_code_name
from core.preprocess import PreparedImage
from serving import request_log
from serving.explain import shared_slots
from serving.grpc.interceptors import AUTH, ROUTES, first_values, log_call
from serving.lifecycle import NotReady, WorkerRefused
from serving.request_log import printable
from settings import ServingSettings

logger = logging.getLogger("pneumonia.grpc")

T = TypeVar("T")


class Classifier(Protocol):
    """What the servicer needs from the service instance (service.PneumoniaClassifier)."""

    def is_serving(self) -> bool: ...
    async def prepare_images(self, images: Sequence[bytes]) -> list[PreparedImage]: ...
    async def classify_prepared(self, images: list[PreparedImage]) -> list[Prediction]: ...
    async def prepare_explain_image(self, data: bytes) -> PreparedImage: ...
    async def explain_prepared(self, image: PreparedImage) -> Explanation: ...
    def model_info(self) -> ModelInfo: ...


def describe_refusal(refused: Refused, images: Sequence[Any]) -> str:
    """One message naming each refused image, e.g. 'image 1 (thumb.png): the image is 8x8 pixels; ...'."""
    parts = []
    for detail in refused.details:
        index = next((p for p in detail.get("loc") or [] if isinstance(p, int)), None)
        message = str(detail.get("msg", detail.get("type", "invalid")))
        if index is not None and 0 <= index < len(images):
            # as the log keeps it: a 20,000-character name pushed the status over gRPC's metadata limit
            name = printable(images[index].filename) if images[index].HasField("filename") else ""
            parts.append(f"image {index}" + (f" ({name})" if name else "") + f": {message}")
        else:
            parts.append(message)
    return "; ".join(parts) or refused.message


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """`pneumonia.v1.Classifier` of one worker."""

    def __init__(self, service: Classifier, settings: ServingSettings) -> None:
        self.service = service
        self.settings = settings
        request_log.configure(settings.request_log)  # the access interceptor's lines and ours

    async def _wait_ready(self) -> None:
        """Wait up to `ready_wait_s` for this worker's model, as an HTTP call does; then `NotReady` (it answered at
        once, without reason, retry-after or log line)."""
        deadline = time.monotonic() + self.settings.ready_wait_s
        while not self.service.is_serving():
            if time.monotonic() >= deadline:
                raise NotReady()
            await asyncio.sleep(0.05)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        images = list(request.images)

        async def work() -> list[Prediction]:
            await self._wait_ready()
            prepared = await self.service.prepare_images([image.data for image in images])
            return await asyncio.wait_for(self.service.classify_prepared(prepared), self.settings.timeout_s)

        predictions = await self._answer(context, ROUTES["Classify"], images, work, "classify the images")
        return pb.ClassifyResponse(predictions=[prediction_message(p, image) for p, image in zip(predictions, images)])

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        image = request.image
        slots = shared_slots(self.settings.explain)

        async def work() -> Explanation:
            if not request.HasField("image"):  # refused as HTTP's /explain without its file: logged, with an id
                message = "send the image to explain in 'image'"
                raise Refused(400, message, [{"type": "missing", "loc": ["image"], "msg": message}])
            await self._wait_ready()
            slots.acquire()  # ExplainBusy when every slot of this worker is taken: before the image is decoded
            try:
                prepared = await self.service.prepare_explain_image(image.data)
                return await asyncio.wait_for(self.service.explain_prepared(prepared), self.settings.timeout_s)
            finally:
                slots.release()

        explanation = await self._answer(context, ROUTES["Explain"], [image] if request.HasField("image") else [],
                                         work, "explain the image")
        return explanation_message(explanation, image)

    async def _answer(self, context: grpc.aio.ServicerContext, route: str, images: Sequence[Any],
                      work: Callable[[], Awaitable[T]], doing: str) -> T:
        """Run `work`, map its failure to a gRPC status, write the request-log line, set the trailing metadata."""
        started = time.perf_counter()
        metadata = first_values(context.invocation_metadata())
        supplied = metadata.get(REQUEST_ID_HEADER)
        request_id = request_log.request_id(str(supplied) if supplied is not None else None, self.settings.request_log)
        trailing: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, request_id),)
        status, reasons = 499, []  # 499 until known: the caller went away first (deadline, cancellation)
        failure: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None
        result: Any = None
        try:
            result = await work()
            status = 200
        except Refused as refused:
            status, reasons = refused.status, refused.reasons
            code = grpc.StatusCode[grpc_code_name(refused.status, refused.reasons)]
            failure = code, describe_refusal(refused, images), (*trailing, (REASONS_METADATA_KEY, ",".join(reasons)))
        except WorkerRefused as refused:  # not ready (NotReady), or an explain call busy, loading or broken
            status, reasons = 503, [refused.reason]
            wait = () if refused.retry_after_s is None else ((RETRY_AFTER_HEADER, str(refused.retry_after_s)),)
            failure = (grpc.StatusCode.UNAVAILABLE, refused.message,
                       (*trailing, (REASONS_METADATA_KEY, refused.reason), *wait))
        except TimeoutError:
            status = 504
            message = f"not able to {doing} in {self.settings.timeout_s} seconds"
            failure = grpc.StatusCode.DEADLINE_EXCEEDED, message, trailing
        except BentoMLException as exc:  # e.g. ServiceUnavailable: the batcher sheds load it cannot serve in time
            status = int(exc.error_code.value)
            failure = grpc.StatusCode[grpc_code_name(status)], f"{exc} (HTTP {status})", trailing
        except Exception:  # noqa: BLE001 - answered INTERNAL, with the trace in the server log
            status = 500
            logger.exception("%s failed", route)
            failure = grpc.StatusCode.INTERNAL, "an unexpected error has occurred, please check the server log", trailing
        finally:
            self._log(request_id, started, route, images, status, reasons, context, metadata)
        if failure is not None:
            await context.abort(*failure[:2], trailing_metadata=failure[2])
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # finished, but the caller has given up: say so, send nothing
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed while the server was working to {doing}")
        context.set_trailing_metadata(trailing)
        return result

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Answered while the model loads too, with `ready` false, as HTTP's /health is (it was UNAVAILABLE)."""
        return model_info_message(self.service.model_info(), self.settings.max_request_bytes)

    def _log(self, request_id: str, started: float, route: str, images: Sequence[Any], status: int,
             reasons: list[str], context: grpc.aio.ServicerContext, metadata: dict[str, Any]) -> None:
        """The request-log line of one call, with the fields of an HTTP request's line."""
        log_call(self.settings.request_log, request_id, started, route, list(images), status, reasons, context,
                 metadata, AUTH.get())
