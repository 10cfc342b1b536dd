"""The gRPC transport: `pneumonia.v1.Classifier` (Classify, Explain, GetModelInfo) and `grpc.health.v1.Health`, sync and asyncio."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from api.grpc import SERVICE_NAME, explanation_fields, model_info_fields, pb, pb_grpc, prediction_fields
from api.status import REASONS_METADATA_KEY, RETRY_AFTER_HEADER
from ._common import (DEFAULT_TIMEOUT_S, TLS, ImageInput, answered, as_uploads, checked_headers, checked_timeout,
                      grpc_target, retry_after_s, some_images)
from .errors import (
    LIMIT_REASONS,
    AuthenticationError,
    ClientError,
    DeadlineExceeded,
    InvalidInput,
    LimitExceeded,
    RateLimited,
    ServerError,
    Unavailable,
)
from .models import Explanation, ImageUpload, ModelInfo, Prediction

T = TypeVar("T")

# Room for the largest request the server accepts by default (64 MiB), both ways.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]

_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}


def _request(uploads: Sequence[ImageUpload]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        images=[pb.Image(data=u.data, filename=u.filename, client_id=u.client_id) for u in uploads]
    )


def _answer(parse: Callable[[Any], T], message: Any, target: str) -> T:
    """`parse(message)`, or ServerError when the message is not the classifier's answer (another server's, a
    proxy's): an empty prediction read as "ok" with no label, and crashed the CLI."""
    try:
        return parse(message)
    except ValidationError as exc:
        raise ServerError(f"the gRPC service at {target} answered with a message that is not the classifier's "
                          f"answer ({exc.error_count()} invalid field(s)): is the address the service's?",
                          status="OK") from None


def _predictions(response: pb.ClassifyResponse, uploads: Sequence[ImageUpload], target: str) -> list[Prediction]:
    predictions = [_answer(lambda m: Prediction.model_validate(prediction_fields(m)), p, target)
                   for p in response.predictions]
    return answered(predictions, uploads, "OK")


def _explain_request(image: ImageInput) -> tuple[pb.ExplainRequest, ImageUpload]:
    uploads = as_uploads(image)
    if len(uploads) != 1:
        raise ValueError(f"explain takes one image, not {len(uploads)}")
    u = uploads[0]
    return pb.ExplainRequest(image=pb.Image(data=u.data, filename=u.filename, client_id=u.client_id)), u


def _explanation(message: pb.ExplainResponse, target: str) -> Explanation:
    return _answer(lambda m: Explanation.model_validate(explanation_fields(m)), message, target)


def _model_info(message: pb.ModelInfo, target: str) -> ModelInfo:
    return _answer(lambda m: ModelInfo.model_validate(model_info_fields(m)), message, target)


def _error(exc: grpc.RpcError, target: str) -> ClientError:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or code.name
    trailing = dict(exc.trailing_metadata() or ())
    reasons = tuple(r for r in str(trailing.get(REASONS_METADATA_KEY, "")).split(",") if r)
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        details = f"cannot reach the gRPC service at {target}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"no answer from {target} in time ({details})"
    cls = _ERRORS.get(code, ServerError)
    if code == grpc.StatusCode.UNIMPLEMENTED:  # as HTTP's 404: a gRPC server, but not this classifier
        details, cls = f"no classifier at {target} ({details}): is it the service's gRPC address?", Unavailable
    if cls is InvalidInput and reasons and reasons[0] in LIMIT_REASONS:
        cls = LimitExceeded
    # the server's limit on calls in flight says too_many_calls; grpcio's own backstop sends no reason, only its message
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
            {"rate_limited", "too_many_calls"} & set(reasons) or "Concurrent RPC limit" in details):
        cls = RateLimited
    # grpcio's message size limits (this channel's on sending, the server's on receiving) send no reason either:
    # name it as the HTTP API's byte limit does, so that a caller (the CLI) sends fewer images per request
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not reasons and "larger than max" in details:
        reasons = ("request_too_large",)
    wait = retry_after_s(str(trailing.get(RETRY_AFTER_HEADER, "")))
    return cls(details, status=code.name, reasons=reasons, retry_after_s=wait)


def _open_channel(api: Any, target: str, credentials: grpc.ChannelCredentials | None) -> Any:
    """A channel from `api` (`grpc` or `grpc.aio`): plaintext without credentials, TLS with them."""
    if credentials is None:
        return api.insecure_channel(target, options=_CHANNEL_OPTIONS)
    return api.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)


def _credentials(credentials: grpc.ChannelCredentials | None, tls: TLS | None) -> grpc.ChannelCredentials | None:
    if credentials is not None and tls is not None:
        raise ValueError("pass credentials or tls, not both")
    return credentials if tls is None else tls.grpc_credentials()


def _metadata(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((k.lower(), v) for k, v in checked_headers(headers).items())


def _deadline(timeout: float | None, default: float) -> float:
    return default if timeout is None else checked_timeout(timeout)


class GrpcClient:
    """Synchronous gRPC client. `headers` travel as call metadata (e.g. credentials); `tls` (or grpc `credentials`)
    opens a TLS channel, with a client certificate for a server that requires one (mutual TLS)."""

    transport = "grpc"

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.url = grpc_target(target, secure=credentials is not None or tls is not None)
        self.timeout = checked_timeout(timeout)
        self._metadata = _metadata(headers)
        self._channel = _open_channel(grpc, self.url, _credentials(credentials, tls))
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None) -> list[Prediction]:
        """One prediction per image, in order."""
        uploads = some_images(images)
        try:
            response = self._stub.Classify(_request(uploads), timeout=_deadline(timeout, self.timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return _predictions(response, uploads, self.url)

    def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        """One image's prediction (as `classify` gives it) and Grad-CAM heatmap (none when the image is refused)."""
        request, _ = _explain_request(image)
        try:
            response = self._stub.Explain(request, timeout=_deadline(timeout, self.timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return _explanation(response, self.url)

    def model_info(self) -> ModelInfo:
        try:
            response = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return _model_info(response, self.url)

    def ready(self) -> bool:
        """True when the standard health check says SERVING; raises Unavailable when nothing answers."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=min(self.timeout, 10.0)
            )
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGrpcClient:
    """The asyncio twin of GrpcClient (grpc.aio); the channel opens on first use, inside the running loop."""

    transport = "grpc"

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.url = grpc_target(target, secure=credentials is not None or tls is not None)
        self.timeout = checked_timeout(timeout)
        self._metadata = _metadata(headers)
        self._credentials = _credentials(credentials, tls)
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = _open_channel(grpc.aio, self.url, self._credentials)
        return self._channel

    async def classify(
        self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None
    ) -> list[Prediction]:
        uploads = some_images(images)
        stub = pb_grpc.ClassifierStub(self._open())
        try:
            response = await stub.Classify(_request(uploads), timeout=_deadline(timeout, self.timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return _predictions(response, uploads, self.url)

    async def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        request, _ = _explain_request(image)
        stub = pb_grpc.ClassifierStub(self._open())
        try:
            response = await stub.Explain(request, timeout=_deadline(timeout, self.timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return _explanation(response, self.url)

    async def model_info(self) -> ModelInfo:
        stub = pb_grpc.ClassifierStub(self._open())
        try:
            response = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return _model_info(response, self.url)

    async def ready(self) -> bool:
        stub = health_pb2_grpc.HealthStub(self._open())
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=min(self.timeout, 10.0)
            )
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from None
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
