"""`HttpGuard`: the pure ASGI middleware around the BentoML app, outermost of the service's own.

What it does to each request, in order:

1. gives it a request id (returned as `X-Request-ID`), and on the way out adds
   security headers to every response and writes one JSON line to the request
   log (serving/request_log.py) (responses.py);
2. answers CORS preflights for the configured origins (off by default);
3. checks the API key and the client's rate limit (admission.py);
4. bounds the body (body.py) and, on upload routes, rewrites the multipart
   body into a canonical one (multipart.py);
5. holds a model route for a worker that is still warming up, then 503 (admission.py);
6. on /explain, takes one of the worker's explain slots for the call, or answers
   503 with Retry-After at once when none is free (serving/explain.py);
7. on routes with a decoder (/classify), decodes the uploaded files on threads
   before the app parses the request, and hands the outcomes to the app's
   validator (decoding.py).

Error bodies have the shape of `api.models.ErrorBody`, which is also the shape
of BentoML's validation errors: `{"error": "...", "detail": [{"type", "loc", "msg"}]}`.
Registered in service.py with `PneumoniaClassifier.add_asgi_middleware(HttpGuard, ...)`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from api.models import error_body
from serving import request_log
from serving.explain import ExplainRefused, ExplainSlots
from serving.http.admission import PROBE_PATHS, SYSTEM_PATHS, Admission
from serving.http.body import ClientGone, read_body
from serving.http.openapi import OPENAPI_PATH, published
from serving.http.decoding import PREDECODED, Predecoder
from serving.http.responses import (
    REFUSED,
    UI_PATH,
    ASGIApp,
    Call,
    GuardError,
    Receive,
    Responder,
    Scope,
    Send,
    reject,
    route_label,
    send_json,
)
from serving.security import API_KEY_HEADER, shared_policy
from settings import ServingSettings

_LOG = logging.getLogger(__name__)

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CALL = "pneumonia.call"


class HttpGuard:
    """ASGI middleware: request id, security headers, CORS, auth, rate limit, body checks, readiness, request log.

    `upload_routes` maps a POST route to its multipart file field, e.g. {"/classify": "images"};
    those routes also wait for the model (readiness). A field named in the singular
    ("image") takes one file, a plural one up to `max_images_per_request`.
    `explain_slots` maps a route to the slots that bound its calls in this worker.
    `decoders` maps a route to the function that decodes one of its uploads on `decode_pool` (decoding.py).
    """

    def __init__(self, app: ASGIApp, settings: ServingSettings, upload_routes: dict[str, str],
                 explain_slots: dict[str, ExplainSlots] | None = None,
                 decoders: dict[str, Callable[[bytes, float], Any]] | None = None,
                 decode_pool: Executor | None = None, openapi: Callable[[], dict[str, Any]] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.upload_routes = dict(upload_routes)
        self.explain_slots = dict(explain_slots or {})
        # Without a pool (PNEUMONIA_DECODE_THREADS=0) the app's validator decodes, on the event loop.
        self.decoders = {route: Predecoder(decode, decode_pool) for route, decode in (decoders or {}).items()
                         if decode_pool is not None}
        security = settings.security
        self.admission = Admission(
            shared_policy(security),
            protect_health=security.protect_health,
            protect_metrics=security.protect_metrics,
            model_paths=frozenset(self.upload_routes),
            ready_wait_s=settings.ready_wait_s,
        )
        self.logger = request_log.configure(settings.request_log)
        logging.getLogger("python_multipart").setLevel(logging.ERROR)  # our 400s say it; no warning per bad body
        self.known_routes = set(SYSTEM_PATHS | {"/health"} | set(self.upload_routes))
        self.entry: ASGIApp = self._checked
        # /docs.json as the service answers (serving/http/openapi.py), made once on the first request for it
        self.openapi = openapi
        self._openapi_body: bytes | None = None
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
        call = Call(
            request_id=request_log.request_id(headers.get("x-request-id"), self.settings.request_log),
            started=time.perf_counter(),
        )
        scope = dict(scope)
        scope[_CALL] = call
        responder = Responder(send, call, scope["path"], https=scope.get("scheme") == "https")
        try:
            await self.entry(scope, receive, responder.send)
        except Exception:
            # A failure here (a bug, a setting no validator foresaw) left BentoML's timeout middleware waiting: the
            # client got a plain-text 500 after PNEUMONIA_TIMEOUT_S, the log no traceback.
            _LOG.exception("request %s failed before its answer", call.request_id)
            if call.status:  # the answer had started: nothing more can be said on this connection
                raise
            await send_json(responder.send, 500, error_body(
                f"internal error: the server failed on this request (request id {call.request_id}; the server's "
                "log has the details)", [{"type": "internal_error", "loc": [], "msg": "internal error"}]), {})
        finally:
            if scope["path"] not in PROBE_PATHS:
                self._log(scope, headers, call, responder)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        call: Call = scope[_CALL]
        if scope["path"] == UI_PATH:  # any method: Starlette's router redirected them all
            # Starlette's own redirect to /ui/ is absolute, built from the Host header: another host for a forged
            # one, http:// behind a TLS proxy. A relative one stays on the address the browser used, prefix included.
            query = scope.get("query_string", b"")
            location = "ui/" + (f"?{query.decode('latin-1')}" if query else "")
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = Headers(scope=scope)
        field_name = self.upload_routes.get(scope["path"]) if scope["method"] == "POST" else None
        max_files = self.settings.max_images_per_request if field_name is None or field_name.endswith("s") else 1
        try:
            self.admission.admit(scope, headers, call)
            body_scope, body_receive, spool, parts = await read_body(
                scope, receive, headers, call, self.settings.max_request_bytes, field_name, max_files,
            )
        except GuardError as exc:
            call.reasons = exc.reasons
            await reject(send, exc)
            return
        except ClientGone:
            # Nobody to answer (the server drops what is sent), but an answer must start: BentoML's timeout middleware
            # waits for one until PNEUMONIA_TIMEOUT_S, and its in-progress gauge (the autoscaler's in-flight signal)
            # counted each abandoned upload as a call in flight for that long.
            await send_json(send, 400, error_body("the client disconnected before its upload arrived",
                                                  [{"type": "client_gone", "loc": [], "msg": "client disconnected"}]), {})
            call.status = 499  # the log's name for it (nginx's), not the status that was never delivered
            return
        if self.openapi is not None and scope["path"] == OPENAPI_PATH and scope["method"] == "GET":
            if self._openapi_body is None:
                security = self.settings.security
                self._openapi_body = json.dumps(published(
                    self.openapi(), self.upload_routes, keys=bool(security.keys()),
                    protect_health=security.protect_health)).encode()
            await send_json(send, 200, self._openapi_body, {})
            return
        slots = self.explain_slots.get(scope["path"]) if field_name is not None else None
        held = False
        try:
            if await self.admission.wait_until_ready(body_scope, send):
                if slots is not None:
                    try:
                        slots.acquire()
                        held = True
                        await slots.wait_available(self.settings.ready_wait_s)
                    except ExplainRefused as refused:  # busy, loading or broken: before the image is decoded
                        call.reasons = [refused.reason]
                        REFUSED.labels(status="503", reason=refused.reason).inc()
                        wait = refused.retry_after_s
                        await send_json(send, 503, refused.body(), {} if wait is None else {"retry-after": str(wait)})
                        return
                decoder = self.decoders.get(scope["path"]) if field_name is not None else None
                if decoder is not None and spool is not None and parts:
                    token = PREDECODED.set(await decoder.run(spool, parts))
                    try:
                        await self.app(body_scope, body_receive, send)
                    finally:
                        PREDECODED.reset(token)
                else:
                    await self.app(body_scope, body_receive, send)
        finally:
            if held and slots is not None:
                slots.release()
            call.route = getattr(body_scope.get("route"), "path", None)  # set by the router
            if spool is not None:
                spool.close()

    def _log(self, scope: Scope, headers: Headers, call: Call, responder: Responder) -> None:
        route = call.route or route_label(scope["path"], self.known_routes)
        fields: dict[str, Any] = {
            "request_id": call.request_id,
            "transport": "http",
            "method": scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER",
            "route": route,
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
