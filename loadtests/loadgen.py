"""A lean closed-loop HTTP/1.1 load generator (asyncio streams, pre-encoded requests).

The benchmark runs on the same 2-core machine as the servers it measures, so the
generator's own CPU use is part of the measurement. This one spends its time on
socket writes and one small JSON parse per answer: each of N clients keeps one
keep-alive connection, sends its next pre-built request as soon as the previous
answer arrived, and checks the answer (status 200, one well-formed prediction
per image). Its CPU time is measured and reported with every figure.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import psutil

from loadtests.samples import PlannedRequest

LABELS = frozenset({"NORMAL", "PNEUMONIA"})


@dataclass(frozen=True)
class Outcome:
    start: float
    end: float
    ok: bool
    images: int
    kind: str
    error: str | None = None


@dataclass
class LoadResult:
    """Figures over the measurement window: the requests completed inside it (closed-loop throughput)."""

    clients: int
    window_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    system_busy_s: float = 0.0  # all processes on the machine, to expose other load (a shared machine)

    def summary(self) -> dict:
        done = self.outcomes
        ok = [o for o in done if o.ok]
        latencies = np.array([(o.end - o.start) * 1000 for o in ok]) if ok else np.array([np.nan])
        errors: dict[str, int] = {}
        for o in done:
            if not o.ok:
                errors[o.error or "?"] = errors.get(o.error or "?", 0) + 1
        return {
            "clients": self.clients,
            "window_s": round(self.window_s, 2),
            "requests": len(done),
            "images": sum(o.images for o in ok),
            "failures": len(done) - len(ok),
            "requests_per_s": round(len(ok) / self.window_s, 2),
            "images_per_s": round(sum(o.images for o in ok) / self.window_s, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "max_ms": round(float(latencies.max()), 1),
            "server_cpu_cores": None if self.server_cpu_s is None else round(self.server_cpu_s / self.window_s, 2),
            "client_cpu_cores": round(self.client_cpu_s / self.window_s, 3),
            "client_cpu_ms_per_request": round(1000 * self.client_cpu_s / max(1, len(done)), 3),
            "other_cpu_cores": round(
                max(0.0, self.system_busy_s - self.client_cpu_s - (self.server_cpu_s or 0.0)) / self.window_s, 2
            ),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        }


def encode_requests(plan: list[PlannedRequest], url: str, path: str = "/classify") -> list[tuple[bytes, PlannedRequest]]:
    """Full HTTP/1.1 request bytes for each planned request."""
    host = urlsplit(url).netloc
    out = []
    for item in plan:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {item.content_type}\r\n"
            f"Content-Length: {len(item.body)}\r\nAccept: application/json\r\n\r\n"
        ).encode()
        out.append((head + item.body, item))
    return out


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("the server closed the connection")
    status = int(line.split()[1])
    length, chunked, keep = None, False, True
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        key, _, value = header.partition(b":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif key == b"connection" and value == b"close":
            keep = False
    if chunked:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif length is not None:
        body = await reader.readexactly(length)
    else:
        body, keep = await reader.read(), False
    return status, body, keep


def check_answer(status: int, body: bytes, images: int) -> str | None:
    """None when the answer holds one well-formed prediction per image, else what is wrong."""
    if status != 200:
        return f"HTTP {status}"
    try:
        predictions = json.loads(body)
    except ValueError:
        return "answer is not JSON"
    if not isinstance(predictions, list) or len(predictions) != images:
        return "wrong number of predictions"
    if any(not isinstance(p, dict) or p.get("label") not in LABELS for p in predictions):
        return "malformed prediction"
    return None


async def _client(host: str, port: int, requests: list[tuple[bytes, PlannedRequest]], offset: int, stop_at: float,
                  outcomes: list[Outcome], timeout_s: float) -> None:
    reader = writer = None
    i = offset
    while time.perf_counter() < stop_at:
        raw, planned = requests[i % len(requests)]
        i += 1
        start = time.perf_counter()
        error: str | None
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
            writer.write(raw)
            await writer.drain()
            status, body, keep = await asyncio.wait_for(_read_response(reader), timeout_s)
            error = check_answer(status, body, len(planned.images))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            error, keep = f"{type(exc).__name__}: {exc}"[:120], False
        outcomes.append(Outcome(start, time.perf_counter(), error is None, len(planned.images), planned.kind, error))
        if not keep and writer is not None:
            writer.close()
            reader = writer = None
        if error and writer is None:
            await asyncio.sleep(0.05)  # do not spin on a refused connection
    if writer is not None:
        writer.close()


async def _run(url: str, requests: list[tuple[bytes, PlannedRequest]], clients: int, warmup_s: float, window_s: float,
               timeout_s: float, cpu_probe) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    outcomes: list[Outcome] = []
    begin = time.perf_counter()
    stop_at = begin + warmup_s + window_s
    tasks = [
        asyncio.create_task(_client(host, port, requests, k * len(requests) // clients, stop_at, outcomes, timeout_s))
        for k in range(clients)
    ]
    await asyncio.sleep(warmup_s)
    window_start, cpu_client0, cpu_server0, busy0 = time.perf_counter(), time.process_time(), cpu_probe(), system_busy_s()
    await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
    window_end, cpu_client1, cpu_server1, busy1 = time.perf_counter(), time.process_time(), cpu_probe(), system_busy_s()
    await asyncio.gather(*tasks)  # let requests in flight finish (those ending later are not counted)
    result = LoadResult(clients=clients, window_s=window_end - window_start)
    result.outcomes = [o for o in outcomes if window_start <= o.end <= window_end]
    result.client_cpu_s = cpu_client1 - cpu_client0
    result.system_busy_s = busy1 - busy0
    if cpu_server0 is not None and cpu_server1 is not None:
        result.server_cpu_s = cpu_server1 - cpu_server0
    return result


def system_busy_s() -> float:
    """CPU seconds all processes on the machine have used (busy = total - idle - iowait)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def wait_for_quiet(max_other_cores: float = 0.25, timeout_s: float = 120.0, sample_s: float = 1.0) -> float:
    """Wait (up to `timeout_s`) until other processes use less than `max_other_cores`; returns the last reading.

    Call it while the measured server is idle: on a shared machine someone else's
    job would otherwise be measured as the server's slowness.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        busy0, own0 = system_busy_s(), time.process_time()
        time.sleep(sample_s)
        other = max(0.0, system_busy_s() - busy0 - (time.process_time() - own0)) / sample_s
        if other < max_other_cores or time.monotonic() > deadline:
            return round(other, 2)


def run_load(url: str, requests: list[tuple[bytes, PlannedRequest]], clients: int, warmup_s: float, window_s: float,
             timeout_s: float = 60.0, cpu_probe=lambda: None) -> LoadResult:
    """Closed loop: `clients` connections, each sending its next request as soon as it has an answer.

    `cpu_probe()` returns the server's cumulative CPU seconds (or None); it is
    read at the edges of the measurement window.
    """
    return asyncio.run(_run(url, requests, clients, warmup_s, window_s, timeout_s, cpu_probe))
