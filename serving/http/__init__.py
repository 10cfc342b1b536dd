"""The HTTP front door of every worker: one ASGI middleware (`HttpGuard`), split by concern.

- `guard.py`: the middleware itself, which runs the steps below in order and writes the request log;
- `admission.py`: API keys, rate limits and readiness: may this request go on, and when;
- `body.py`: the bounded body: 413 over `max_request_bytes`, streamed bodies cut off;
- `multipart.py`: the canonical multipart rewrite of upload routes;
- `responses.py`: refusals (`GuardError`, JSON bodies of api.models) and the headers on every response.
"""

from serving.http.guard import HttpGuard

__all__ = ["HttpGuard"]
