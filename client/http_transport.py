"""The HTTP transport (httpx): multipart uploads to `POST /classify` and `POST /explain`, `POST /health`, `GET /readyz`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from ._common import (DEFAULT_HTTP_URL, DEFAULT_TIMEOUT_S, TLS, ImageInput, as_uploads, checked_headers, checked_timeout,
                      redact, rejection, some_images)
from .errors import (AuthenticationError, ClientError, DeadlineExceeded, InvalidInput, LimitExceeded, RateLimited, ServerError,
                     Unavailable)
from .models import Explanation, ImageUpload, ModelInfo, Prediction

_PREDICTIONS = TypeAdapter(list[Prediction])


def _files(uploads: list[ImageUpload]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (u.filename or f"image-{i}", u.data, "application/octet-stream")) for i, u in enumerate(uploads)]


def _parsed(response: httpx.Response, parse: Any) -> Any:
    """`parse(body)`, or ServerError when the answer is not the API's (a proxy's HTML page, another service)."""
    try:
        return parse(response.json())
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        kind = response.headers.get("content-type", "no content type")
        raise ServerError(f"{response.request.url} answered {response.status_code} with {kind} that is not the "
                          f"classifier's answer ({type(exc).__name__}): is --url the service's address?",
                          status=response.status_code) from None


def _predictions(response: httpx.Response, uploads: list[ImageUpload]) -> list[Prediction]:
    _raise_for_status(response, uploads)
    predictions = _parsed(response, _PREDICTIONS.validate_python)
    if len(predictions) != len(uploads):
        raise ServerError(f"{len(predictions)} predictions for {len(uploads)} images", status=response.status_code)
    # The HTTP API does not echo names and ids; attach them here so both transports answer alike.
    return [p.model_copy(update={"filename": u.filename, "client_id": u.client_id}) for p, u in zip(predictions, uploads)]


def _single(image: ImageInput) -> ImageUpload:
    uploads = as_uploads(image)
    if len(uploads) != 1:
        raise ValueError(f"explain takes one image, not {len(uploads)}")
    return uploads[0]


def _explanation(response: httpx.Response, upload: ImageUpload) -> Explanation:
    _raise_for_status(response, [upload])
    explanation = _parsed(response, Explanation.model_validate)
    prediction = explanation.prediction.model_copy(update={"filename": upload.filename, "client_id": upload.client_id})
    return explanation.model_copy(update={"prediction": prediction})


def _raise_for_status(response: httpx.Response, uploads: Sequence[ImageUpload] = ()) -> None:
    status = response.status_code
    if 300 <= status < 400:  # not followed: a POST sent on would lose its body, and a key would go to another host
        where = response.headers.get("location", "elsewhere")
        raise ServerError(f"{response.request.url} redirects to {where}: give that address as the URL", status=status)
    if status < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:  # not the API's JSON (a proxy's page): its first words, not the whole page
        body = {"error": " ".join(response.text.split())[:200] or response.reason_phrase}
    body = body[0] if isinstance(body, list) and body else body  # BentoML wraps some errors in a list
    error = str(body.get("error") or body) if isinstance(body, dict) else str(body)
    if status == 400 and isinstance(body, dict) and isinstance(body.get("detail"), list):
        raise rejection(body["detail"], uploads, status)
    details = body.get("detail") if isinstance(body, dict) else None
    reasons = tuple(str(d.get("type")) for d in details if isinstance(d, dict)) if isinstance(details, list) else ()
    if status == 413 and not reasons:  # a proxy's limit (ingress-nginx: 1 MiB by default), not the service's own
        reasons = ("request_too_large",)
    if status in (413, 429):
        cls = RateLimited if status == 429 else LimitExceeded
        raise cls(error, status=status, reasons=reasons, retry_after_s=_retry_after(response))
    if status in (401, 403):
        raise AuthenticationError(error, status=status, reasons=reasons)
    if status == 503:
        raise Unavailable(error, status=status, reasons=reasons, retry_after_s=_retry_after(response))
    if status == 504:
        raise DeadlineExceeded(error, status=status)
    if status in (404, 405):  # a path this server does not have: not the classifier, or a URL with a path
        raise Unavailable(f"no classifier at {response.request.url} ({status} {response.reason_phrase}): is the URL "
                          "the service's address, without a path?", status=status)
    if status < 500:
        raise InvalidInput(error, status=status, reasons=reasons)
    raise ServerError(error, status=status)


def _ready(response: httpx.Response) -> bool:
    """/readyz: 200 ready, 503 still loading; any other answer is not this service's and raises."""
    if response.status_code == 503:
        return False
    _raise_for_status(response)
    if response.status_code != 200:
        raise ServerError(f"{response.request.url} answered {response.status_code}, not 200 or 503: is the URL the "
                          "service's address?", status=response.status_code)
    return True


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _transport_error(exc: httpx.HTTPError, url: str) -> ClientError:
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"no answer from {redact(url)} in time ({type(exc).__name__})")
    return Unavailable(f"cannot reach the service at {redact(url)}: {exc}")


def _base_url(url: str | None, tls: TLS | None) -> str:
    """`host:port` as people type it gets the scheme the TLS settings imply (http, or https with `tls`)."""
    if not url and tls is not None:  # the default server, over TLS: the TLS files say https
        url = DEFAULT_HTTP_URL.removeprefix("http://")
    url = (url or DEFAULT_HTTP_URL).rstrip("/")
    if tls is not None and url.lower().startswith("http://"):  # the CA and client certificate would go unused
        raise ValueError(f"{redact(url)} is plain HTTP: the TLS files (--ca-file, --cert, --key) need an https:// URL")
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
        self._http = httpx.Client(base_url=self.url, timeout=checked_timeout(timeout), headers=checked_headers(headers),
                                  verify=verify)

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None) -> list[Prediction]:
        """One prediction per image, in order."""
        uploads = some_images(images)
        extra = {} if timeout is None else {"timeout": checked_timeout(timeout)}
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
        extra = {} if timeout is None else {"timeout": checked_timeout(timeout)}
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
        return _parsed(response, ModelInfo.model_validate)

    def ready(self) -> bool:
        """True once the model is loaded and warm, False while it loads; raises Unavailable when the server cannot
        be reached, and a ClientError when what answers is not this service (a 404 for a URL with a path)."""
        try:
            response = self._http.get("/readyz")
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _ready(response)

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
        self._http = httpx.AsyncClient(base_url=self.url, timeout=checked_timeout(timeout),
                                       headers=checked_headers(headers), verify=verify)

    async def classify(
        self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None
    ) -> list[Prediction]:
        uploads = some_images(images)
        extra = {} if timeout is None else {"timeout": checked_timeout(timeout)}
        try:
            response = await self._http.post("/classify", files=_files(uploads), **extra)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _predictions(response, uploads)

    async def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        upload = _single(image)
        extra = {} if timeout is None else {"timeout": checked_timeout(timeout)}
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
        return _parsed(response, ModelInfo.model_validate)

    async def ready(self) -> bool:
        try:
            response = await self._http.get("/readyz")
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        return _ready(response)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
