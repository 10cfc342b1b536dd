"""The HTTP transport (httpx): multipart uploads to `POST /classify` and `POST /explain`, `POST /health`, `GET /readyz`."""

from __future__ import annotations

import asyncio
import time

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from ._common import (DEFAULT_TIMEOUT_S, TLS, ImageInput, answered, as_uploads, checked_headers, checked_timeout,
                      http_base_url, redact, rejection, retry_after_s, some_images)
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
    return answered(_parsed(response, _PREDICTIONS.validate_python), uploads, response.status_code)


def _single(image: ImageInput) -> ImageUpload:
    uploads = as_uploads(image)
    if len(uploads) != 1:
        raise ValueError(f"explain takes one image, not {len(uploads)}")
    return uploads[0]


def _explain_files(upload: ImageUpload) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (upload.filename or "image", upload.data, "application/octet-stream"))]


def _info(response: httpx.Response) -> ModelInfo:
    _raise_for_status(response)
    return _parsed(response, ModelInfo.model_validate)


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
    return retry_after_s(response.headers.get("retry-after"))


class _Late(httpx.TimeoutException):
    """The answer was still arriving at the call's deadline (httpx's own timeouts bound each read, not the call)."""


def _late(seconds: float) -> _Late:
    return _Late(f"the answer was still arriving after {seconds:g} s")


def _transport_error(exc: httpx.HTTPError, url: str) -> ClientError:
    if isinstance(exc, httpx.TimeoutException):
        why = str(exc) if isinstance(exc, _Late) else type(exc).__name__
        return DeadlineExceeded(f"no answer from {redact(url)} in time ({why})")
    return Unavailable(f"cannot reach the service at {redact(url)}: {exc}")


def _whole(response: httpx.Response, raw: bytes) -> httpx.Response:
    """A streamed answer as a read one: its raw bytes, decoded once by the new response as the header says."""
    return httpx.Response(response.status_code, headers=response.headers, content=raw, request=response.request,
                          extensions=response.extensions)


class HttpClient:
    """Synchronous HTTP client. `headers` go with every request (e.g. credentials); `tls` for https:// servers
    signed by a private CA or requiring a client certificate.

    `timeout` bounds connecting, each wait while sending (a slow uplink may take longer as a whole: the server is
    working on a complete request then) and each wait for the answer, and the answer's download as a whole: a
    server sending it a byte at a time held the client without end. The download is checked between its chunks,
    so it ends within `timeout` of the answer's start, or one read's wait (`timeout`) later when the server stalls.
    """

    transport = "http"

    def __init__(
        self, url: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S, headers: Mapping[str, str] | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.url = http_base_url(url, secure=tls is not None)
        self.timeout = checked_timeout(timeout)
        verify = tls.ssl_context() if tls is not None else True
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, headers=checked_headers(headers),
                                  verify=verify)

    def _call(self, method: str, path: str, timeout: float | None = None, **send: Any) -> httpx.Response:
        """One request, its answer read whole before the deadline, or the transport's ClientError."""
        limit = self.timeout if timeout is None else checked_timeout(timeout)
        try:
            with self._http.stream(method, path, timeout=limit, **send) as response:
                deadline = time.monotonic() + limit  # for the answer's body, from its headers on
                chunks = []
                for chunk in response.iter_raw():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise _late(limit)
                return _whole(response, b"".join(chunks))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None) -> list[Prediction]:
        """One prediction per image, in order."""
        uploads = some_images(images)
        return _predictions(self._call("POST", "/classify", timeout, files=_files(uploads)), uploads)

    def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        """One image's prediction (as `classify` gives it) and Grad-CAM heatmap (none when the image is refused).

        Raises `Unavailable` (with `retry_after_s`) when the server is computing as many explanations as it allows.
        """
        upload = _single(image)
        return _explanation(self._call("POST", "/explain", timeout, files=_explain_files(upload)), upload)

    def model_info(self) -> ModelInfo:
        return _info(self._call("POST", "/health", json={}))

    def ready(self) -> bool:
        """True once the model is loaded and warm, False while it loads; raises Unavailable when the server cannot
        be reached, and a ClientError when what answers is not this service (a 404 for a URL with a path)."""
        return _ready(self._call("GET", "/readyz"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHttpClient:
    """The asyncio twin of HttpClient, with the same `timeout`; the answer's download is bounded exactly."""

    transport = "http"

    def __init__(
        self, url: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S, headers: Mapping[str, str] | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.url = http_base_url(url, secure=tls is not None)
        self.timeout = checked_timeout(timeout)
        verify = tls.ssl_context() if tls is not None else True
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout,
                                       headers=checked_headers(headers), verify=verify)

    async def _call(self, method: str, path: str, timeout: float | None = None, **send: Any) -> httpx.Response:
        limit = self.timeout if timeout is None else checked_timeout(timeout)
        try:
            async with self._http.stream(method, path, timeout=limit, **send) as response:
                try:
                    async with asyncio.timeout(limit):  # the answer's body, from its headers on
                        return _whole(response, b"".join([chunk async for chunk in response.aiter_raw()]))
                except TimeoutError:
                    raise _late(limit) from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None

    async def classify(
        self, images: Iterable[ImageInput] | ImageInput, *, timeout: float | None = None
    ) -> list[Prediction]:
        uploads = some_images(images)
        return _predictions(await self._call("POST", "/classify", timeout, files=_files(uploads)), uploads)

    async def explain(self, image: ImageInput, *, timeout: float | None = None) -> Explanation:
        upload = _single(image)
        return _explanation(await self._call("POST", "/explain", timeout, files=_explain_files(upload)), upload)

    async def model_info(self) -> ModelInfo:
        return _info(await self._call("POST", "/health", json={}))

    async def ready(self) -> bool:
        return _ready(await self._call("GET", "/readyz"))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
