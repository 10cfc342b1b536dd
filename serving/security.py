"""Access control shared by the HTTP guard (serving/http/admission.py) and the gRPC interceptor.

One `AccessPolicy` per worker process answers, for one call, "may this client
go on?": a constant-time API-key check over every configured key, then a
per-client token bucket. Transports only differ in where they find the key
(`X-API-Key` / `Authorization: Bearer` headers or gRPC metadata) and how they
say no (401/429 or UNAUTHENTICATED/RESOURCE_EXHAUSTED), so both call `check`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from api.status import API_KEY_HEADER
from settings import SecuritySettings

__all__ = ["API_KEY_HEADER", "GRPC_UNAUTHENTICATED_MESSAGE", "UNAUTHENTICATED_MESSAGE", "AccessPolicy", "Decision", "KeyRing", "RateLimiter",
           "client_label", "presented_key", "shared_policy"]


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key a client presented: `X-API-Key: KEY` or `Authorization: Bearer KEY`."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured API keys, kept only as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, presented: str | None) -> bool:
        """True when `presented` equals one of the keys.

        Digests have one length, and every key is compared whatever the outcome,
        so the time taken says nothing about which key, or how much of it, matched.
        """
        candidate = _digest(presented if presented is not None else "")
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and presented is not None


def client_label(key: str) -> str:
    """A short, non-reversible name for a key, used as its rate-limit bucket."""
    return "key:" + hashlib.sha256(b"pneumonia-rate-limit:" + key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class RateLimiter:
    """Token buckets per client: `burst` calls at once, then `per_minute` sustained.

    Thread-safe (gRPC and HTTP share it); the least recently seen clients are
    forgotten beyond `max_clients`, so a flood of addresses cannot exhaust memory.
    """

    def __init__(
        self, per_minute: float, burst: int, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, updated)
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until the next token."""
        with self._lock:
            now = self.clock()
            tokens, updated = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


Outcome = Literal["allowed", "unauthenticated", "rate_limited"]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    retry_after_s: int = 0  # whole seconds, for Retry-After (rate_limited only)
    authenticated: bool = False

    @property
    def allowed(self) -> bool:
        return self.outcome == "allowed"


UNAUTHENTICATED_MESSAGE = "a valid API key is required (X-API-Key header or Authorization: Bearer)"
GRPC_UNAUTHENTICATED_MESSAGE = "a valid API key is required (metadata x-api-key, or authorization: Bearer KEY)"


class AccessPolicy:
    """API keys and rate limits of one worker, from `settings.security`."""

    def __init__(self, settings: SecuritySettings) -> None:
        self.settings = settings
        self.keys = KeyRing(settings.keys())
        limits = settings.rate_limit
        self.limiter = (
            RateLimiter(limits.requests_per_minute, limits.burst, limits.max_clients) if limits.enabled else None
        )

    def check(self, key: str | None, address: str, *, protected: bool, limited: bool = True) -> Decision:
        """Decide one call.

        `protected`: the call needs a key (ignored when no keys are configured).
        A valid key names the client's bucket; otherwise its address does, so
        guessing keys is rate limited too and cannot mint fresh buckets.
        """
        authenticated = self.keys.enabled and key is not None and self.keys.authenticate(key)
        if self.limiter is not None and limited:
            wait = self.limiter.acquire(client_label(key) if authenticated and key else "ip:" + address)
            if wait > 0:
                return Decision("rate_limited", retry_after_s=max(1, math.ceil(wait)), authenticated=authenticated)
        if protected and self.keys.enabled and not authenticated:
            return Decision("unauthenticated")
        return Decision("allowed", authenticated=authenticated)


_SHARED: dict[int, AccessPolicy] = {}
_SHARED_LOCK = threading.Lock()


def shared_policy(settings: SecuritySettings) -> AccessPolicy:
    """The one policy of this process for these settings, so HTTP and gRPC calls share rate-limit buckets."""
    with _SHARED_LOCK:
        policy = _SHARED.get(id(settings))
        if policy is None or policy.settings is not settings:
            policy = _SHARED[id(settings)] = AccessPolicy(settings)
        return policy
