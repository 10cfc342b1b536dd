"""The HTTP front door of every worker: a pure ASGI middleware around the BentoML app.

What it does to each request, in order:

1. gives it a request id (returned as `X-Request-ID`), and on the way out adds
   security headers to every response and writes one JSON line to the request
   log (serving/request_log.py);
2. answers CORS preflights for the configured origins (off by default);
3. checks the API key and the client's rate limit (serving/security.py):
   401 without saying what was wrong, 429 with `Retry-After`;
4. bounds the body: a declared `Content-Length` over `max_request_bytes` gets
   413 before a byte is read; a streamed one stops being kept when it crosses
   the limit, and gets 413 when it ends (read on and discarded for at most
   DRAIN_S seconds, so the client can read the answer);
5. on upload routes, parses the multipart body itself while it arrives and
   hands BentoML a rewritten, canonical body: only file parts of the `images`
   field, renamed `image-0, image-1, ...`. BentoML never sees a text value in a
   file field (which it would download as a URL: SSRF), a client's file name
   (which would end up in temporary paths and logs), a wrong content type, a
   truncated or malformed multipart body, or more images than allowed; each of
   those is refused here with a precise 4xx.

Error bodies keep the shape of BentoML's validation errors:
`{"error": "...", "detail": [{"type": <reason>, "loc": [...], "msg": "..."}]}`.
Registered in service.py with `PneumoniaClassifier.add_asgi_middleware(HttpGuard, ...)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import bentoml
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware

from serving import request_log
from serving.security import (
    API_KEY_HEADER,
    INTERNAL_HEADER,
    UNAUTHENTICATED_MESSAGE,
    is_internal,
    presented_key,
    shared_policy,
)
from settings import ServingSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBE_PATHS = frozenset({"/livez", "/healthz", "/readyz"})
DOC_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
STATIC_PREFIXES = ("/assets/", "/static_content/")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CHUNK = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024  # bodies above this are spooled to a temporary file
# A body that crosses max_request_bytes is answered 413 once it ends, read on but not kept, for at most
# this long and another max_request_bytes; so a client that sends a finite body reads the 413 instead of
# a connection reset, and an endless one is cut off.
DRAIN_S = 5.0
_CALL = "pneumonia.call"

REFUSED = bentoml.metrics.Counter(
    name="pneumonia_http_refused_total",
    documentation="Requests refused by the HTTP guard (auth, rate limit, body and multipart checks), by status and reason",
    labelnames=["status", "reason"],
)


class GuardError(Exception):
    """A request refused by the guard, with its HTTP status and reason code."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        loc: tuple[Any, ...] = ("body",),
        *,
        more: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.details = [{"type": reason, "loc": list(loc), "msg": message}, *(more or [])]
        self.message = message
        self.headers = headers or {}

    @property
    def reasons(self) -> list[str]:
        return [d["type"] for d in self.details]

    def body(self) -> bytes:
        return json.dumps({"error": self.message, "detail": self.details}).encode()


class _ClientGone(Exception):
    """The client disconnected before its body arrived: nobody to answer."""


@dataclass
class _Call:
    """What the request log needs to know about one request."""

    request_id: str
    started: float
    internal: bool
    status: int = 0
    auth: str = "none"  # none | key | failed | internal
    images: int | None = None
    request_bytes: int = 0
    reasons: list[str] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    route: str | None = None  # the route the app matched (its pattern, never the raw path)


def _printable(raw: bytes, limit: int = 64) -> str:
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class _MultipartCanon:
    """Streams a multipart body through python-multipart and writes a canonical copy.

    The copy holds only the file parts of `field`, with a boundary and file
    names of our own; anything else is either refused at once (a text value in
    the file field, too many files, unparseable data) or collected as an
    unexpected field and refused when the body ends.
    """

    def __init__(self, boundary: bytes, field_name: str, max_files: int, out: BinaryIO) -> None:
        self.field = field_name.encode()
        self.field_name = field_name
        self.max_files = max_files
        self.out = out
        self.boundary = b"pneumonia-" + secrets.token_hex(16).encode()
        self.count = 0
        self.file_names: list[str] = []
        self.unexpected: list[str] = []
        self.ended = False
        self._in_file = False
        self._name = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        try:
            self.parser = MultipartParser(
                boundary,
                callbacks={
                    "on_part_begin": self._part_begin,
                    "on_header_field": lambda d, s, e: self._name.extend(d[s:e]),
                    "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
            )
        except Exception:
            raise GuardError(400, "malformed_multipart", "the multipart boundary is not valid") from None

    @property
    def content_type(self) -> bytes:
        return b"multipart/form-data; boundary=" + self.boundary

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except GuardError:
            raise
        except Exception:
            raise GuardError(
                400,
                "malformed_multipart",
                "the multipart body could not be parsed (check its boundary and part headers)",
            ) from None

    def finish(self, received: int) -> None:
        """Refuse what only the end of the body reveals."""
        missing = {
            "type": "missing",
            "loc": [self.field_name],
            "msg": f"no images: send the X-rays as files in the multipart field '{self.field_name}'",
        }
        if received == 0:
            raise GuardError(400, "missing", missing["msg"], (self.field_name,))
        if not self.ended:
            raise GuardError(400, "malformed_multipart", "the multipart body ended before its closing boundary")
        extra = [
            {"type": "unexpected_field", "loc": ["form", name], "msg": f"unexpected form field {name!r}"}
            for name in dict.fromkeys(self.unexpected)
        ][:8]
        if self.count == 0:
            raise GuardError(400, "missing", missing["msg"], (self.field_name,), more=extra)
        if extra:
            first = extra[0]
            message = f"{first['msg']}; send only files in the field '{self.field_name}'"
            raise GuardError(400, "unexpected_field", message, tuple(first["loc"]), more=extra[1:])

    # python-multipart callbacks
    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _header_end(self) -> None:
        self._headers[bytes(self._name).strip().lower()] = bytes(self._value).strip()
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        kind, params = parse_options_header(disposition) if disposition else (b"", {})
        if kind.lower() != b"form-data" or b"name" not in params:
            raise GuardError(400, "malformed_multipart", "a multipart part is not a named form-data field")
        name = params[b"name"]
        if name != self.field:
            self.unexpected.append(_printable(name))
            return
        if b"filename" not in params and b"filename*" not in params:
            raise GuardError(
                400,
                "not_a_file",
                f"'{self.field_name}' values must be uploaded files (multipart parts with a filename), not text",
                (self.field_name, self.count),
            )
        if self.count >= self.max_files:
            raise GuardError(
                400,
                "too_many_images",
                f"more than {self.max_files} images in one request; the limit is {self.max_files}",
                (self.field_name,),
            )
        self.file_names.append(_printable(params.get(b"filename", params.get(b"filename*", b""))))
        self.out.write(
            b'--%s\r\nContent-Disposition: form-data; name="%s"; filename="image-%d"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" % (self.boundary, self.field, self.count)
        )
        self.count += 1
        self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.out.write(data[start:end])

    def _part_end(self) -> None:
        if self._in_file:
            self.out.write(b"\r\n")
            self._in_file = False

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.count:
                self.out.write(b"--%s--\r\n" % self.boundary)


class _Responder:
    """Wraps `send`: security headers and the request id on every response, JSON for bare 4xx text."""

    def __init__(self, send: Send, call: _Call, path: str, https: bool) -> None:
        self._send = send
        self.call = call
        self.static = path.startswith(STATIC_PREFIXES)
        self.https = https
        self._start: Message | None = None
        self._text: bytearray | None = None  # a plain-text 4xx being rewritten as JSON
        self.error_body = bytearray()  # the first bytes of a JSON error, for the log's reasons

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            self.call.status = status
            headers = MutableHeaders(raw=list(message.get("headers", [])))
            self._secure(headers)
            message = {**message, "headers": headers.raw}
            content_type = headers.get("content-type", "")
            if status in (400, 404, 405) and not content_type.startswith("application/json"):
                self._start, self._text = message, bytearray()
                return
            if status >= 400:
                self.error_body = bytearray()
        elif message["type"] == "http.response.body":
            if self._text is not None and self._start is not None:
                self._text.extend(message.get("body", b"")[:4096])
                if message.get("more_body", False):
                    return
                await self._send_json_instead()
                return
            if self.call.status >= 400 and len(self.error_body) < 65536:
                self.error_body.extend(message.get("body", b""))
        await self._send(message)

    async def _send_json_instead(self) -> None:
        assert self._start is not None and self._text is not None
        status = self.call.status
        reason = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}[status]
        text = self._text.decode("utf-8", "replace").strip() or reason.replace("_", " ")
        body = GuardError(status, reason, text[:200], ()).body()
        self.error_body = bytearray(body)
        headers = MutableHeaders(raw=list(self._start["headers"]))
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(body))
        await self._send({**self._start, "headers": headers.raw})
        await self._send({"type": "http.response.body", "body": body})

    def _secure(self, headers: MutableHeaders) -> None:
        html = headers.get("content-type", "").startswith("text/html")
        headers["x-request-id"] = self.call.request_id
        headers["x-content-type-options"] = "nosniff"
        headers["x-frame-options"] = "DENY"
        headers["referrer-policy"] = "no-referrer"
        # The docs page (HTML) loads its own scripts; API answers need nothing at all.
        headers["content-security-policy"] = (
            "frame-ancestors 'none'" if html else "default-src 'none'; frame-ancestors 'none'"
        )
        if not self.static:
            headers["cache-control"] = "no-store"
        if self.https:
            headers["strict-transport-security"] = "max-age=31536000"

    def reasons(self) -> list[str]:
        try:
            body = json.loads(bytes(self.error_body)) if self.error_body else None
        except ValueError:
            return []
        details = body.get("detail") if isinstance(body, dict) else None
        if not isinstance(details, list):
            return []
        return [str(d.get("type")) for d in details if isinstance(d, dict) and d.get("type")][:32]


class HttpGuard:
    """ASGI middleware: request id, security headers, CORS, auth, rate limit, body checks, request log.

    `upload_routes` maps a POST route to its multipart file field, e.g. {"/classify": "images"}.
    """

    def __init__(self, app: ASGIApp, settings: ServingSettings, upload_routes: dict[str, str]) -> None:
        self.app = app
        self.settings = settings
        self.upload_routes = dict(upload_routes)
        self.policy = shared_policy(settings.security)
        self.logger = request_log.configure(settings.request_log)
        logging.getLogger("python_multipart").setLevel(logging.ERROR)  # our 400s say it; no warning per bad body
        security = settings.security
        self.open_paths = set(PROBE_PATHS | DOC_PATHS)
        if not security.protect_health:
            self.open_paths.add("/health")
        if not security.protect_metrics:
            self.open_paths.add("/metrics")
        self.unlimited_paths = set(PROBE_PATHS | DOC_PATHS | {"/metrics"})  # probes and scrapers are never throttled
        self.known_routes = set(PROBE_PATHS | DOC_PATHS | {"/health", "/metrics"} | set(self.upload_routes))
        self.entry: ASGIApp = self._checked
        if security.cors.allow_origins:
            self.entry = CORSMiddleware(
                self._checked,
                allow_origins=security.cors.allow_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", API_KEY_HEADER, "content-type", "x-request-id"],
                expose_headers=["x-request-id", "retry-after"],
                max_age=security.cors.max_age_s,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        call = _Call(
            request_id=self._request_id(headers),
            started=time.perf_counter(),
            internal=is_internal(headers.get(INTERNAL_HEADER)),
        )
        scope = dict(scope)
        scope[_CALL] = call
        responder = _Responder(send, call, scope["path"], https=scope.get("scheme") == "https")
        try:
            await self.entry(scope, receive, responder.send)
        finally:
            if scope["path"] not in PROBE_PATHS:
                self._log(scope, headers, call, responder)

    def _request_id(self, headers: Headers) -> str:
        supplied = headers.get("x-request-id")
        if self.settings.request_log.client_identifiers and supplied and REQUEST_ID.fullmatch(supplied):
            return supplied
        return uuid.uuid4().hex

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        call: _Call = scope[_CALL]
        headers = Headers(scope=scope)
        try:
            if call.internal:
                call.auth = "internal"  # already checked by its transport (the gRPC interceptor)
            else:
                self._admit(scope, headers, call)
            body_scope, body_receive, spool = await self._read_body(scope, receive, headers, call)
        except GuardError as exc:
            call.reasons = exc.reasons
            await self._reject(send, exc)
            return
        except _ClientGone:
            call.status = 499
            return
        try:
            await self.app(body_scope, body_receive, send)
        finally:
            call.route = getattr(body_scope.get("route"), "path", None)  # set by the router
            if spool is not None:
                spool.close()

    def _admit(self, scope: Scope, headers: Headers, call: _Call) -> None:
        path = scope["path"]
        protected = path not in self.open_paths and not path.startswith(STATIC_PREFIXES)
        limited = path not in self.unlimited_paths and not path.startswith(STATIC_PREFIXES)
        key = presented_key(headers.get(API_KEY_HEADER), headers.get("authorization"))
        client = scope.get("client")
        decision = self.policy.check(key, client[0] if client else "unknown", protected=protected, limited=limited)
        if decision.authenticated:
            call.auth = "key"
        elif key is not None and self.policy.keys.enabled:
            call.auth = "failed"
        if decision.outcome == "rate_limited":
            wait = decision.retry_after_s
            raise GuardError(
                429,
                "rate_limited",
                f"too many requests from this client; retry after {wait} s",
                (),
                headers={"retry-after": str(wait)},
            )
        if decision.outcome == "unauthenticated":
            call.auth = "failed"
            # One answer for a missing, malformed or wrong key: nothing to learn from it.
            raise GuardError(401, "unauthorized", UNAUTHENTICATED_MESSAGE, (), headers={"www-authenticate": "Bearer"})

    async def _read_body(
        self, scope: Scope, receive: Receive, headers: Headers, call: _Call
    ) -> tuple[Scope, Receive, BinaryIO | None]:
        """Read the whole body (bounded) into a spool, canonicalising uploads; return what the app gets."""
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise GuardError(
                413,
                "request_too_large",
                f"the request body is {int(declared):,} bytes, over the limit of {limit:,} bytes",
                headers={"connection": "close"},
            )
        field_name = self.upload_routes.get(scope["path"]) if scope["method"] == "POST" else None
        if not chunked and (declared is None or declared == "0") and field_name is None:
            return scope, receive, None  # no body: nothing to bound or rewrite
        canon: _MultipartCanon | None = None
        spool: BinaryIO = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by caller
        try:
            if field_name is not None:
                media, params = parse_options_header(headers.get("content-type", ""))
                if media.lower() != b"multipart/form-data":
                    raise GuardError(
                        415,
                        "unsupported_media_type",
                        f"send the images as multipart/form-data files in the field '{field_name}'",
                        ("header", "content-type"),
                    )
                if not params.get(b"boundary"):
                    raise GuardError(400, "malformed_multipart", "the multipart Content-Type has no boundary")
                canon = _MultipartCanon(params[b"boundary"], field_name, self.settings.max_images_per_request, spool)
            received, refused, over_since = 0, None, None
            while True:
                if over_since is None:
                    message = await receive()
                else:  # past the limit: discard what is still coming, for a bounded time
                    try:
                        message = await asyncio.wait_for(receive(), DRAIN_S - (time.monotonic() - over_since))
                    except (TimeoutError, ValueError):
                        break
                if message["type"] == "http.disconnect":
                    raise _ClientGone()
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit and over_since is None:
                    over_since = time.monotonic()
                    spool.truncate(0)
                    refused = GuardError(
                        413,
                        "request_too_large",
                        f"the request body is over the limit of {limit:,} bytes",
                        headers={"connection": "close"},
                    )
                if refused is None:
                    try:
                        canon.feed(chunk) if canon is not None else spool.write(chunk)
                    except GuardError as exc:
                        refused = exc  # keep reading (bounded), so the client gets to read the answer
                if not message.get("more_body", False):
                    break
                if over_since is not None and (received > 2 * limit or time.monotonic() - over_since > DRAIN_S):
                    break
            call.request_bytes = received
            if refused is not None:
                raise refused
            if canon is not None:
                canon.finish(received)
                call.images = canon.count
                call.file_names = canon.file_names
        except BaseException:
            spool.close()
            raise
        size = spool.tell()
        spool.seek(0)
        raw = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding", b"content-type")
        ]
        content_type = canon.content_type if canon is not None else headers.get("content-type", "").encode("latin-1")
        if content_type:
            raw.append((b"content-type", content_type))
        raw.append((b"content-length", str(size).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect, as the server would
            data = spool.read(CHUNK)
            more = spool.tell() < size
            replayed = not more
            return {"type": "http.request", "body": data, "more_body": more}

        return {**scope, "headers": raw}, replay, spool

    async def _reject(self, send: Send, error: GuardError) -> None:
        REFUSED.labels(status=str(error.status), reason=error.reasons[0]).inc()
        body = error.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope: Scope, headers: Headers, call: _Call, responder: _Responder) -> None:
        route = call.route or (scope["path"] if scope["path"] in self.known_routes else None)
        fields: dict[str, Any] = {
            "request_id": call.request_id,
            "transport": "grpc" if call.internal else "http",
            "method": scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER",
            "route": route or "unmatched",
            "status": call.status or 500,
            "duration_ms": round((time.perf_counter() - call.started) * 1000, 2),
            "images": call.images,
            "reject_reasons": call.reasons or responder.reasons(),
            "request_bytes": call.request_bytes,
            "auth": call.auth,
        }
        if self.settings.request_log.client_identifiers:
            client = scope.get("client")
            fields.update(
                client=client[0] if client else None,
                user_agent=headers.get("user-agent"),
                client_request_id=headers.get("x-request-id"),
                file_names=call.file_names,
            )
        request_log.log_request(self.logger, fields)
