"""One exception family for both transports, so callers handle HTTP and gRPC failures alike."""

from __future__ import annotations

from api.reasons import LIMIT_REASONS

__all__ = ["LIMIT_REASONS", "AuthenticationError", "ClientError", "DeadlineExceeded", "InvalidInput", "LimitExceeded",
           "RateLimited", "ServerError", "Unavailable"]


class ClientError(Exception):
    """A failed call. `status` is the HTTP status or gRPC status name; `reasons` the server's rejection codes;
    `retry_after_s` how long the server asked the caller to wait (its Retry-After), else None."""

    exit_code = 1

    def __init__(self, message: str, *, status: str | int | None = None, reasons: tuple[str, ...] = (),
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reasons = reasons
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.message} [{self.status}]" if self.status is not None else self.message


class InvalidInput(ClientError):
    """The server refused an input: not an image, corrupt, too small, none sent (400 / INVALID_ARGUMENT)."""

    exit_code = 3


class LimitExceeded(InvalidInput):
    """An input is over a size limit: bytes, pixels, images per request, request size (RESOURCE_EXHAUSTED / 413)."""


class Unavailable(ClientError):
    """The server cannot be reached, is still loading or is overloaded (connection error, 503 / UNAVAILABLE)."""

    exit_code = 4


class RateLimited(Unavailable):
    """The server asked the caller to slow down (429 / RESOURCE_EXHAUSTED): this client's rate limit (reason
    `rate_limited`) or the server's limit on calls in flight. Nothing was wrong with the input: retry after
    `retry_after_s` (when the server said), as for any busy server."""


class DeadlineExceeded(ClientError):
    """No answer within the timeout."""

    exit_code = 4


class AuthenticationError(ClientError):
    """Missing or refused credentials (401 / 403, UNAUTHENTICATED / PERMISSION_DENIED)."""

    exit_code = 5


class ServerError(ClientError):
    """Anything else the server got wrong (5xx / INTERNAL / UNKNOWN)."""

    exit_code = 5
