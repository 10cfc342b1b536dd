"""The project's load generator besides Locust: lean HTTP/1.1 over asyncio streams, pre-encoded requests.

The benchmark and the soak run on the same 2-core machine as the servers they
measure, so the generator's own CPU use is part of the measurement. This one
spends its time on socket writes and one small parse per answer. Each client
keeps one keep-alive `Connection` (reopened after an error or `Connection: close`).

- closed loop (`run_load`, `closed_loop`): N clients, each sending its next
  request as soon as the previous answer arrived; `measure_capacity` ramps N;
- open loop (`open_loop`): requests released on a fixed schedule whatever the
  answers do, latency counted from the scheduled release (no coordinated omission).

Every answer is checked (status 200, one well-formed prediction per image; for `POST /explain`
requests, kind "explain", a prediction with its heatmap or its refusal). An explain call the
server turns away (503, its slots taken) counts as `busy`, not as answered, and that client
waits `BUSY_BACKOFF_S` before its next request, as a client that honours Retry-After would.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from harness.payloads import LABELS, PlannedRequest, api_key_headers, well_formed
from harness.processes import system_busy_s

TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError)

BUSY = "busy (503, explain slots taken)"
BUSY_BACKOFF_S = 1.0
STAGGER_S = 0.025  # at most this long between two clients' first connections (within the warm-up)


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
            "failures": len([o for o in done if not o.ok and o.error != BUSY]),
            "busy": len([o for o in done if o.error == BUSY]),
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
            "by_kind": self.by_kind(),
        }

    def by_kind(self) -> dict[str, dict]:
        """Answered requests and their p50/p95 latency per request kind (e.g. "full": one full-size radiograph)."""
        kinds: dict[str, list[float]] = {}
        for o in self.outcomes:
            if o.ok:
                kinds.setdefault(o.kind, []).append((o.end - o.start) * 1000)
        return {kind: {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                       "p95_ms": round(float(np.percentile(ms, 95)), 1)} for kind, ms in sorted(kinds.items())}


def _key_lines() -> str:
    """The API key header of $PNEUMONIA_API_KEY as raw HTTP/1.1 lines ('' without one)."""
    return "".join(f"{name}: {value}\r\n" for name, value in api_key_headers().items())


def encode_requests(plan: list[PlannedRequest], url: str, path: str = "/classify") -> list[tuple[bytes, PlannedRequest]]:
    """Full HTTP/1.1 request bytes for each planned request."""
    host = urlsplit(url).netloc
    out = []
    for item in plan:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {item.content_type}\r\n"
            f"Content-Length: {len(item.body)}\r\nAccept: application/json\r\n{_key_lines()}\r\n"
        ).encode()
        out.append((head + item.body, item))
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after an error or a `Connection: close`."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one complete request and read its answer: (status, body). Raises TRANSPORT_ERRORS (and closes)."""
        if self.reader is not None and self.reader.at_eof():  # the server closed it while idle (keep-alive
            self.close()  # timeout, 5 s): a request on it failed, half of a slow soak's (2 req/s on 32 connections)
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout_s
                )
            self.writer.write(raw)
            await self.writer.drain()
            status, body, keep = await asyncio.wait_for(self._response(), self.timeout_s)
        except TRANSPORT_ERRORS:
            self.close()
            raise
        if not keep:
            self.close()
        return status, body

    async def _response(self) -> tuple[int, bytes, bool]:
        assert self.reader is not None
        reader = self.reader
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def encode_request(host: str, image: bytes, path: str = "/classify") -> bytes:
    """A complete keep-alive HTTP/1.1 POST with one image in the multipart field `images`."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="xray.jpeg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nAccept: application/json\r\n{_key_lines()}\r\n"
    ).encode()
    return head + body


def check_answer(status: int, body: bytes, images: int) -> str | None:
    """None when the answer holds one well-formed prediction per image, else what is wrong."""
    return read_answer(status, body, images)[0]


def read_answer(status: int, body: bytes, images: int) -> tuple[str | None, list[dict]]:
    """What is wrong with the answer (None: one well-formed prediction per image) and, when nothing is, its
    predictions: the body is parsed once."""
    if status != 200:
        return f"HTTP {status}", []
    try:
        predictions = json.loads(body)
    except ValueError:
        return "answer is not JSON", []
    if not isinstance(predictions, list) or len(predictions) != images:
        return "wrong number of predictions", []
    if any(not well_formed(p) for p in predictions):
        return "malformed prediction", []
    return None, predictions


def check_explanation(status: int, body: bytes) -> str | None:
    """None when a `POST /explain` answer holds a prediction with a heatmap (or a refusal without), else what is wrong."""
    if status == 503 and b"explain_busy" in body:
        return BUSY
    if status != 200:
        return f"HTTP {status}"
    try:
        answer = json.loads(body)
        prediction = answer["prediction"]
    except (ValueError, KeyError, TypeError):
        return "malformed explanation"
    if prediction.get("status") == "refused":
        return None if answer.get("heatmap") is None else "heatmap for a refused image"
    heatmap = answer.get("heatmap") or {}
    if prediction.get("label") not in LABELS or not heatmap.get("overlay_png") or not heatmap.get("grid"):
        return "malformed explanation"
    return None


async def _client(host: str, port: int, requests: list[tuple[bytes, PlannedRequest]], offset: int, stop_at: list[float],
                  outcomes: list[Outcome], timeout_s: float, delay_s: float = 0.0) -> None:
    """One closed-loop connection until `stop_at[0]` (a list: the window may be extended while the clients run)."""
    await asyncio.sleep(delay_s)
    connection = Connection(host, port, timeout_s)
    i = offset
    while time.perf_counter() < stop_at[0]:
        raw, planned = requests[i % len(requests)]
        i += 1
        start = time.perf_counter()
        error: str | None
        try:
            status, body = await connection.send(raw)
            if planned.kind == "explain":
                error = check_explanation(status, body)
            else:
                error = check_answer(status, body, len(planned.images))
        except TRANSPORT_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"[:120]
        outcomes.append(Outcome(start, time.perf_counter(), error is None, len(planned.images), planned.kind, error))
        if error == BUSY:
            await asyncio.sleep(BUSY_BACKOFF_S)
        elif error and connection.writer is None:
            await asyncio.sleep(0.05)  # do not spin on a refused connection
    connection.close()


async def _run(url: str, groups: list[tuple[list[tuple[bytes, PlannedRequest]], int]], warmup_s: float,
               window_s: float, timeout_s: float, cpu_probe: Callable[[], float | None]) -> list[LoadResult]:
    """Every group's clients at once, over one measurement window; one result per group (CPU figures are shared)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    outcomes: list[list[Outcome]] = [[] for _ in groups]
    begin = time.perf_counter()
    stop_at = [begin + warmup_s + window_s]
    # Clients connect one after another during the warm-up, as independent clients would, not all in the same
    # millisecond: a server whose workers share one listening socket (BentoML, uvicorn --workers) otherwise hands
    # every connection of the burst to whichever worker accepts first, and the measurement is of that imbalance.
    total = sum(clients for _, clients in groups)
    stagger = min(STAGGER_S, 0.5 * warmup_s / max(1, total))
    tasks = [
        asyncio.create_task(_client(host, port, requests, k * len(requests) // clients, stop_at, outcomes[g], timeout_s,
                                    delay_s=stagger * (sum(c for _, c in groups[:g]) + k)))
        for g, (requests, clients) in enumerate(groups)
        for k in range(clients)
    ]
    await asyncio.sleep(warmup_s)
    window_start, cpu_client0, cpu_server0, busy0 = time.perf_counter(), time.process_time(), cpu_probe(), system_busy_s()
    await asyncio.sleep(max(0.0, stop_at[0] - time.perf_counter()))
    # A window in which some group completed nothing measures nothing (a short smoke window on a loaded machine,
    # behind one slow call): it is extended until every group has completed a call in it, for at most timeout_s.
    give_up = stop_at[0] + timeout_s
    while (time.perf_counter() < give_up
           and any(not any(o.end >= window_start for o in done) for done in outcomes)):
        stop_at[0] = time.perf_counter() + 0.05
        await asyncio.sleep(0.05)
    window_end, cpu_client1, cpu_server1, busy1 = time.perf_counter(), time.process_time(), cpu_probe(), system_busy_s()
    await asyncio.gather(*tasks)  # let requests in flight finish (those ending later are not counted)
    results = []
    for (_, clients), done in zip(groups, outcomes):
        result = LoadResult(clients=clients, window_s=window_end - window_start)
        result.outcomes = [o for o in done if window_start <= o.end <= window_end]
        result.client_cpu_s = cpu_client1 - cpu_client0
        result.system_busy_s = busy1 - busy0
        if cpu_server0 is not None and cpu_server1 is not None:
            result.server_cpu_s = cpu_server1 - cpu_server0
        results.append(result)
    return results


def run_load(url: str, requests: list[tuple[bytes, PlannedRequest]], clients: int, warmup_s: float, window_s: float,
             timeout_s: float = 60.0, cpu_probe: Callable[[], float | None] = lambda: None) -> LoadResult:
    """Closed loop: `clients` connections, each sending its next request as soon as it has an answer.

    `cpu_probe()` returns the server's cumulative CPU seconds (or None); it is
    read at the edges of the measurement window.
    """
    return asyncio.run(_run(url, [(requests, clients)], warmup_s, window_s, timeout_s, cpu_probe))[0]


def run_mixed(url: str, groups: list[tuple[list[tuple[bytes, PlannedRequest]], int]], warmup_s: float, window_s: float,
              timeout_s: float = 60.0, cpu_probe: Callable[[], float | None] = lambda: None) -> list[LoadResult]:
    """`run_load` of several groups (requests, clients) side by side, e.g. classify clients beside explain clients."""
    return asyncio.run(_run(url, groups, warmup_s, window_s, timeout_s, cpu_probe))


# ---------------------------------------------------------------- single-image requests (soak, capacity)


ANSWERED = ("ok", "refused")  # `send_one` kinds of an answer: a verdict, or the validity gate's refusal


def answered(outcomes: Counter[str]) -> int:
    """How many requests of `outcomes` were answered (a verdict or a refusal); every other kind is a failure."""
    return sum(outcomes[kind] for kind in ANSWERED)


async def send_one(connection: Connection, raw: bytes) -> str:
    """'ok' (a verdict), 'refused' (the validity gate's answer), or what went wrong with a one-image request:
    `http_<status>`, `bad_body` or the error's class name."""
    try:
        status, body = await connection.send(raw)
    except TRANSPORT_ERRORS as exc:
        return type(exc).__name__
    if status != 200:
        return f"http_{status}"
    problem, predictions = read_answer(status, body, 1)
    if problem is not None:
        return "bad_body"
    return "refused" if predictions[0].get("status") == "refused" else "ok"


async def closed_loop(host: str, port: int, requests: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` connections back to back for `seconds`: successful requests per second and failures."""
    done: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def caller(index: int) -> None:
        connection, i = Connection(host, port, 60), index
        while time.monotonic() < deadline:
            kind = await send_one(connection, requests[i % len(requests)])
            done[kind] += 1
            i += clients
            if kind not in ANSWERED and connection.writer is None:
                await asyncio.sleep(0.05)  # as `_client`: a refused connection was retried ~12,000 times a second
        connection.close()

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    return {"clients": clients, "rps": round(answered(done) / elapsed, 2), "failures": sum(done.values()) - answered(done),
            "failure_kinds": {kind: n for kind, n in done.items() if kind not in ANSWERED}}


async def measure_capacity(host: str, port: int, requests: list[bytes], step_s: float) -> tuple[float, list[dict]]:
    """Best closed-loop throughput of a ramp of 1, 2, 4, ... 32 connections (stops once it no longer grows, or at a
    step whose every request failed: more connections to a dead or broken server measure nothing)."""
    await closed_loop(host, port, requests, 4, min(step_s, 5.0))  # warm the server; not counted
    steps: list[dict] = []
    for clients in (1, 2, 4, 8, 16, 32):
        step = await closed_loop(host, port, requests, clients, step_s)
        steps.append(step)
        print(f"  capacity ramp: {clients:2d} connections -> {step['rps']:.1f} req/s ({step['failures']} failed)",
              file=sys.stderr)
        if step["rps"] == 0 and step["failures"]:
            break
        if len(steps) >= 3 and step["rps"] < 1.03 * max(s["rps"] for s in steps[:-1]):
            break  # no longer growing: past the knee
    return max(s["rps"] for s in steps), steps


async def _cancel_until_done(tasks: list[asyncio.Task]) -> None:
    """Cancel `tasks` until each has ended. Python 3.11's `asyncio.wait_for` can swallow a cancellation that races
    an answer; the consumer then waited on its queue for ever, and a soak stopped with Ctrl-C never exited."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)


async def open_loop(host: str, port: int, requests: list[bytes], rate: float, seconds: float, connections: int,
                    max_queue: int, timeout_s: float, sample_s: float,
                    on_sample: Callable[[dict], None]) -> tuple[Counter[str], list[float]]:
    """Requests released at `rate`/s for `seconds` over `connections`, whatever the answers do.

    Returns outcome counts (`send_one` kinds, plus `client_queue_full` when the
    server fell `max_queue` requests behind) and the latency in seconds of every
    answered request, counted from the scheduled release (as in `LoadResult`, a
    failure's is left out: quick refusals pulled the percentiles down). Every
    `sample_s` seconds `on_sample` gets the figures since the last sample.
    Requests still unanswered
    `timeout_s + 10` s after the last release are given up: `unanswered_at_end`
    (sent) and `not_sent_at_end` (still queued), so every release is counted.
    """
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    window: list[float] = []
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=max_queue)
    in_flight = [0]

    async def consumer() -> None:
        connection = Connection(host, port, timeout_s)
        try:
            while (item := await queue.get()) is not None:
                scheduled, raw = item
                in_flight[0] += 1
                kind = await send_one(connection, raw)
                outcomes[kind] += 1
                in_flight[0] -= 1
                if kind in ANSWERED:
                    latencies.append(time.monotonic() - scheduled)
                    window.append(latencies[-1])
        finally:
            connection.close()

    def sample(t0: float) -> None:
        lat = np.array(window) * 1000
        on_sample({
            "t_s": round(time.monotonic() - t0, 1),
            "served": answered(outcomes),
            "failed": sum(outcomes.values()) - answered(outcomes),
            "queued": queue.qsize(),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        })
        window.clear()

    consumers = [asyncio.create_task(consumer()) for _ in range(connections)]
    try:
        t0 = time.monotonic()
        sample(t0)
        next_sample = t0 + sample_s
        for i in range(int(rate * seconds)):
            scheduled = t0 + i / rate
            now = time.monotonic()
            if now >= next_sample:
                sample(t0)
                next_sample += sample_s
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
            try:
                queue.put_nowait((scheduled, requests[i % len(requests)]))
            except asyncio.QueueFull:
                outcomes["client_queue_full"] += 1  # the server fell this far behind: counted as a failure
        for _ in consumers:
            await queue.put(None)
        # A server that accepts and never answers holds each request for timeout_s: the queue would take hours to
        # drain (the wait raised TimeoutError, and the soak wrote nothing). Give up on what is left, and count it.
        _, pending = await asyncio.wait(consumers, timeout=timeout_s + 10)
        if pending:
            await _cancel_until_done(consumers)
            unsent = sum(queue.get_nowait() is not None for _ in range(queue.qsize()))
            for kind, count in (("unanswered_at_end", in_flight[0]), ("not_sent_at_end", unsent)):
                if count:
                    outcomes[kind] += count
    finally:  # also on Ctrl-C (the main task cancelled): end every consumer before returning
        await _cancel_until_done(consumers)
    sample(t0)
    return outcomes, latencies
