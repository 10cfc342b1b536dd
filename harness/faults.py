"""Fault drills against a real `bentoml serve`: steady load, a killed worker, SIGTERM under load.

tests/test_faults.py runs them and asserts bounds; scripts/fault_*.py run the same
functions and print the measured figures. Every request goes to the server's
127.0.0.1 port, and every experiment is bounded in requests and time. The drill's
load is a few httpx clients (not harness.loadgen): a failed request is named by
httpx's error class (ConnectError, RemoteProtocolError, ReadError), which is what
the fault tests' bounds are stated in.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from harness.payloads import xray_payloads
from harness.processes import established_connections, wait_for_workers, worker_pids
from harness.servers import ServerProcess

# --------------------------------------------------------------------------- outcomes and load


@dataclass(frozen=True)
class Outcome:
    """One request: monotonic start and end, HTTP status or the transport error's class name."""

    start: float
    end: float
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def kind(self) -> str:
        return f"http_{self.status}" if self.status is not None else (self.error or "error")


def post_images(client: httpx.Client, url: str, images: list[bytes], check: bool = True) -> Outcome:
    """POST images to /classify; a 200 must carry one prediction per image or it counts as `bad_body`."""
    files = [("images", (f"xray-{i}.png", data)) for i, data in enumerate(images)]
    start = time.monotonic()
    try:
        response = client.post(url + "/classify", files=files)
    except httpx.HTTPError as exc:
        return Outcome(start, time.monotonic(), None, type(exc).__name__)
    end = time.monotonic()
    if response.status_code == 200 and check:
        body = response.json()
        if not (isinstance(body, list) and len(body) == len(images) and all("label" in p for p in body)):
            return Outcome(start, end, None, "bad_body")
    return Outcome(start, end, response.status_code)


class SteadyLoad:
    """Closed-loop load: `clients` threads, each with its own connection pool, send one image per request."""

    def __init__(self, url: str, payloads: list[bytes], clients: int = 4, timeout_s: float = 30.0,
                 max_requests: int = 100_000) -> None:
        self.url = url
        self.payloads = payloads
        self.clients = clients
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            i = index
            while not self._stop.is_set():
                outcome = post_images(client, self.url, [self.payloads[i % len(self.payloads)]])
                i += self.clients
                with self._lock:
                    self.outcomes.append(outcome)
                    if len(self.outcomes) >= self.max_requests:
                        self._stop.set()

    def successes(self) -> int:
        with self._lock:
            return sum(o.ok for o in self.outcomes)

    def start(self) -> "SteadyLoad":
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        with self._lock:
            return sorted(self.outcomes, key=lambda o: o.start)


def longest_success_gap(outcomes: list[Outcome], start: float, end: float) -> float:
    """Longest interval in [start, end] in which no request completed successfully (the outage clients saw)."""
    marks = [start, *sorted(o.end for o in outcomes if o.ok and start <= o.end <= end), end]
    return max(b - a for a, b in zip(marks, marks[1:]))


# --------------------------------------------------------------------------- worker killed with SIGKILL


@dataclass
class WorkerKillResult:
    workers: int
    clients: int
    killed_pid: int
    replacement_pid: int | None
    requests_before_kill: int
    failures_before_kill: int
    requests_after_kill: int
    failures_after_kill: int
    failure_kinds: dict[str, int]
    replacement_spawned_s: float | None  # kill -> a new worker process exists (the arbiter noticed)
    replacement_ready_s: float | None  # kill -> the new worker's model is warm (it logs "worker PID ready")
    first_success_after_kill_s: float | None
    longest_gap_s: float  # longest time without a successful answer, from the kill to the end
    window_s: float
    served_while_replacing: int  # successes that ended after the kill and before the replacement was warm
    # With every original worker stopped (SIGSTOP) once the replacement is warm: how fresh connections ended.
    # Only the replacement can accept them, so "http_200" here is the replacement answering.
    replacement_probe_kinds: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def probe_with_stopped(pids: list[int], url: str, payload: bytes, probes: int = 4,
                       timeout_s: float = 60.0) -> dict[str, int]:
    """SIGSTOP `pids`, send `probes` requests on fresh connections, SIGCONT them; how each request ended.

    The workers share one listening socket: a stopped worker accepts nothing, so every probe is
    answered (or not) by the workers left running.
    """
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        outcomes = []
        for _ in range(probes):
            with httpx.Client(timeout=timeout_s) as client:
                outcomes.append(post_images(client, url, [payload]))
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    return dict(Counter(o.kind for o in outcomes))


def worker_kill_experiment(server: ServerProcess, payloads: list[bytes], workers: int, clients: int = 4,
                           warm_s: float = 3.0, settle_s: float = 3.0, recover_timeout_s: float = 120.0,
                           timeout_s: float = 60.0, min_successes_before_kill: int = 0,
                           probe_replacement: bool = False) -> WorkerKillResult:
    """Under closed-loop load, SIGKILL one worker; measure failures and how long until it is replaced and warm.

    The kill comes after `warm_s` seconds of load and at least `min_successes_before_kill` answers (so a slow
    machine still has a load in full swing when it happens). `probe_replacement`: once the replacement is warm
    and the load has stopped, stop the other workers and check that the replacement answers by itself.
    """
    assert server.process is not None
    serve_pid = server.process.pid
    before = wait_for_workers(serve_pid, workers)
    log_offset = len(server.logs())
    load = SteadyLoad(server.url, payloads, clients=clients, timeout_s=timeout_s).start()
    try:
        time.sleep(warm_s)
        deadline = time.monotonic() + recover_timeout_s
        while load.successes() < min_successes_before_kill:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {min_successes_before_kill} answers in {recover_timeout_s} s of load")
            time.sleep(0.05)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replacement: int | None = None
        spawned_at = ready_at = None
        deadline = killed_at + recover_timeout_s
        while time.monotonic() < deadline and ready_at is None:
            if replacement is None:
                new = [p for p in worker_pids(serve_pid) if p not in before]
                if new:
                    replacement, spawned_at = new[0], time.monotonic()
            elif re.search(rf"worker {replacement} ready", server.logs()[log_offset:]):
                ready_at = time.monotonic()
            time.sleep(0.05)
        time.sleep(settle_s)
        ended_at = time.monotonic()
    finally:
        outcomes = load.stop()
    probe_kinds: dict[str, int] = {}
    if probe_replacement and ready_at is not None:
        probe_kinds = probe_with_stopped([p for p in before if p != victim], server.url, payloads[0])
    before_kill = [o for o in outcomes if o.end < killed_at]
    after_kill = [o for o in outcomes if o.end >= killed_at]
    successes = [o.end for o in after_kill if o.ok]
    return WorkerKillResult(
        workers=workers,
        clients=clients,
        killed_pid=victim,
        replacement_pid=replacement,
        requests_before_kill=len(before_kill),
        failures_before_kill=sum(not o.ok for o in before_kill),
        requests_after_kill=len(after_kill),
        failures_after_kill=sum(not o.ok for o in after_kill),
        failure_kinds=dict(Counter(o.kind for o in outcomes if not o.ok)),
        replacement_spawned_s=None if spawned_at is None else round(spawned_at - killed_at, 2),
        replacement_ready_s=None if ready_at is None else round(ready_at - killed_at, 2),
        first_success_after_kill_s=round(min(successes) - killed_at, 2) if successes else None,
        longest_gap_s=round(longest_success_gap(after_kill, killed_at, ended_at), 2),
        window_s=round(ended_at - killed_at, 2),
        served_while_replacing=sum(o.ok and o.end < (ready_at if ready_at is not None else ended_at) for o in after_kill),
        replacement_probe_kinds=probe_kinds,
    )


# --------------------------------------------------------------------------- SIGTERM under load


@dataclass
class DrainResult:
    in_flight: int  # requests the worker had accepted when SIGTERM was sent
    in_flight_ok: int
    in_flight_kinds: dict[str, int]
    in_flight_finished_after_term_s: float  # SIGTERM -> last in-flight answer
    late_kinds: dict[str, int]  # requests sent after SIGTERM: how each ended
    late_max_s: float  # the longest any of them waited for its answer or refusal
    exit_code: int | None
    exit_after_term_s: float | None
    images_per_request: int
    late_sent: int = 0  # requests sent after SIGTERM (the one after the exit included); `late` holds those that ended
    late: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def sigterm_experiment(server: ServerProcess, heavy_images: list[bytes], in_flight: int = 4,
                       late_every_s: float = 0.25, late_max: int = 40, exit_timeout_s: float = 90.0,
                       accept_timeout_s: float = 30.0) -> DrainResult:
    """Send `in_flight` heavy requests, SIGTERM `bentoml serve` once the worker holds all of them, then keep
    sending small requests until the server is gone; report how each group ended."""
    assert server.process is not None
    serve_pid = server.process.pid
    workers = wait_for_workers(serve_pid, 1)
    small = xray_payloads(2)[:1]
    heavy_outcomes: list[Outcome] = []
    lock = threading.Lock()

    def heavy() -> None:
        with httpx.Client(timeout=120) as client:
            outcome = post_images(client, server.url, heavy_images)
        with lock:
            heavy_outcomes.append(outcome)

    threads = [threading.Thread(target=heavy, daemon=True) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + accept_timeout_s
    while established_connections(workers, server.port) < in_flight:
        if time.monotonic() > deadline or heavy_outcomes:
            raise RuntimeError(
                f"the worker accepted {established_connections(workers, server.port)} of {in_flight} heavy requests "
                f"({len(heavy_outcomes)} already done); make them heavier"
            )
        time.sleep(0.01)
    os.kill(serve_pid, signal.SIGTERM)
    term_at = time.monotonic()
    late: list[Outcome] = []
    late_threads: list[threading.Thread] = []

    def late_request() -> None:
        with httpx.Client(timeout=60) as client:  # a fresh connection, as a new caller would open
            outcome = post_images(client, server.url, small)
        with lock:
            late.append(outcome)

    while server.process.poll() is None and len(late_threads) < late_max:
        late_threads.append(threading.Thread(target=late_request, daemon=True))
        late_threads[-1].start()
        time.sleep(late_every_s)
    try:
        server.process.wait(timeout=max(1.0, exit_timeout_s - (time.monotonic() - term_at)))
        exit_code, exited_at = server.process.returncode, time.monotonic()
    except Exception:  # noqa: BLE001 - reported as "did not exit"
        exit_code, exited_at = None, None
    for thread in threads + late_threads:
        thread.join(timeout=65)
    with httpx.Client(timeout=10) as client:  # after exit: refused at once
        late.append(post_images(client, server.url, small))
    return DrainResult(
        in_flight=in_flight,
        in_flight_ok=sum(o.ok for o in heavy_outcomes),
        in_flight_kinds=dict(Counter(o.kind for o in heavy_outcomes)),
        in_flight_finished_after_term_s=round(max((o.end for o in heavy_outcomes), default=term_at) - term_at, 2),
        late_kinds=dict(Counter(o.kind for o in late)),
        late_max_s=round(max((o.end - o.start for o in late), default=0.0), 2),
        exit_code=exit_code,
        exit_after_term_s=None if exited_at is None else round(exited_at - term_at, 2),
        images_per_request=len(heavy_images),
        late_sent=len(late_threads) + 1,
        late=[{"sent_after_term_s": round(o.start - term_at, 2), "took_s": round(o.end - o.start, 2), "kind": o.kind}
              for o in sorted(late, key=lambda o: o.start)],
    )


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
