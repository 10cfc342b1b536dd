"""The interceptors of the gRPC server, outermost first (`build_interceptors`): metrics, admission, access, parsing.

Metrics: every call counted by method and final status code, and its latency,
for /metrics. Admission: at most PNEUMONIA_MAX_CONCURRENCY calls per worker once
their message has arrived, open streams (health Watch) in a smaller pool of their
own, health checks never counted. Access: API keys and rate limits, the same `AccessPolicy` as HTTP
(serving/security.py). The key comes from metadata `x-api-key: KEY` or
`authorization: Bearer KEY`; the client is the peer address when no valid key
names it. A refused call ends with UNAUTHENTICATED (one message whatever was
wrong) or RESOURCE_EXHAUSTED with a `retry-after` trailer in seconds. Health
checks and reflection stay open and unthrottled, like /livez, /readyz and the docs page. Parsing: a request
body that is not a valid protobuf message ends the call with INVALID_ARGUMENT, counted and after the access
checks, instead of grpcio's UNKNOWN (which names the decoder's exception class) and a traceback in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import bentoml
import grpc

from api.status import API_KEY_HEADER, REASONS_METADATA_KEY, REQUEST_ID_HEADER, RETRY_AFTER_HEADER
from serving import request_log
from serving.security import GRPC_UNAUTHENTICATED_MESSAGE, AccessPolicy, presented_key, shared_policy
from settings import RequestLogSettings, SecuritySettings, ServingSettings

HANDLED = bentoml.metrics.Counter(
    name="pneumonia_grpc_server_handled_total",
    documentation="gRPC calls completed, by service, method and status code",
    labelnames=["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = bentoml.metrics.Histogram(
    name="pneumonia_grpc_server_handling_seconds",
    # By code too: refusals end in milliseconds and would pull a latency alert's p99 down under overload.
    documentation="gRPC call latency in the server, by service, method and status code",
    labelnames=["grpc_service", "grpc_method", "grpc_code"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
BUSY_RETRY_AFTER_S = 1  # the retry-after of a call refused at the concurrency limit: calls end within seconds
UNMATCHED = "unmatched"  # the labels of a call to a method this server does not have (as HTTP labels unknown paths)
# How the access interceptor admitted the call in progress ("key" or "none"), for the servicer's request log.
AUTH: contextvars.ContextVar[str] = contextvars.ContextVar("pneumonia_grpc_auth", default="none")


def first_values(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, Any]:
    """Metadata by lower-case key, the first value of a repeated key winning, as HTTP's headers are read (gRPC took
    the last: two `x-api-key`s were judged by the second over gRPC and by the first over HTTP)."""
    values: dict[str, Any] = {}
    for key, value in metadata or ():
        values.setdefault(key.lower(), value)
    return values


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
        if handler is None:  # grpcio answers UNIMPLEMENTED; the name is the caller's, so it is not a label
            HANDLED.labels(grpc_service=UNMATCHED, grpc_method=UNMATCHED, grpc_code="UNIMPLEMENTED").inc()
            return None
        service, method = _split_method(handler_call_details.method)

        @contextlib.asynccontextmanager
        async def measured(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, error = time.perf_counter(), None
            try:
                yield request
            except BaseException as exc:
                error = exc
                raise
            finally:
                code = _final_code(context, error).name
                HANDLED.labels(grpc_service=service, grpc_method=method, grpc_code=code).inc()
                HANDLING_SECONDS.labels(grpc_service=service, grpc_method=method, grpc_code=code).observe(
                    time.perf_counter() - started)

        return rewrapped(handler, measured)


_KINDS = {
    "unary_unary": (grpc.unary_unary_rpc_method_handler, False),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, False),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, True),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, True),
}


Around = Callable[[Any, grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[Any]]


def rewrapped(handler: grpc.RpcMethodHandler, around: Around,
              request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """`handler` with every call of its behaviour run inside `around(request, context)`, whose value is the request
    the behaviour gets; whatever the kind of method: a single answer, a stream answered by `yield` (an async
    generator) or written with `context.write()`. With `request_deserializer` in place of its own, when given."""
    def wrap_coroutine(behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(request, context) as request:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result

        return wrapped

    def wrap_generator(behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(request, context) as request:
                async for item in behaviour(request, context):
                    yield item

        return wrapped

    for kind, (make_handler, streams) in _KINDS.items():
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            wrap = wrap_generator if streams and inspect.isasyncgenfunction(behaviour) else wrap_coroutine
            return make_handler(wrap(behaviour), request_deserializer=request_deserializer or handler.request_deserializer,
                                response_serializer=handler.response_serializer)
    return handler


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """At most `calls` calls of one answer each in progress per worker (PNEUMONIA_MAX_CONCURRENCY), and at most
    `streams` open streams (health Watch, reflection) apart from them; beyond, RESOURCE_EXHAUSTED with reason
    `too_many_calls` and a `retry-after` trailer.

    grpcio's own `maximum_concurrent_rpcs` counted a call from its headers on and every Watch stream for as long
    as it stayed open: a helper filled a server's slots with Watch streams (no key needed) or with calls that
    never sent their message, and keyed Classify calls and even health checks were refused until the holder
    disconnected, while HTTP's probes read ready. Here a call of one request message counts only once that message
    has arrived (its behaviour runs); streams (which start before their first message) have a pool of their own,
    and health `Check` (a probe) is never counted. Inside the metrics interceptor, so refusals are counted.
    grpcio's cap stays as a backstop at twice the call limit plus the streams (`grpcio_call_cap`): a client
    holding that many calls without their messages still locks the worker's gRPC port until it disconnects (HTTP
    ends such uploads after PNEUMONIA_TIMEOUT_S)."""

    def __init__(self, calls: int, streams: int, exempt: Iterable[str]) -> None:
        self.limits = {"calls": calls, "streams": streams}
        self.running = {"calls": 0, "streams": 0}
        self.exempt = frozenset(exempt)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        pool = "calls" if handler.unary_unary is not None else "streams"

        @contextlib.asynccontextmanager
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.running[pool] >= self.limits[pool]:
                # A reason and a retry-after, so that clients read "busy, retry" (RateLimited), not a bad request:
                # the client knew only grpcio's own wording of this refusal (a review's find).
                what = "calls in flight" if pool == "calls" else "open streams (health Watch, reflection)"
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"this server process is at its limit of {what} ({self.limits[pool]}); "
                                    f"retry after {BUSY_RETRY_AFTER_S} s",
                                    trailing_metadata=((REASONS_METADATA_KEY, "too_many_calls"),
                                                       (RETRY_AFTER_HEADER, str(BUSY_RETRY_AFTER_S))))
            self.running[pool] += 1
            try:
                yield request
            finally:
                self.running[pool] -= 1

        return rewrapped(handler, admitted)





class CallActivity(grpc.aio.ServerInterceptor):
    """When the last call started and how many are running, for the endpoint's shutdown (serving/grpc/server.py).

    grpcio hands a call to the server only once its request message has arrived, and `server.stop(grace)` lets
    running calls finish but cancels those still arriving (found by a helper: 2 of 6 large gRPC uploads got
    CANCELLED at a SIGTERM, while HTTP lost none). Nothing shows those calls before they arrive, so the endpoint
    keeps taking calls until none has started for a quiet period. Outermost: a call counts as soon as it is
    handed over."""

    def __init__(self) -> None:
        self.last_started = time.monotonic()
        self.running = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        self.last_started = time.monotonic()
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:  # streams (health Watch) may last for ever
            return handler
        behaviour = handler.unary_unary

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.running += 1
            try:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self.running -= 1

        return grpc.unary_unary_rpc_method_handler(counted, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


# The HTTP route of each method, for the request log (one line format for both transports).
ROUTES = {"Classify": "/classify", "Explain": "/explain", "GetModelInfo": "/health"}


def log_call(settings: RequestLogSettings, request_id: str, started: float, route: str, images: list[Any],
             status: int, reasons: list[str], context: grpc.aio.ServicerContext, metadata: dict[str, Any],
             auth: str) -> None:
    """The request-log line of one gRPC call, with the fields of an HTTP request's line."""
    fields: dict[str, Any] = {
        "request_id": request_id,
        "transport": "grpc",
        "method": "POST",
        "route": route,
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "images": len(images),
        "reject_reasons": reasons,
        "request_bytes": sum(len(image.data) for image in images),
        "auth": auth,
    }
    if settings.client_identifiers:
        fields.update(
            client=peer_address(context.peer()),
            user_agent=metadata.get("user-agent"),
            client_request_id=metadata.get(REQUEST_ID_HEADER),
            file_names=[request_log.printable(image.filename) for image in images if image.HasField("filename")],
        )
    request_log.log_request(logging.getLogger(request_log.LOGGER_NAME), fields)  # configured by the servicer


def _images_of(request: Any) -> list[Any]:
    """The images a Classify or Explain request carries (none for another message, or one that did not parse)."""
    if isinstance(getattr(request, "images", None), Iterable):
        return list(request.images)
    if hasattr(request, "HasField") and "image" in type(request).DESCRIPTOR.fields_by_name and request.HasField("image"):
        return [request.image]
    return []


def peer_address(peer: str | None) -> str:
    """'ipv4:10.0.0.5:51234' -> '10.0.0.5'; 'ipv6:[::1]:5' -> '::1'; anything else as is."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks `protected` methods for a key and rate-limits `limited` ones (full names, '/pkg.Service/Method')."""

    def __init__(self, policy: AccessPolicy, protected: Iterable[str], limited: Iterable[str],
                 log: RequestLogSettings | None = None) -> None:
        self.policy = policy
        self.protected = frozenset(protected)
        self.limited = frozenset(limited)
        self.log = log or RequestLogSettings()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        protected, limited = method in self.protected, method in self.limited
        if handler is None or handler.unary_unary is None or not (protected or limited):
            return handler
        metadata = first_values(handler_call_details.invocation_metadata)
        key = presented_key(_text(metadata.get(API_KEY_HEADER)), _text(metadata.get("authorization")))
        behaviour = handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            decision = self.policy.check(key, peer_address(context.peer()), protected=protected, limited=limited)
            failed = key is not None and self.policy.keys.enabled and not decision.authenticated
            AUTH.set("key" if decision.authenticated else "failed" if failed else "none")
            if decision.outcome != "allowed":
                # Logged and given a request id as HTTP's 401 and 429 are: these calls never reach the servicer,
                # and a client trying keys or flooding the port left no trace in the request log.
                supplied = metadata.get(REQUEST_ID_HEADER)
                request_id = request_log.request_id(_text(supplied), self.log)
                status, reason = (429, "rate_limited") if decision.outcome == "rate_limited" else (401, "unauthorized")
                log_call(self.log, request_id, started, ROUTES.get(_split_method(method)[1], method), _images_of(request),
                         status, [reason], context, metadata, AUTH.get())
                trailers = ((REQUEST_ID_HEADER, request_id), (REASONS_METADATA_KEY, reason))
                if decision.outcome == "rate_limited":
                    wait = decision.retry_after_s
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"too many requests from this client; retry after {wait} s",
                                        trailing_metadata=(*trailers, (RETRY_AFTER_HEADER, str(wait))))
                # the reasons HTTP's 429 and 401 bodies name, as trailers
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, GRPC_UNAUTHENTICATED_MESSAGE,
                                    trailing_metadata=trailers)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


# What a request body that does not parse becomes, so that the call reaches the interceptors' behaviours.
UNPARSED = object()


class ParseInterceptor(grpc.aio.ServerInterceptor):
    """Turns a request body that is not a valid message of the method's type into INVALID_ARGUMENT, for every
    method: the classifier's, health `Check` and `Watch`, reflection.

    grpcio parses the body before any interceptor's behaviour runs and answers a parse error itself, with status
    UNKNOWN, a message naming the Python exception class, an ERROR traceback in the log and no count in /metrics
    (a helper wrote 375 KB of tracebacks in a second through health Watch, no key needed). Here the parser
    returns `UNPARSED` instead, and the behaviour, or the request stream it reads, aborts with a fixed message."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method
        message = f"the request is not a valid protobuf message for {method}" + (
            "; build it from the published api/proto/pneumonia/v1/classifier.proto"
            if method.startswith(f"/{self.service_name}/") else "")
        streamed_requests = handler.stream_unary is not None or handler.stream_stream is not None

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - DecodeError, bad UTF-8 in a string field, ...
                return UNPARSED

        def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            """The request, or its stream with every message checked as it arrives."""
            if not streamed_requests:
                return request

            async def messages() -> AsyncIterator[Any]:
                async for item in request:
                    if item is UNPARSED:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    yield item

            return messages()

        @contextlib.asynccontextmanager
        async def parsed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is UNPARSED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            yield checked(request, context)

        return rewrapped(handler, parsed, request_deserializer=tolerant)


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def classifier_access(security: SecuritySettings, service_name: str,
                      log: RequestLogSettings | None = None) -> AccessInterceptor:
    """The interceptor for `service_name` (e.g. pneumonia.v1.Classifier): the HTTP rules, method by method."""
    classify, explain = f"/{service_name}/Classify", f"/{service_name}/Explain"
    info = f"/{service_name}/GetModelInfo"
    protected = {classify, explain} | ({info} if security.protect_health else set())
    return AccessInterceptor(shared_policy(security), protected=protected, limited={classify, explain, info}, log=log)


HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def stream_slots(settings: ServingSettings) -> int:
    """Open streams (health Watch, reflection) per worker: a quarter of the call limit, at least one."""
    return max(1, settings.max_concurrency // 4)


def grpcio_call_cap(settings: ServingSettings) -> int:
    """grpcio's own `maximum_concurrent_rpcs`, a backstop above the admission limits: it counts calls from their
    headers on, so it also bounds the messages being received at once (memory), which the admission cannot see."""
    return min(2**31 - 1, 2 * settings.max_concurrency + stream_slots(settings))  # grpcio takes a C int


def build_interceptors(settings: ServingSettings, service_name: str) -> list[grpc.aio.ServerInterceptor]:
    """Every interceptor of the gRPC server, outermost first."""
    admission = AdmissionInterceptor(calls=settings.max_concurrency, streams=stream_slots(settings),
                                     exempt={HEALTH_CHECK})
    return [MetricsInterceptor(), admission, classifier_access(settings.security, service_name, settings.request_log),
            ParseInterceptor(service_name)]
