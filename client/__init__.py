"""Typed Python client of the pneumonia classifier: one interface, two transports (HTTP, gRPC), sync and async.

    from client import connect
    with connect("http://127.0.0.1:3000") as api:              # or connect("127.0.0.1:3001", transport="grpc")
        for p in api.classify(["xray.jpeg"]):
            print(p.label, p.probability)

    async with connect_async("127.0.0.1:3001", transport="grpc") as api:
        predictions = await api.classify([b"...jpeg bytes..."])

Every client has `classify(images, timeout=None) -> list[Prediction]`, `explain(image, timeout=None) ->
Explanation` (the prediction plus a Grad-CAM heatmap), `model_info() -> ModelInfo` and `ready() -> bool`, and raises the exceptions of `client.errors`. The package imports only the wire contract
(`api`: models, reason codes, the generated stubs), never server code; names are loaded lazily, so a
caller of one transport does not load the other.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._common import TLS, ImageInput
    from .errors import (
        AuthenticationError,
        ClientError,
        DeadlineExceeded,
        InvalidInput,
        LimitExceeded,
        RateLimited,
        ServerError,
        Unavailable,
    )
    from .grpc_transport import AsyncGrpcClient, GrpcClient
    from .http_transport import AsyncHttpClient, HttpClient
    from .models import DicomInfo, Explanation, Heatmap, ImageInfo, ImageUpload, ModelInfo, Prediction

Transport = Literal["http", "grpc"]

_EXPORTS = {
    "HttpClient": "http_transport",
    "AsyncHttpClient": "http_transport",
    "GrpcClient": "grpc_transport",
    "AsyncGrpcClient": "grpc_transport",
    "Prediction": "models",
    "Explanation": "models",
    "Heatmap": "models",
    "ImageInfo": "models",
    "DicomInfo": "models",
    "ModelInfo": "models",
    "ImageUpload": "models",
    "ImageInput": "_common",
    "TLS": "_common",
    "ClientError": "errors",
    "InvalidInput": "errors",
    "LimitExceeded": "errors",
    "RateLimited": "errors",
    "Unavailable": "errors",
    "DeadlineExceeded": "errors",
    "AuthenticationError": "errors",
    "ServerError": "errors",
}
__all__ = ["AsyncClassifierClient", "ClassifierClient", "Transport", "connect", "connect_async", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@runtime_checkable
class ClassifierClient(Protocol):
    """What HttpClient and GrpcClient both offer."""

    transport: str
    url: str

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None) -> list[Prediction]: ...
    def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation: ...
    def model_info(self) -> ModelInfo: ...
    def ready(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> ClassifierClient: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class AsyncClassifierClient(Protocol):
    """What AsyncHttpClient and AsyncGrpcClient both offer."""

    transport: str
    url: str

    async def classify(
        self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None
    ) -> list[Prediction]: ...
    async def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation: ...
    async def model_info(self) -> ModelInfo: ...
    async def ready(self) -> bool: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> AsyncClassifierClient: ...
    async def __aexit__(self, *exc: object) -> None: ...


def connect(
    url: str | None = None,
    *,
    transport: Transport = "http",
    timeout: float = 60.0,
    headers: Mapping[str, str] | None = None,
    tls: TLS | None = None,
) -> ClassifierClient:
    """A synchronous client; `url` is http(s)://host:port for HTTP, host:port (or grpc://host:port) for gRPC.

    `headers` go with every call (e.g. `{"x-api-key": KEY}`); `tls` says which CA to trust and which client
    certificate to present (HTTPS, gRPC over TLS, mutual TLS).
    """
    if transport == "grpc":
        from .grpc_transport import GrpcClient

        return GrpcClient(url, timeout=timeout, headers=headers, tls=tls)
    if transport == "http":
        from .http_transport import HttpClient

        return HttpClient(url, timeout=timeout, headers=headers, tls=tls)
    raise ValueError(f"unknown transport {transport!r}; use 'http' or 'grpc'")


def connect_async(
    url: str | None = None,
    *,
    transport: Transport = "http",
    timeout: float = 60.0,
    headers: Mapping[str, str] | None = None,
    tls: TLS | None = None,
) -> AsyncClassifierClient:
    """The asyncio version of `connect`."""
    if transport == "grpc":
        from .grpc_transport import AsyncGrpcClient

        return AsyncGrpcClient(url, timeout=timeout, headers=headers, tls=tls)
    if transport == "http":
        from .http_transport import AsyncHttpClient

        return AsyncHttpClient(url, timeout=timeout, headers=headers, tls=tls)
    raise ValueError(f"unknown transport {transport!r}; use 'http' or 'grpc'")
