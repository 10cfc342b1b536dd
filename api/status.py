"""Status mapping between the transports, and the header / metadata names both use.

    400 invalid image / no images          -> INVALID_ARGUMENT
    400 too many bytes / pixels / images   -> RESOURCE_EXHAUSTED
    413, 429                               -> RESOURCE_EXHAUSTED
    401 / 403                              -> UNAUTHENTICATED / PERMISSION_DENIED
    503 (overloaded, not ready)            -> UNAVAILABLE
    504                                    -> DEADLINE_EXCEEDED
    anything else                          -> INTERNAL

gRPC codes are given by name (`grpc.StatusCode[name]`), so this module needs no grpc import.
"""

from __future__ import annotations

from collections.abc import Sequence

from api.reasons import LIMIT_REASONS

HTTP_TO_GRPC: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

API_KEY_HEADER = "x-api-key"  # or `Authorization: Bearer KEY`; the same names as gRPC metadata
REQUEST_ID_HEADER = "x-request-id"  # HTTP response header, gRPC trailing metadata
RETRY_AFTER_HEADER = "retry-after"  # seconds, with 429 / RESOURCE_EXHAUSTED from the rate limit
REASONS_METADATA_KEY = "pneumonia-reject-reasons"  # gRPC trailing metadata: comma-separated reason codes


def grpc_code_name(http_status: int, reasons: Sequence[str] = ()) -> str:
    """The gRPC status (by name) that answers what HTTP answers with `http_status` and these reasons.

    RESOURCE_EXHAUSTED only when every reason is a limit: a request that is also malformed is INVALID_ARGUMENT
    whatever the order of its images."""
    if http_status == 400 and reasons and all(reason in LIMIT_REASONS for reason in reasons):
        return "RESOURCE_EXHAUSTED"
    return HTTP_TO_GRPC.get(http_status, "INTERNAL")
