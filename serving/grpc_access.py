"""API keys and rate limits on the gRPC endpoint: the same `AccessPolicy` as HTTP, as an interceptor.

The key comes from metadata `x-api-key: KEY` or `authorization: Bearer KEY`;
the client is the peer address when no valid key names it. A refused call
ends with UNAUTHENTICATED (one message whatever was wrong) or
RESOURCE_EXHAUSTED with a `retry-after` trailer in seconds. Health checks and
reflection stay open and unthrottled, like /livez, /readyz and the docs page.

A call that passes is marked as checked when the endpoint forwards it to the
HTTP API in process (`security.internal_headers()`), so it is not checked twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from serving.security import API_KEY_HEADER, UNAUTHENTICATED_MESSAGE, AccessPolicy, presented_key, shared_policy
from settings import SecuritySettings


def peer_address(peer: str | None) -> str:
    """'ipv4:10.0.0.5:51234' -> '10.0.0.5'; 'ipv6:[::1]:5' -> '::1'; anything else as is."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks `protected` methods for a key and rate-limits `limited` ones (full names, '/pkg.Service/Method')."""

    def __init__(self, policy: AccessPolicy, protected: Iterable[str], limited: Iterable[str]) -> None:
        self.policy = policy
        self.protected = frozenset(protected)
        self.limited = frozenset(limited)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        protected, limited = method in self.protected, method in self.limited
        if handler is None or handler.unary_unary is None or not (protected or limited):
            return handler
        metadata = {key.lower(): value for key, value in (handler_call_details.invocation_metadata or ())}
        key = presented_key(_text(metadata.get(API_KEY_HEADER)), _text(metadata.get("authorization")))
        behaviour = handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            decision = self.policy.check(key, peer_address(context.peer()), protected=protected, limited=limited)
            if decision.outcome == "rate_limited":
                wait = decision.retry_after_s
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many requests from this client; retry after {wait} s",
                    trailing_metadata=(("retry-after", str(wait)),),
                )
            if decision.outcome == "unauthenticated":
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def classifier_access(security: SecuritySettings, service_name: str) -> AccessInterceptor:
    """The interceptor for `service_name` (e.g. pneumonia.v1.Classifier): the HTTP rules, method by method."""
    classify, info = f"/{service_name}/Classify", f"/{service_name}/GetModelInfo"
    protected = {classify} | ({info} if security.protect_health else set())
    return AccessInterceptor(shared_policy(security), protected=protected, limited={classify, info})
