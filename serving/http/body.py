"""The request body, bounded: read into a spool (canonicalising uploads) and replayed to the app.

A declared `Content-Length` over `max_request_bytes` gets 413 before a byte is
read; a streamed body stops being kept when it crosses the limit and gets 413
when it ends (read on and discarded for at most DRAIN_S seconds and another
`max_request_bytes`, so a client that sends a finite body reads the 413 instead
of a connection reset, and an endless one is cut off).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import BinaryIO

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers

from serving.http.multipart import MultipartCanon
from serving.http.responses import Call, GuardError, Message, Receive, Scope

CHUNK = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024  # bodies above this are spooled to a temporary file
DRAIN_S = 5.0


class ClientGone(Exception):
    """The client disconnected before its body arrived: nobody to answer."""


async def read_body(
    scope: Scope, receive: Receive, headers: Headers, call: Call, limit: int, field_name: str | None, max_files: int
) -> tuple[Scope, Receive, BinaryIO | None, list[tuple[int, int]]]:
    """Read the whole body (at most `limit` bytes) into a spool; return the scope and receive the app gets.

    `field_name` (upload routes only) is the multipart file field to canonicalise;
    the spool, if any, is the caller's to close once the app is done. The last item
    lists where each uploaded file's bytes lie in the spool (upload routes; else empty).
    """
    declared = headers.get("content-length")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GuardError(
            413,
            "request_too_large",
            f"the request body is {int(declared):,} bytes, over the limit of {limit:,} bytes",
            headers={"connection": "close"},
        )
    if not chunked and (declared is None or declared == "0") and field_name is None:
        return scope, receive, None, []  # no body: nothing to bound or rewrite
    canon: MultipartCanon | None = None
    spool: BinaryIO = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by caller
    try:
        if field_name is not None:
            media, params = parse_options_header(headers.get("content-type", ""))
            if media.lower() != b"multipart/form-data":
                raise GuardError(
                    415,
                    "unsupported_media_type",
                    f"send the {'images' if field_name.endswith('s') else 'image'} as multipart/form-data, "
                    f"in the file field '{field_name}'",
                    ("header", "content-type"),
                )
            if not params.get(b"boundary"):
                raise GuardError(400, "malformed_multipart", "the multipart Content-Type has no boundary")
            canon = MultipartCanon(params[b"boundary"], field_name, max_files, spool)
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
                call.request_bytes = received  # what did arrive (the log said 0)
                raise ClientGone()
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
    raw = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding", b"content-type")]
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

    return {**scope, "headers": raw}, replay, spool, (canon.parts if canon is not None else [])
