"""Start-up checks, background warm-up and readiness of the service.

Three faults this module turns into clear, bounded behaviour (docs/hardening.md, "Faults"):

* A missing, unknown, corrupt or sha-mismatched model, bad configuration (an unknown
  `PNEUMONIA_*` variable included) or a gRPC port that cannot be bound stops
  `bentoml serve` before any worker starts, with one line on stderr and exit code 1.
  `load_settings` and service.py's `resolve_model` run when service.py is imported,
  its `preflight` and `check_grpc_port` in BentoML's `on_deployment` hook (the
  `bentoml serve` process, once). All raise `StartupError`, a BentoMLException, which
  the BentoML CLI prints as one line instead of a stack trace. Left to a worker, the
  same failure would crash it, and BentoML's process supervisor (circus) would
  restart it every 10 s forever.
* BentoML builds the service instance inside uvicorn's start-up, before the worker
  listens, so a model loaded in `__init__` leaves no window in which a client could
  be told "not ready": its connection just waits. `warm_up_in_background` loads and
  warms the model in a thread instead. The worker listens at once: /readyz says 503,
  and the HTTP guard (serving/http/admission.py) holds a classify request for at
  most `ready_wait_s` (long enough to cover a normal warm-up, so a restarted worker
  costs callers no errors) and then answers 503 with Retry-After rather than
  letting the caller time out; gRPC answers UNAVAILABLE at once. All of them read
  the one flag of this worker, `READINESS`.
* If the warm-up fails anyway (the preflight makes that an environmental problem,
  such as memory), the worker logs one line and exits with code 3; it never stays
  alive without a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from api.models import error_body
from settings import GrpcSettings, ServingSettings

logger = logging.getLogger("bentoml.pneumonia.lifecycle")

WARMUP_FAILED_EXIT_CODE = 3
NOT_READY_MESSAGE = "the model is still loading on this server; retry shortly"
NOT_READY_RETRY_AFTER_S = 5  # the Retry-After of that 503 (HTTP) or UNAVAILABLE (gRPC)


class WorkerRefused(Exception):
    """A call this worker turns away with 503 (gRPC UNAVAILABLE): `reason` is its code, `retry_after_s` its
    Retry-After (None: waiting will not help here). Said by the HTTP guard as the guard's JSON and by the gRPC
    servicer as UNAVAILABLE with trailers, since BentoML answers any 5xx an API raises with one generic sentence."""

    def __init__(self, message: str, reason: str, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.message, self.reason, self.retry_after_s = message, reason, retry_after_s

    def body(self) -> bytes:
        return error_body(self.message, [{"type": self.reason, "loc": [], "msg": self.message}])


class NotReady(WorkerRefused):
    """This worker's model was not warm within `ready_wait_s`."""

    def __init__(self, retry_after_s: int = NOT_READY_RETRY_AFTER_S) -> None:
        super().__init__(NOT_READY_MESSAGE, "not_ready", retry_after_s)


class StartupError(BentoMLException):
    """The service cannot start. `bentoml serve` prints the message on one line and exits with 1."""

    def __init__(self, message: str) -> None:
        # One line, even for pydantic's multi-line validation errors; their doc links add nothing here.
        super().__init__(" ".join(re.sub(r"For further information visit \S+", "", message).split()))


def load_settings() -> ServingSettings:
    """The serving configuration, or a `StartupError` naming each bad setting (runs at import)."""
    try:
        return ServingSettings()
    except ValidationError as exc:  # values are hidden in the message (hide_input_in_errors): they may be secrets
        raise StartupError(f"invalid configuration (PNEUMONIA_* variables or settings file): {exc}") from None
    except ValueError as exc:  # e.g. an unreadable PNEUMONIA_SETTINGS_FILE
        raise StartupError(f"invalid configuration: {exc}") from None


GRPC_WAYS_OUT = "set PNEUMONIA_GRPC__PORT to a free port or PNEUMONIA_GRPC__ENABLED=false"
GRPC_HOST_WAYS_OUT = "set PNEUMONIA_GRPC__HOST to an address of this machine or PNEUMONIA_GRPC__ENABLED=false"
_ANY_HOST = {"", "0.0.0.0", "::"}
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


# Set by BentoML's Docker image; its only effect (bentoml.serving.create_watcher) is that circus does not respawn a
# dead worker. A helper found a pod of two workers left with one after a crash, its probes still green, its
# autoscaling signal stuck at the dead worker's in-flight count.
CONTAINER_MARKER = "BENTOML_CONTAINERIZED"


def respawn_dead_workers() -> None:
    """Let circus replace a dead worker in a container as it does elsewhere: drop BentoML's container marker from
    this (`bentoml serve`) process before it makes its worker watchers. A replacement is warm in seconds and
    removes the dead worker's gauges; a pod restart takes longer and drops the survivor's calls too."""
    if os.environ.pop(CONTAINER_MARKER, None) is not None:
        logger.info("%s is set (BentoML's image): dead workers are replaced all the same", CONTAINER_MARKER)


def http_address() -> tuple[str, int]:
    """The host and port `bentoml serve` binds for HTTP: its --host/--port (or BENTOML_HOST/BENTOML_PORT), else
    BentoML's configured defaults. Read from the running CLI command, as the `on_deployment` hook runs inside it."""
    import click
    from bentoml._internal.configuration.containers import BentoMLContainer

    context = click.get_current_context(silent=True)
    params = context.params if context is not None else {}
    port = params.get("port")  # 0 is a port: any free one (`or` read it as unset and checked the default)
    return (str(params.get("host") or BentoMLContainer.http.host.get()),
            int(port if port is not None else BentoMLContainer.http.port.get()))


def follow_http_host(grpc: GrpcSettings, http_host: str) -> None:
    """An unset gRPC host becomes the HTTP host, here and in the workers.

    Runs in the `bentoml serve` process before the workers exist: circus copies this process's environment into
    each worker it starts, where `ServingSettings` reads the variable set here. Without it, `bentoml serve --host
    127.0.0.1` would keep HTTP on this machine and open gRPC to the network.
    """
    if not (grpc.host or "").strip():  # unset, or set empty (a compose file passing an unset variable through)
        grpc.host = http_host
        os.environ["PNEUMONIA_GRPC__HOST"] = http_host


# Memory of one worker at its peak under load (PSS, MiB): `python scripts/measure_memory.py`, docs/results/memory.json.
WORKER_MEMORY_MIB = 725


def available_memory_mib() -> float:
    """Memory this process tree may still use: the machine's available memory, or less under a cgroup limit
    (a container's), which the machine's figures do not show."""
    import psutil

    available = psutil.virtual_memory().available / 2**20
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2, then v1
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (cgroup / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # v1 writes a huge number for "no limit"
                available = min(available, (int(limit) - int((cgroup / usage_file).read_text())) / 2**20)
            break
        except (OSError, ValueError):
            continue
    return available


def memory_warning(workers: int, available_mib: float) -> str | None:
    """A warning when `workers` will not fit in `available_mib` (each holds a model and a torch runtime)."""
    needed = workers * WORKER_MEMORY_MIB
    if needed <= available_mib:
        return None
    return (f"{workers} workers need about {needed / 1024:.1f} GiB ({WORKER_MEMORY_MIB} MiB each under load, "
            f"docs/deploy.md) and {available_mib / 1024:.1f} GiB is available: expect workers killed for memory; "
            "set PNEUMONIA_WORKERS lower")


_GRPC_PORT_HELD: dict[tuple[str, int], list[socket.socket]] = {}  # open for the life of the `bentoml serve` process


def check_http_port(host: str, port: int) -> None:
    """Refuse an HTTP port another process listens on with one line: circus found it taken after this hook and
    `bentoml serve` ended in a 57-line traceback (a helper's find). Probed as the gRPC port is (SO_REUSEADDR: a port
    with connections in TIME_WAIT is free); not held: BentoML binds it right after this hook. Port 0 (any free
    port) is not probed."""
    if port == 0:
        return
    if not 0 < port <= 65535:  # 70000 was bound as 4464 (modulo 65536), -5 a 47-line traceback from circus
        raise StartupError(f"cannot serve: the HTTP port {port} is not a port (1-65535); choose another with "
                           "`bentoml serve --port N` (`PORT=N ./dev.sh serve`)")
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # BentoML's own message names the host
    taken = [exc for exc in _probe(addresses)[1] if exc.errno in (errno.EADDRINUSE, errno.EACCES)]
    if taken:
        raise StartupError(f"cannot serve: the HTTP port {host}:{port} cannot be bound ({taken[0].strerror}); "
                           "choose another with `bentoml serve --port N` (`PORT=N ./dev.sh serve`)")


def check_bentoml_config(service_name: str, ours: dict[str, tuple[Any, str]]) -> None:
    """Refuse a BentoML configuration (`BENTOML_CONFIG`, `BENTOML_CONFIG_OVERRIDES`) that sets what a `PNEUMONIA_*`
    setting sizes. `ours` maps a key under `services.<name>` (dotted) to (our value, the setting's variable).

    BentoML's file wins over the service's decorator: with `workers: 4` there, four workers ran while each sized
    its torch threads, memory warning and share of the HTTP calls for the setting's count, and `/health` reported
    the setting (a helper's find). One place decides each of these; the other one is refused, naming it."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    effective = BentoMLContainer.config.services[service_name].get() or {}
    for key, (value, variable) in ours.items():
        found: Any = effective
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found != value:
            raise StartupError(
                f"invalid configuration: BentoML's configuration (BENTOML_CONFIG or BENTOML_CONFIG_OVERRIDES) sets "
                f"services.{service_name}.{key} to {found!r}, but this service sizes itself from {variable} "
                f"({value!r}); remove it from BentoML's configuration and set {variable} instead")


def check_grpc_port(grpc: GrpcSettings, http_host: str, http_port: int) -> None:
    """Bind the gRPC host:port once in the `bentoml serve` process before any worker starts, then hold it.

    The workers bind it later with SO_REUSEPORT (serving/grpc/server.py); a port they cannot have would crash
    every one of them in its start-up hook, and circus would restart them forever. The probe sets SO_REUSEADDR
    (as gRPC does: a port with connections in TIME_WAIT is free) but not SO_REUSEPORT, so a port another process
    listens on is refused even when that process shares it with SO_REUSEPORT (a second server on the default
    gRPC port). The HTTP port is bound only after this hook, so the probe cannot see it taken: the gRPC port
    equal to the HTTP port is checked by number.

    Once the probe passes, the port is bound again with SO_REUSEPORT, never listened on (no connection is routed
    to it), and held while `bentoml serve` runs. This server's workers can still bind it; anyone else's plain
    bind, and the probe of a second server started in the seconds before these workers listen, are refused.
    Without the hold, two servers started together both passed the probe and then silently shared the port;
    the probe and the hold of two servers take turns on a lock file, so one always meets the other's hold.
    """
    host = (grpc.host or "").strip("[]")
    if (host, grpc.port) in _GRPC_PORT_HELD:  # checked before in this process: the probe would meet the hold
        return
    hosts = {host, http_host.strip("[]")}
    if grpc.port == http_port and (len(hosts) == 1 or hosts & _ANY_HOST or hosts <= _LOOPBACK):
        raise StartupError(f"cannot serve: the gRPC port {grpc.address} is also the HTTP port "
                           f"({http_host}:{http_port}); {GRPC_WAYS_OUT}")
    try:
        addresses = socket.getaddrinfo(host or None, grpc.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot serve: the gRPC host {grpc.host!r} does not resolve ({exc.strerror}); "
                           f"{GRPC_HOST_WAYS_OUT}") from None
    with _port_lock(grpc.port):  # two servers checking at the same instant: one at a time, so one meets the hold
        _probe_and_hold(grpc, host, addresses)


@contextlib.contextmanager
def _port_lock(port: int) -> Iterator[None]:
    """An exclusive lock on a file named after `port` in the temporary directory (best effort: none if the file
    cannot be opened, e.g. another user's).

    The holder removes the file before letting go (every start left one behind: 166 in /tmp after a day of
    tests); a waiter that then gets the lock of a removed file opens the new one and waits again."""
    path = Path(tempfile.gettempdir()) / f"pneumonia-grpc-port-{port}.lock"
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield
            return
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break  # the file still at the path: the lock is ours
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it, so no one can lock this file and believe it current
        os.close(descriptor)  # releases the lock


def _probe_and_hold(grpc: GrpcSettings, host: str, addresses: list[tuple]) -> None:
    """Refuse a port that cannot be bound (see `check_grpc_port`), else hold it for the life of this process."""
    bindable, failures = _probe(addresses)
    taken = [exc for exc in failures if exc.errno in (errno.EADDRINUSE, errno.EACCES)]
    if taken or (failures and len(failures) == len(addresses)):  # taken, or no address of the host can be bound
        exc = (taken or failures)[0]
        ways_out = GRPC_HOST_WAYS_OUT if exc.errno == errno.EADDRNOTAVAIL else GRPC_WAYS_OUT
        raise StartupError(f"cannot serve: the gRPC port {grpc.address} cannot be bound ({exc.strerror}); {ways_out}")
    _GRPC_PORT_HELD[(host, grpc.port)] = [held for address in bindable if (held := _hold(*address)) is not None]


def _probe(addresses: list[tuple]) -> tuple[list[tuple], list[OSError]]:
    """Bind each of `getaddrinfo`'s addresses once and let go: the (family, kind, proto, sockaddr) that could be
    bound, and the errors of those that could not. SO_REUSEADDR (a port with connections in TIME_WAIT is free),
    not SO_REUSEPORT (a port another process listens on is taken, even one it shares)."""
    bindable: list[tuple] = []
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                bindable.append((family, kind, proto, sockaddr))
            except OSError as exc:
                failures.append(exc)
    return bindable, failures


def _hold(family: int, kind: int, proto: int, sockaddr: tuple) -> socket.socket | None:
    """A bound, never listening SO_REUSEPORT socket on `sockaddr` (see `check_grpc_port`); None if it cannot be
    had (the probe passed, so the workers will bind: the hold only narrows a race)."""
    held = socket.socket(family, kind, proto)
    try:  # not SO_REUSEADDR: Linux lets two SO_REUSEADDR sockets share a port that no one listens on
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(sockaddr)
    except OSError as exc:
        held.close()
        logger.warning("the gRPC port %s is not held until the workers bind it (%s)", sockaddr, exc.strerror)
        return None
    return held


def forget_dead_workers(folder: str | None = None) -> list[int]:
    """Remove the live gauges of worker processes that died without removing them (SIGKILL, the OOM killer);
    the pids removed. Returns at once outside multiprocess mode.

    prometheus_client removes a process's `livesum` / `liveall` files only when that process calls
    `mark_process_dead` (BentoML does so in `__del__`): a killed worker's in-flight count stayed in
    `bentoml_service_request_in_progress`, the autoscaler's signal (docs/deploy.md), until the pod restarted,
    and its `pneumonia_model_info` series beside its replacement's. The replacement worker calls this at warm-up,
    where a failure would end it: a file it cannot remove is a warning, never an exception.
    Counters and histograms of dead workers stay: they are totals."""
    folder = folder or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return []
    pids = set()
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            pids.add(int(pid))
    from prometheus_client import multiprocess

    for pid in sorted(pids):
        try:
            multiprocess.mark_process_dead(pid, folder)
        except FileNotFoundError:  # another replacement worker removed them first (both workers were killed)
            pass
        except OSError as exc:
            logger.warning("could not remove the gauges of dead worker %d: %s", pid, exc)
    if pids:
        logger.info("worker %d: removed the live gauges of dead worker(s) %s", os.getpid(), sorted(pids))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Readiness:
    """Whether this worker process has a loaded, warm model: the one flag /readyz, /health, the HTTP guard and gRPC read."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def ready(self) -> bool:
        return self._event.is_set()

    def mark_ready(self) -> None:
        self._event.set()

    async def wait_async(self, timeout: float, poll_s: float = 0.05) -> bool:
        """Wait without blocking the event loop; returns readiness."""
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.ready


READINESS = Readiness()


def hold(delay_s: float, release_file: Path | None = None, poll_s: float = 0.05) -> None:
    """Sleep `delay_s`, or less once `release_file` exists (the warm-up knobs; both unset in production)."""
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        if release_file is not None and release_file.exists():
            return
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def warm_up_in_background(work: Callable[[], None], delay_s: float = 0.0,
                          then: Callable[[], None] | None = None, release_file: Path | None = None) -> threading.Thread:
    """Run `work` (load and warm the model) in a daemon thread, then mark this worker ready.

    `delay_s` is the PNEUMONIA_WARMUP_DELAY_S test/ops knob: it widens the
    not-ready window so tests can observe it; production leaves it at 0. With
    `release_file` (PNEUMONIA_WARMUP_RELEASE_FILE) the window ends as soon as that
    file exists, so a test holds the server not-ready exactly while it checks.
    `then` runs after the worker is marked ready (what only some calls need, e.g.
    the explainers of /explain); its failure is logged and the worker lives on.
    """

    def run() -> None:
        started = time.monotonic()
        try:
            if delay_s:
                hold(delay_s, release_file)
            work()
        except BaseException as exc:  # noqa: BLE001 - a worker without a model must not live on
            message = f"model warm-up failed, worker {os.getpid()} exits: {type(exc).__name__}: {exc}"
            logger.critical(message)
            print(message, file=sys.stderr, flush=True)
            os._exit(WARMUP_FAILED_EXIT_CODE)
        READINESS.mark_ready()
        logger.info("worker %d ready: model warm after %.2f s", os.getpid(), time.monotonic() - started)
        if then is not None:
            try:
                then()
            except Exception:  # noqa: BLE001 - logged; the calls that need it answer 503 saying so
                logger.exception("worker %d: warm-up after readiness failed", os.getpid())

    thread = threading.Thread(target=run, name="model-warm-up", daemon=True)
    thread.start()
    return thread
