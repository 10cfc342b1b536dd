"""Uploads decoded on threads, not on the event loop: the guard decodes, the API's validator picks the result up.

Every upload is decoded and validated before it may join a batch (a bad file gets
its own 400 and never fails a batch). BentoML runs that validation while it parses
the request, on the worker's event loop, one image after another: under load the
loop of a worker spent most of its time in JPEG decoding while the other core, or
this worker's inference thread, waited (docs/performance.md). PIL releases the
GIL while it decodes and resizes, so decoding on threads lets one worker use more
than one core and keeps its loop free to read the next requests.

The guard has every file of an upload route's body in its spool once the body is
checked (serving/http/body.py); `Predecoder.run` decodes them all at once on a
small thread pool and the guard hands the outcomes (a result or the exception the
decoder raised, per canonical file name `image-<k>`) to the app through the
context variable `PREDECODED`. The API's validator (service.py) takes an image's
outcome from there instead of decoding it again; refusals keep their exact 400.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import Any, BinaryIO

# The outcomes of the current request's uploads by canonical file name, while the app handles it; else None.
PREDECODED: ContextVar[dict[str, Any] | None] = ContextVar("pneumonia_predecoded", default=None)


class Predecoder:
    """Decode the files of one request at once on `pool`, the worker's decode threads (service.py)."""

    def __init__(self, decode: Callable[[bytes, float], Any], pool: Executor) -> None:
        self.decode = decode
        self.pool = pool

    async def run(self, spool: BinaryIO, parts: list[tuple[int, int]]) -> dict[str, Any]:
        received = time.perf_counter()
        position = spool.tell()
        datas = []
        for start, end in parts:  # read here, on the loop: the spool is one file object (memory, or disk if large)
            spool.seek(start)
            datas.append(spool.read(end - start))
        spool.seek(position)
        loop = asyncio.get_running_loop()
        outcomes = await asyncio.gather(*(loop.run_in_executor(self.pool, self._one, data, received) for data in datas))
        return {f"image-{k}": outcome for k, outcome in enumerate(outcomes)}

    def _one(self, data: bytes, received: float) -> Any:
        try:
            return self.decode(data, received)
        except Exception as exc:  # noqa: BLE001 - handed to the validator, which refuses or re-raises it
            return exc
