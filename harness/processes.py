"""Probes of a running server's process tree: its workers, memory, CPU, connections and log."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import psutil

from harness.servers import ServerProcess

# `bentoml serve` is a circus arbiter; each worker runs this module (see _bentoml_impl/server/serving.py).
WORKER_MODULE = "_bentoml_impl.worker.service"
MB = 1024 * 1024


def worker_pids(serve_pid: int) -> list[int]:
    """Pids of the live HTTP workers under a `bentoml serve` process."""
    try:
        children = psutil.Process(serve_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            if WORKER_MODULE in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                pids.append(child.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the whole server)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def wait_for_workers(serve_pid: int, count: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(serve_pid)
        if len(pids) >= count:
            return pids
        time.sleep(0.2)
    raise TimeoutError(f"{count} workers did not appear under pid {serve_pid} within {timeout}s")


def wait_for_log(server: ServerProcess, pattern: str, timeout: float, since: int = 0) -> float | None:
    """Monotonic time at which `pattern` (a regex) appeared in the server log after offset `since`, else None."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        if regex.search(server.logs()[since:]):
            return time.monotonic()
        time.sleep(0.1)
    return None


def established_connections(pids: list[int], port: int) -> int:
    """TCP connections on `port` that the given processes have accepted (kernel-queued ones are not counted)."""
    count = 0
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        count += sum(1 for c in connections if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
    return count


def wait_until_workers_warm(server: ServerProcess, workers: int, timeout: float = 120.0) -> list[int]:
    """The worker pids, once each has logged that its model is warm."""
    assert server.process is not None
    pids = wait_for_workers(server.process.pid, workers, timeout)
    for pid in pids:
        if wait_for_log(server, rf"worker {pid} ready", timeout) is None:
            raise TimeoutError(f"worker {pid} did not become ready in {timeout}s:\n{server.logs()[-3000:]}")
    return pids


def process_rss(pid: int | None) -> dict[str, float]:
    """RSS in MB of each process of the server tree (arbiter first), for reports."""
    if not pid:
        return {}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            out[str(process.pid)] = round(process.memory_info().rss / MB, 1)
    return out


def tree_cpu_probe(pid: int) -> Callable[[], float | None]:
    """A probe of the cumulative CPU seconds of a process and all its descendants (None once it is gone)."""
    def probe() -> float | None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total
    return probe


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
