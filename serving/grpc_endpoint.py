"""The gRPC endpoint: `pneumonia.v1.Classifier`, health checking and reflection, inside every BentoML worker.

BentoML 1.4's service API cannot serve gRPC itself, so each worker starts a
`grpc.aio` server on its own event loop from the service's `@bentoml.on_startup`
hook (service.py) and binds `PNEUMONIA_GRPC__PORT` with SO_REUSEPORT, which lets
all workers share the port the way they share the HTTP socket.

A `Classify` call is not a second inference path. The handler forwards the
image bytes, in process, to the service's own batchable `/classify` API through
the worker's ASGI app (the one BentoML wires into every service instance as the
`app` of its self proxy, `self.to_async`), with an httpx ASGI transport: no
socket, no second model. So gRPC and HTTP requests are validated by the
same code, under the same limits, and join the same adaptive batches: a gRPC
call and an HTTP call that arrive together share one forward pass. The HTTP
answer is then mapped to protobuf messages or to a gRPC status:

    400 invalid image / no images          -> INVALID_ARGUMENT
    400 too many bytes / pixels / images   -> RESOURCE_EXHAUSTED
    413, 429                               -> RESOURCE_EXHAUSTED
    401 / 403                              -> UNAUTHENTICATED / PERMISSION_DENIED
    503 (overloaded, not ready)            -> UNAVAILABLE
    504                                    -> DEADLINE_EXCEEDED
    anything else                          -> INTERNAL

The client's deadline bounds the call: when it expires gRPC cancels the
handler, which abandons the in-process request (its batch may still run).
Interceptors (metrics now; authentication and rate limits later) are built in
one place, `build_interceptors`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import bentoml
import grpc
import httpx
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.grpc_access import classifier_access
from serving.security import internal_headers
from settings import ServingSettings

try:
    from client._proto.pneumonia.v1 import classifier_pb2 as pb
    from client._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - a checkout that skipped ./dev.sh setup
    raise ImportError(
        f"the generated gRPC stubs are missing ({exc}); run `./dev.sh setup` or `python scripts/gen_proto.py`"
    ) from exc

logger = logging.getLogger("pneumonia.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "pneumonia.v1.Classifier"

# Rejection reasons (training/preprocess.py, service.py) that are size limits rather than bad input.
LIMIT_REASONS = frozenset({"too_many_bytes", "too_many_pixels", "too_many_images"})
# gRPC metadata passed on to the in-process HTTP request (so HTTP-side checks see the caller's
# credentials and request id), and HTTP response headers handed back as trailing metadata.
FORWARDED_METADATA = ("authorization", "x-api-key", "x-request-id")
RETURNED_HEADERS = ("x-request-id",)
REASONS_KEY = "pneumonia-reject-reasons"

HANDLED = bentoml.metrics.Counter(
    name="pneumonia_grpc_server_handled_total",
    documentation="gRPC calls completed, by service, method and status code",
    labelnames=["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = bentoml.metrics.Histogram(
    name="pneumonia_grpc_server_handling_seconds",
    documentation="gRPC call latency in the server, by service and method",
    labelnames=["grpc_service", "grpc_method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

_HTTP_TO_GRPC = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# --------------------------------------------------------------------------- interceptors


def _split_method(full_method: str) -> tuple[str, str]:
    """'/pneumonia.v1.Classifier/Classify' -> ('pneumonia.v1.Classifier', 'Classify')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or full_method


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method and final status code and records its latency, for /metrics."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)

        def record(started: float, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
            HANDLED.labels(grpc_service=service, grpc_method=method, grpc_code=_final_code(context, exc).name).inc()
            HANDLING_SECONDS.labels(grpc_service=service, grpc_method=method).observe(time.perf_counter() - started)

        def wrap_unary_response(behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, error = time.perf_counter(), None
                try:
                    result = behaviour(request, context)
                    return await result if inspect.isawaitable(result) else result
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    record(started, context, error)

            return wrapped

        def wrap_stream_response(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behaviour):

                async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    started, error = time.perf_counter(), None
                    try:
                        async for item in behaviour(request, context):
                            yield item
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        record(started, context, error)

                return generator
            return wrap_unary_response(behaviour)  # a coroutine that streams with context.write()

        kinds = {
            "unary_unary": (grpc.unary_unary_rpc_method_handler, wrap_unary_response),
            "stream_unary": (grpc.stream_unary_rpc_method_handler, wrap_unary_response),
            "unary_stream": (grpc.unary_stream_rpc_method_handler, wrap_stream_response),
            "stream_stream": (grpc.stream_stream_rpc_method_handler, wrap_stream_response),
        }
        for kind, (make_handler, wrap) in kinds.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make_handler(
                    wrap(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


def build_interceptors(settings: ServingSettings) -> list[grpc.aio.ServerInterceptor]:
    """Every interceptor of the gRPC server, outermost first; add authentication / rate limits here."""
    return [MetricsInterceptor(), classifier_access(settings.security, SERVICE_NAME)]


# --------------------------------------------------------------------------- the Classifier service


def _service_app(service: Any) -> Any:
    """The worker's ASGI app, which BentoML hands the instance (after the start-up hooks) as its self proxy's `app`."""
    return getattr(getattr(getattr(service, "__self_proxy__", None), "to_async", None), "app", None)


def _is_ready(service: Any) -> bool:
    """Model warm and the in-process route to the batched API in place."""
    return bool(getattr(service, "ready", False)) and _service_app(service) is not None


def _prediction(item: dict[str, Any], image: pb.Image) -> pb.Prediction:
    info = item["image"]
    message = pb.Prediction(
        label=item["label"],
        probability=item["probability"],
        threshold=item["threshold"],
        confidence=item["confidence"],
        model=item["model"],
        image=pb.ImageInfo(width=info["width"], height=info["height"], mode=info["mode"], format=info["format"]),
        warnings=item.get("warnings", []),
        processing_ms=item["processing_ms"],
        batch_size=item["batch_size"],
    )
    if image.HasField("filename"):
        message.filename = image.filename
    if image.HasField("client_id"):
        message.client_id = image.client_id
    return message


def _describe_rejection(body: Any, images: Sequence[pb.Image]) -> tuple[grpc.StatusCode, str, list[str]]:
    """A 400 body from BentoML's validation -> (status, message naming each bad image, reasons)."""
    details = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(details, list) or not details:
        return grpc.StatusCode.INVALID_ARGUMENT, str(body.get("error") if isinstance(body, dict) else body), []
    parts, reasons = [], []
    for detail in details:
        reason = str(detail.get("type", "invalid"))
        reasons.append(reason)
        loc = detail.get("loc") or []
        index = next((p for p in loc if isinstance(p, int)), None)
        if index is not None and 0 <= index < len(images):
            name = images[index].filename if images[index].HasField("filename") else ""
            where = f"image {index}" + (f" ({name})" if name else "")
            parts.append(f"{where}: {detail.get('msg', reason)}")
        else:
            parts.append(str(detail.get("msg", reason)))
    first = reasons[0]
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if first in LIMIT_REASONS else grpc.StatusCode.INVALID_ARGUMENT
    return code, "; ".join(parts), reasons


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """`pneumonia.v1.Classifier`, answered by the service instance of this worker."""

    def __init__(self, service: Any, settings: ServingSettings, classify_route: str) -> None:
        self.service = service
        self.settings = settings
        self.classify_route = classify_route
        self._http: httpx.AsyncClient | None = None

    def _in_process(self) -> httpx.AsyncClient:
        """An HTTP client wired straight into this worker's ASGI app: no socket, same middleware and batcher."""
        if self._http is None:
            transport = httpx.ASGITransport(app=_service_app(self.service))
            self._http = httpx.AsyncClient(transport=transport, base_url="http://in-process.grpc", timeout=None)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if not _is_ready(self.service):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        await self._require_ready(context)
        images = list(request.images)
        if not images:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send at least one image in 'images'")
        incoming = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        headers = {key: str(incoming[key]) for key in FORWARDED_METADATA if key in incoming}
        headers.update(internal_headers())  # checked by the access interceptor: not again over HTTP
        # Positional names: the caller's filename is echoed back, never used as a path by the server.
        files = [("images", (f"image-{i}", image.data, "application/octet-stream")) for i, image in enumerate(images)]
        try:
            response = await self._in_process().post(self.classify_route, files=files, headers=headers)
        except httpx.HTTPError as exc:
            logger.exception("in-process /classify call failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"the classifier could not be reached in process: {exc}")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # finished, but the caller has given up: say so, send nothing
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while the images were classified")
        trailing = [(name, response.headers[name]) for name in RETURNED_HEADERS if name in response.headers]
        body = _json_or_text(response)
        if response.status_code == 200:
            context.set_trailing_metadata(trailing)
            return pb.ClassifyResponse(predictions=[_prediction(item, image) for item, image in zip(body, images)])
        if response.status_code == 400:
            code, message, reasons = _describe_rejection(body, images)
            await context.abort(code, message, trailing_metadata=(*trailing, (REASONS_KEY, ",".join(reasons))))
        code = _HTTP_TO_GRPC.get(response.status_code, grpc.StatusCode.INTERNAL)
        if isinstance(body, list) and body and isinstance(body[0], dict):  # BentoML wraps some errors in a list
            body = body[0]
        error = body.get("error") if isinstance(body, dict) else body
        await context.abort(code, f"{error or 'error'} (HTTP {response.status_code})", trailing_metadata=tuple(trailing))
        raise AssertionError("unreachable")  # abort() raises

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self._require_ready(context)
        info = self.service.health.local()  # the HTTP /health answer, computed locally
        metrics = struct_pb2.Struct()
        metrics.update(info.validation_metrics)
        limits = info.limits
        return pb.ModelInfo(
            ready=info.ready,
            model=info.model,
            arch=info.arch,
            threshold=info.threshold,
            temperature=info.temperature,
            target_sensitivity=info.target_sensitivity,
            validation_metrics=metrics,
            preprocess=pb.Preprocess(**{k: info.preprocess[k] for k in ("image_size", "normalization", "mean", "std")}),
            uptime_s=info.uptime_s,
            workers=info.workers,
            torch_threads=info.torch_threads,
            batching=pb.Batching(**{k: info.batching[k] for k in ("enabled", "max_batch_size", "max_latency_ms")}),
            limits=pb.Limits(
                max_bytes=limits["max_bytes"],
                max_pixels=limits["max_pixels"],
                min_side=limits["min_side"],
                max_images_per_request=limits["max_images_per_request"],
                max_message_bytes=self.settings.max_request_bytes,
            ),
        )


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


# --------------------------------------------------------------------------- server life cycle


@dataclass
class GrpcEndpoint:
    """A started gRPC server of one worker and the task that keeps its health status current."""

    server: grpc.aio.Server
    servicer: ClassifierServicer
    health: health.aio.HealthServicer
    address: str
    settings: ServingSettings
    _watcher: asyncio.Task | None = field(default=None, repr=False)

    async def watch_readiness(self, service: Any) -> None:
        """NOT_SERVING until the model is warm and the batched API reachable, then SERVING (re-checked every second)."""
        current = None
        while True:
            status = health_pb2.HealthCheckResponse.SERVING if _is_ready(service) else health_pb2.HealthCheckResponse.NOT_SERVING
            if status != current:
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                logger.info("gRPC %s on %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status), self.address)
                current = status
            await asyncio.sleep(1.0 if status == health_pb2.HealthCheckResponse.SERVING else 0.02)

    async def stop(self) -> None:
        """NOT_SERVING first (load balancers drain), then let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
        await self.server.stop(self.settings.grpc.shutdown_grace_s)
        await self.servicer.close()
        logger.info("gRPC server on %s stopped", self.address)


async def start(service: Any, settings: ServingSettings, classify_route: str = "/classify") -> GrpcEndpoint:
    """Bind and start the gRPC server on the running event loop of this worker."""
    options = [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.so_reuseport", 1),  # all workers of this server share the port
    ]
    server = grpc.aio.server(
        interceptors=build_interceptors(settings),
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrency,
    )
    servicer = ClassifierServicer(service, settings, classify_route)
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):  # the servicer starts out SERVING for ""; not before the model is
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    host = settings.grpc.host
    address = f"[{host}]:{settings.grpc.port}" if ":" in host and not host.startswith("[") else f"{host}:{settings.grpc.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot bind the gRPC port {address} ({exc}); set PNEUMONIA_GRPC__PORT to a free port "
            "or PNEUMONIA_GRPC__ENABLED=false"
        ) from None
    await server.start()
    endpoint = GrpcEndpoint(server=server, servicer=servicer, health=health_servicer, address=address, settings=settings)
    endpoint._watcher = asyncio.create_task(endpoint.watch_readiness(service), name="grpc-readiness")
    logger.info("gRPC server listening on %s", address)
    return endpoint
