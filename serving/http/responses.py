"""What the guard writes: refusals as JSON error bodies, and the headers every response carries."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import bentoml
from starlette.datastructures import MutableHeaders

from api.models import PYDANTIC_HEADING, error_body, refusal_summary

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATIC_PREFIXES = ("/assets/", "/static_content/")
UI_PATH = "/ui"  # the web page (serving/ui/), mounted by service.py
# The page's own files only: no inline script or style, no other origin; heatmaps arrive as data: URLs.
UI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
          "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
# BentoML's docs page (HTML at /): Swagger UI's own files and inline styles, no other origin and no inline script.
# Its page carries an inline Google Tag Manager loader; run in the service's origin, what that loads could read a
# key the web page keeps in sessionStorage and call the API with it, and every visit called Google.
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-src 'none'; object-src 'none'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


def is_ui(path: str) -> bool:
    """True for the web page and its files (open, not rate limited, with the strict `UI_CSP`)."""
    return path == UI_PATH or path.startswith(UI_PATH + "/")


def route_label(path: str, known_routes: Collection[str]) -> str:
    """A bounded name for `path` in logs and metrics: a known route as itself, the web page's files as `UI_PATH`,
    anything else `unmatched` (a raw path would give every URL a scanner tries its own label)."""
    if path in known_routes:
        return path
    return UI_PATH if is_ui(path) else "unmatched"

REFUSED = bentoml.metrics.Counter(
    name="pneumonia_http_refused_total",
    documentation="Requests refused by the HTTP guard (auth, rate limit, body and multipart checks), by status and reason",
    labelnames=["status", "reason"],
)


class GuardError(Exception):
    """A request refused by the guard, with its HTTP status and reason code (api.reasons)."""

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
        return error_body(self.message, self.details)


@dataclass
class Call:
    """What the request log needs to know about one request."""

    request_id: str
    started: float
    status: int = 0
    auth: str = "none"  # none | key | failed
    images: int | None = None
    request_bytes: int = 0
    reasons: list[str] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    route: str | None = None  # the route the app matched (its pattern, never the raw path)


async def send_json(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    """A complete JSON response."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def reject(send: Send, error: GuardError) -> None:
    """Answer a refusal and count it (pneumonia_http_refused_total)."""
    REFUSED.labels(status=str(error.status), reason=error.reasons[0]).inc()
    await send_json(send, error.status, error.body(), error.headers)


_MAX_REWRITTEN = 262_144  # a 400 body longer than this is passed on as it is (16 refusals take about 4 KB)


def _summarised(body: bytes) -> bytes:
    """`body` with a pydantic heading in `error` replaced by `refusal_summary` of its details; else `body`."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    error, details = data.get("error"), data.get("detail")
    if not (isinstance(error, str) and PYDANTIC_HEADING.fullmatch(error) and isinstance(details, list) and details
            and all(isinstance(d, dict) for d in details)):
        return body
    return json.dumps({**data, "error": refusal_summary(details)}).encode()


class Responder:
    """Wraps `send`: security headers and the request id on every response, JSON for bare 4xx text."""

    def __init__(self, send: Send, call: Call, path: str, https: bool) -> None:
        self._send = send
        self.call = call
        self.static = path.startswith(STATIC_PREFIXES)
        self.ui = is_ui(path)
        self.https = https
        self._start: Message | None = None
        # A 4xx body held back to be rewritten: plain text becomes a JSON error; a JSON 400 gets its first reason
        # in place of pydantic's heading (`_summarised`).
        self._held: bytearray | None = None
        self._held_json = False
        self.error_body = bytearray()  # the first bytes of a JSON error, for the log's reasons

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            self.call.status = status
            headers = MutableHeaders(raw=list(message.get("headers", [])))
            self._secure(headers)
            message = {**message, "headers": headers.raw}
            content_type = headers.get("content-type", "")
            json_body = content_type.startswith("application/json")
            if status == 400 or (status in (404, 405) and not json_body):
                self._start, self._held, self._held_json = message, bytearray(), json_body
                return
            if status >= 400:
                self.error_body = bytearray()
        elif message["type"] == "http.response.body":
            if self._held is not None and self._start is not None:
                chunk = message.get("body", b"")
                self._held.extend(chunk if self._held_json else chunk[:4096])  # text: its first 200 characters are used
                more = bool(message.get("more_body", False))
                if more and (not self._held_json or len(self._held) < _MAX_REWRITTEN):
                    return
                await self._send_held(more)
                return
            if self.call.status >= 400 and len(self.error_body) < 65536:
                self.error_body.extend(message.get("body", b""))
        await self._send(message)

    async def _send_held(self, more: bool) -> None:
        """The held 4xx, rewritten: plain text as `GuardError`'s JSON (`bad_request`, `not_found`,
        `method_not_allowed`); BentoML's JSON 400 for refused images, which reads "1 validation error for Input",
        with the first reason instead (`refusal_summary`, as the gRPC status message and the guard's own refusals
        read). A JSON body still coming after `_MAX_REWRITTEN` bytes goes on as it is."""
        assert self._start is not None and self._held is not None
        body, headers = bytes(self._held), MutableHeaders(raw=list(self._start["headers"]))
        self._held = None
        if not more:
            if self._held_json:
                body = _summarised(body)
            else:
                status = self.call.status
                reason = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}[status]
                text = body.decode("utf-8", "replace").strip() or reason.replace("_", " ")
                body = GuardError(status, reason, text[:200], ()).body()
                headers["content-type"] = "application/json"
            headers["content-length"] = str(len(body))
        self.error_body = bytearray(body[:65536])
        await self._send({**self._start, "headers": headers.raw})
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    def _secure(self, headers: MutableHeaders) -> None:
        html = headers.get("content-type", "").startswith("text/html")
        headers["x-request-id"] = self.call.request_id
        headers["x-content-type-options"] = "nosniff"
        headers["x-frame-options"] = "DENY"
        headers["referrer-policy"] = "no-referrer"
        # The docs page (HTML) loads its own scripts; API answers need nothing at all; the web page its own files.
        headers["content-security-policy"] = (
            UI_CSP if self.ui else DOCS_CSP if html else "default-src 'none'; frame-ancestors 'none'"
        )
        if self.ui:
            headers["cache-control"] = "no-cache"  # revalidated (ETag): a new version of the page shows at once
        elif not self.static:
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
