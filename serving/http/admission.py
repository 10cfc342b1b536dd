"""May this request go on, and when: API keys and rate limits (serving/security.py), then readiness.

Keys and limits: 401 without saying what was wrong (one answer for a missing,
malformed or wrong key), 429 with `Retry-After`. Probes, docs, static assets and
the web page's files (/ui, which asks for the key itself) are open and never
throttled; /health and /metrics are open unless protected.

Readiness: a model route called before this worker is warm waits up to
`ready_wait_s` (the second or two a freshly (re)started worker needs), then gets
a JSON 503 with Retry-After instead of being left to its timeout. The wait
comes after the body checks, and no image is decoded for a request that gets it.
"""

from __future__ import annotations

import math

from starlette.datastructures import Headers

from serving.http.responses import STATIC_PREFIXES, Call, GuardError, Scope, Send, is_ui, send_json
from serving.lifecycle import NOT_READY_RETRY_AFTER_S, READINESS, NotReady
from serving.security import API_KEY_HEADER, UNAUTHENTICATED_MESSAGE, AccessPolicy, presented_key

PROBE_PATHS = frozenset({"/livez", "/healthz", "/readyz"})
DOC_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
SYSTEM_PATHS = PROBE_PATHS | DOC_PATHS | {"/metrics"}  # BentoML's own routes, beside the service's APIs


class Admission:
    """The access rules of one worker for HTTP: which paths need a key, which are rate limited, which need a model."""

    def __init__(
        self,
        policy: AccessPolicy,
        protect_health: bool,
        protect_metrics: bool,
        model_paths: frozenset[str],
        ready_wait_s: float,
        retry_after_s: float = NOT_READY_RETRY_AFTER_S,
    ) -> None:
        self.policy = policy
        self.open_paths = set(PROBE_PATHS | DOC_PATHS)
        if not protect_health:
            self.open_paths.add("/health")
        if not protect_metrics:
            self.open_paths.add("/metrics")
        self.unlimited_paths = set(SYSTEM_PATHS)  # probes and scrapers are never throttled
        self.model_paths = model_paths
        self.ready_wait_s = ready_wait_s
        self.retry_after = str(max(1, math.ceil(retry_after_s)))

    def admit(self, scope: Scope, headers: Headers, call: Call) -> None:
        """Raise `GuardError` (401 or 429) unless the client may go on; records how it authenticated."""
        path = scope["path"]
        static = path.startswith(STATIC_PREFIXES) or is_ui(path)
        protected = path not in self.open_paths and not static
        limited = path not in self.unlimited_paths and not static
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
            raise GuardError(401, "unauthorized", UNAUTHENTICATED_MESSAGE, (), headers={"www-authenticate": "Bearer"})

    async def wait_until_ready(self, scope: Scope, send: Send) -> bool:
        """True when the request may reach the model; otherwise it has been answered 503 (not counted as refused)."""
        if READINESS.ready or scope["path"] not in self.model_paths:
            return True
        if await READINESS.wait_async(self.ready_wait_s):
            return True
        await send_json(send, 503, NotReady().body(), {"retry-after": self.retry_after})
        return False
