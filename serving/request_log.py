"""The service's own request log: one JSON line per HTTP request or gRPC Classify call, and nothing a client sent.

A line carries the server's request id (also returned as `X-Request-ID`), the
matched route, status, duration, how many images were sent and why any were
refused. It never carries image bytes, file names, client addresses or other
client-supplied identifiers unless `request_log.client_identifiers` is on
(settings.py). BentoML's own text access log is switched off in service.py
because this log replaces it, and BentoML's traceback for a refused upload is
dropped here because pydantic prints the upload's temporary path, which ends
in the client's file name.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from settings import RequestLogSettings

LOGGER_NAME = "pneumonia.request"
# BentoML logs every API exception here, client validation errors included.
BENTOML_API_LOGGER = "bentoml._internal.server.http_app"
# A client's own X-Request-ID, used only with request_log.client_identifiers.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class JsonLineFormatter(JsonFormatter):
    """`{"ts": ..., "level": ..., "logger": ..., **fields}` on one compact line (python-json-logger)."""

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name"],
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            json_serializer=functools.partial(json.dumps, separators=(",", ":")),
            json_default=str,
            json_ensure_ascii=True,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")


class DropClientInputTracebacks(logging.Filter):
    """Drops BentoML's 'Exception on /classify' records caused by refused client input.

    They repeat what the request log already says, at ERROR level (an alert per bad
    upload), and their pydantic message quotes the refusal, which can hold a DICOM
    tag's text. Installed whatever `client_identifiers` says: with them on, every
    refused upload wrote a 20-line traceback (a helper's find).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ValidationError)


def configure(settings: RequestLogSettings) -> logging.Logger:
    """The request logger of this worker (idempotent; call once the server has configured logging)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h.formatter, JsonLineFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)  # where BentoML's own server logs go
        handler.setFormatter(JsonLineFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.disabled = not settings.enabled
    api_logger = logging.getLogger(BENTOML_API_LOGGER)
    if not any(isinstance(f, DropClientInputTracebacks) for f in api_logger.filters):
        api_logger.addFilter(DropClientInputTracebacks())
    return logger


def printable(raw: bytes | str, limit: int = 64) -> str:
    """A client's file name as the log keeps it: characters that are not printable as '?', at most `limit` of them
    (one rule for both transports: gRPC's names were logged as sent, at any length)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def log_request(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """One request line: `event` first, then `fields` in their order."""
    logger.info({"event": "request", **fields})


# Fresh ids: 32 hex digits like a uuid4's, a random prefix per process and a counter. A uuid4 per request read the
# kernel's random source each time, a visible share of a worker's event loop. Ids must be unique, not secret.
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()


def request_id(supplied: str | None, settings: RequestLogSettings) -> str:
    """The id of one request: the client's own (sane) id only when client identifiers are on, else a fresh one."""
    if settings.client_identifiers and supplied and CLIENT_REQUEST_ID.fullmatch(supplied):
        return supplied
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"
