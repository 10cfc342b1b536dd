"""The HTTP transport (httpx): multipart uploads to `POST /classify` and `POST /explain`, `POST /health`, `GET /readyz`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import TypeAdapter

from ._common import DEFAULT_HTTP_URL, DEFAULT_TIMEOUT_S, TLS, ImageInput, as_uploads, redact, rejection
from .errors import (AuthenticationError, ClientError, DeadlineExceeded, LimitExceeded, RateLimited, ServerError,
                     Unavailable)
from .models import Explanation, ImageUpload, ModelInfo, Prediction

_PREDICTIONS = TypeAdapter(list[Prediction])


def _files(uploads: list[ImageUpload]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (u.filename or f"image-{i}", u.data, "application/octet-stream")) for i, u in enumerate(uploads)]


def _predictions(response: httpx.Response, uploads: list[ImageUpload]) -> list[Prediction]:
    _raise_for_status(response, uploads)
    predictions = _PREDICTIONS.validate_python(response.json())
    # The HTTP API does not echo names and ids; attach them here so both transports answer alike.
    return [p.model_copy(update={"filename": u.filename, "client_id": u.client_id}) for p, u in zip(predictions, uploads)]


def _single(image: ImageInput) -> ImageUpload:
    uploads = as_uploads(image)
    if len(uploads) != 1:
        raise ValueError(f"explain takes one image, not {len(uploads)}")
    return uploads[0]


def _explanation(response: httpx.Response, upload: ImageUpload) -> Explanation:
    _raise_for_status(response, [upload])
    explanation = Explanation.model_validate(response.json())
    prediction = explanation.prediction.model_copy(update={"filename": upload.filename, "client_id": upload.client_id})
    return explanation.model_copy(update={"prediction": prediction})


def _raise_for_status(response: httpx.Response, uploads: Sequence[ImageUpload] = ()) -> None:
    status = response.status_code
    if status < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = {"error": response.text}
    body = body[0] if isinstance(body, list) and body else body  # BentoML wraps some errors in a list
    error = str(body.get("error") or body) if isinstance(body, dict) else str(body)
    if status == 400 and isinstance(body, dict) and isinstance(body.get("detail"), list):
        raise rejection(body["detail"], uploads, status)
    details = body.get("detail") if isinstance(body, dict) else None
    reasons = tuple(str(d.get("type")) for d in details if isinstance(d, dict)) if isinstance(details, list) else ()
    if status in (413, 429):
        cls = RateLimited if status == 429 else LimitExceeded
        raise cls(error, status=status, reasons=reasons, retry_after_s=_retry_after(response))
    if status in (401, 403):
        raise AuthenticationError(error, status=status, reasons=reasons)
    if status == 503:
        raise Unavailable(error, status=status, reasons=reasons, retry_after_s=_retry_after(response))
    if status == 504:
        raise DeadlineExceeded(error, status=status)
    if status < 500:
        raise ClientError(error, status=status)
    raise ServerError(error, status=status)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _transport_error(exc: httpx.HTTPError, url: str) -> ClientError:
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"no answer from {redact(url)} in time ({type(exc).__name__})")
    return Unavailable(f"cannot reach the service at {redact(url)}: {exc}")


def _base_url(url: str | None, tls: TLS | None) -> str:
    """`host:port` as people type it gets the scheme the TLS settings imply (http, or https with `tls`)."""
    url = (url or DEFAULT_HTTP_URL).rstrip("/")
    return url if "://" in url else f"{'https' if tls is not None else 'http'}://{url}"


class HttpClient:
    """Synchronous HTTP client. `headers` go with every request (e.g. credentials); `tls` for https:// servers
    signed by a private CA or requiring a client certificate."""

    transport = "http"

    def __init__(
        self, url: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S, headers: Mapping[str, str] | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.url = _base_url(url, tls)
        verify = tls.ssl_context() if tls is not None else True
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=dict(headers or {}), verify=verify)

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None) -> list[Prediction]:
        """One prediction per image, in order."""
        uploads = as_uploads(images)
        extra = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._http.post("/classify", files=_files(uploads), **extra)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _predictions(response, uploads)

    def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        """One image's prediction (as `classify` gives it) and Grad-CAM heatmap (none when the image is refused).

        Raises `Unavailable` (with `retry_after_s`) when the server is computing as many explanations as it allows.
        """
        upload = _single(image)
        extra = {} if timeout is None else {"timeout": timeout}
        files = [("image", (upload.filename or "image", upload.data, "application/octet-stream"))]
        try:
            response = self._http.post("/explain", files=files, **extra)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _explanation(response, upload)

    def model_info(self) -> ModelInfo:
        try:
            response = self._http.post("/health", json={})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        _raise_for_status(response)
        return ModelInfo.model_validate(response.json())

    def ready(self) -> bool:
        """True once the model is loaded and warm; raises Unavailable when the server cannot be reached."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHttpClient:
    """The asyncio twin of HttpClient."""

    transport = "http"

    def __init__(
        self, url: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S, headers: Mapping[str, str] | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.url = _base_url(url, tls)
        verify = tls.ssl_context() if tls is not None else True
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=dict(headers or {}), verify=verify)

    async def classify(
        self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None
    ) -> list[Prediction]:
        uploads = as_uploads(images)
        extra = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._http.post("/classify", files=_files(uploads), **extra)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _predictions(response, uploads)

    async def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        upload = _single(image)
        extra = {} if timeout is None else {"timeout": timeout}
        files = [("image", (upload.filename or "image", upload.data, "application/octet-stream"))]
        try:
            response = await self._http.post("/explain", files=files, **extra)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _explanation(response, upload)

    async def model_info(self) -> ModelInfo:
        try:
            response = await self._http.post("/health", json={})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        _raise_for_status(response)
        return ModelInfo.model_validate(response.json())

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
