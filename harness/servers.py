"""Real servers as subprocesses: free loopback ports, start, wait until warm, always stop; model stores."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx
import psutil

from client import TLS
from harness.paths import ROOT, VENV_BIN


# How long the tests wait for a subprocess or a server before calling it hung. Not a speed bound: beside a
# CPU-heavy job at normal priority (the tests at nice 19), a start or a CLI call that needs seconds on an idle
# machine has taken over 10 minutes on the 2-core VM.
HANG_S = 1200.0
# Starts of one server that may fail on a port another process bound first (see ServerProcess.start).
BIND_ATTEMPTS = 3


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, not handed out to another harness recently.

    A port the kernel hands out for bind(0) comes from the same range as the source ports of outgoing
    connections; on a busy machine one of those took such a port in the seconds before `bentoml serve`
    bound it ("Address already in use"). Below the range only another listener can take it, and the
    reservation below keeps parallel test processes from picking the same one before either has bound it.
    """
    high = _ephemeral_low() - 1
    low = max(1025, high - 12000)
    _sweep_stale_once()
    for port in random.SystemRandom().sample(range(low, high + 1), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if _reserve(port):
            return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


_RESERVATIONS = Path(tempfile.gettempdir()) / f"pneumonia-harness-ports-{os.getuid()}"
_RESERVATION_S = 3600.0  # a reservation older than this is free again (its server is long gone or bound)
_swept = False


def _reserve(port: int) -> bool:
    """Claim `port` for this process across processes (a file created exclusively, holding this process's pid);
    False if claimed already.

    Where the folder cannot be written, the port is used unclaimed (the start's retry still covers a collision).
    """
    path = _RESERVATIONS / str(port)
    try:
        _RESERVATIONS.mkdir(exist_ok=True)
        if path.exists() and time.time() - path.stat().st_mtime < _RESERVATION_S:
            return False
        path.unlink(missing_ok=True)  # stale, or not there
        with open(path, "x") as claim:
            claim.write(str(os.getpid()))
    except FileExistsError:  # another process claimed it just now
        return False
    except OSError:
        return True
    return True


def release_port(port: int | None) -> None:
    """Drop this process's claim on `port` (its server stopped): every call left a file for ever (1,721 had piled up).
    A claim of another process (another pid in the file) is left alone. Never raises."""
    if port is None:
        return
    path = _RESERVATIONS / str(port)
    try:
        if path.read_text() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _sweep_stale_once() -> None:
    """Remove the claims older than _RESERVATION_S, which every process already treats as free (those of ports
    handed out but never served, of killed runs), once per process. A process claiming such a port at the same
    moment may lose its claim, as when two claim it together: a start's retry covers that collision."""
    global _swept
    if _swept:
        return
    _swept = True
    now = time.time()
    try:
        paths = list(_RESERVATIONS.iterdir())
    except OSError:
        return
    for path in paths:
        try:
            if now - path.stat().st_mtime >= _RESERVATION_S:
                path.unlink()
        except OSError:
            continue


class ServerExited(RuntimeError):
    """A started server exited: the full text keeps its log's tail (for tests); `summary` is one line for a
    command to print (a benchmark with a bad --service-env printed a 14-frame traceback)."""

    def __init__(self, code: int | None, log_path: Path, log_tail: str) -> None:
        super().__init__(f"server exited with {code}:\n{log_tail}")
        errors = [line.strip() for line in log_tail.splitlines() if line.strip().startswith("Error:")]
        last = errors[-1] if errors else next((line.strip() for line in reversed(log_tail.splitlines()) if line.strip()),
                                              "no output")
        self.summary = f"the server exited with {code} before it was ready: {last[:600]} (log: {log_path})"


@dataclass
class ServerProcess:
    """A server subprocess in its own process group, logging to a file."""

    args: list[str]
    port: int
    env: dict[str, str]
    log_path: Path
    cwd: Path = ROOT
    grpc_port: int | None = None
    scratch_dirs: list[Path] = field(default_factory=list)  # removed by stop()
    # Readiness is per worker (BentoML's /readyz answers for the worker that took the call), so a
    # multi-worker service is ready for measurements only once every worker has logged a warm model.
    warm_workers: int = 0
    # HTTPS (`bentoml serve --ssl-*`): how this harness trusts the server (and, for mutual TLS, proves who it is).
    tls: TLS | None = None
    # Other servers (the benchmark's peers) name the log line each of their workers writes once warm, with its pid
    # as the first group; it is then waited for whatever `ready_path` is.
    warm_pattern: str | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    started_at: float | None = field(default=None, init=False)  # time.monotonic() when the process was started
    # In the environment of the server and every process it starts: circus puts each worker in a process group
    # of its own, so a worker outlives a SIGKILL of the server's group; this finds it (`kill_leftovers`).
    token: str = field(default_factory=lambda: uuid.uuid4().hex, init=False)

    def __post_init__(self) -> None:
        self.env = {**self.env, SERVER_TOKEN: self.token}

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx's `verify` needs to reach this server (True: plain HTTP or the system's trust store)."""
        return self.tls.ssl_context() if self.tls is not None else True

    def http_client(self, timeout: float = 120.0, **headers: str) -> httpx.Client:
        """An httpx client of this server (its base URL and TLS trust), sending `headers` with every request."""
        return httpx.Client(base_url=self.url, verify=self.verify(), timeout=timeout, headers=headers)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, ready_timeout: float = HANG_S, ready_path: str = "/readyz",
              fresh_ports_on_conflict: bool = True) -> "ServerProcess":
        """Start and wait until ready; `ready_timeout` is a hang detector (HANG_S), not a speed bound.

        A port picked by free_port() stays unbound until the server binds it: another server started meanwhile
        (a parallel test) may pick and bind it first. Such a start fails with "Address already in use"; it is
        retried on fresh ports, not reported, unless `fresh_ports_on_conflict` is False (a test of that refusal).
        """
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                return self._start_once(ready_timeout, ready_path)
            except RuntimeError as error:
                if (attempt == BIND_ATTEMPTS or not fresh_ports_on_conflict
                        or "address already in use" not in str(error).lower()):
                    raise
                self._move_to_fresh_ports()
        raise AssertionError("unreachable")

    def _move_to_fresh_ports(self) -> None:
        release_port(self.port)
        release_port(self.grpc_port)
        self.port = free_port()
        self.args[self.args.index("--port") + 1] = str(self.port)
        if self.grpc_port is not None:
            self.grpc_port = free_port()
            self.env["PNEUMONIA_GRPC__PORT"] = str(self.grpc_port)

    def _start_once(self, ready_timeout: float, ready_path: str) -> "ServerProcess":
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + ready_timeout
            with httpx.Client(verify=self.verify(), timeout=2) as probe:
                while time.monotonic() < deadline:
                    if self.process.poll() is not None:
                        raise ServerExited(self.process.returncode, self.log_path, self.logs()[-4000:])
                    try:
                        if probe.get(self.url + ready_path).status_code == 200 and (
                            (ready_path != "/readyz" and self.warm_pattern is None) or self._workers_warm()
                        ):
                            return self
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.5)
            raise TimeoutError(f"server not ready after {ready_timeout}s:\n{self.logs()[-4000:]}")
        except BaseException:  # not ready, or interrupted while waiting: never leave it running
            self.stop()
            raise

    def _workers_warm(self) -> bool:
        pattern = self.warm_pattern or r"worker (\d+) ready: model warm"
        return len(set(re.findall(pattern, self.logs()))) >= self.warm_workers

    def wait_for_explainers(self, timeout: float = 120.0) -> "ServerProcess":
        """Wait until every worker has logged its explainers ready (they load after readiness, for /explain)."""
        deadline = time.monotonic() + timeout
        while len(re.findall(r"explainers ready", self.logs())) < max(1, self.warm_workers):
            if self.process is not None and self.process.poll() is not None:
                raise ServerExited(self.process.returncode, self.log_path, self.logs()[-4000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"explainers not ready after {timeout}s:\n{self.logs()[-4000:]}")
            time.sleep(0.2)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        try:
            self._terminate(timeout)
        finally:
            for path in self.scratch_dirs:
                shutil.rmtree(path, ignore_errors=True)
            release_port(self.port)
            release_port(self.grpc_port)

    def _terminate(self, timeout: float) -> None:
        # No process: never started, or a SIGTERM raised inside Popen after the exec (the server runs, unrecorded).
        # A dead arbiter (crashed, killed): its orphaned workers may not have died. Either way, by the token.
        if self.process is None or self.process.poll() is not None:
            kill_leftovers(self)
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        finally:
            kill_leftovers(self)


def default_sigint() -> None:
    """A `preexec_fn` that gives a child the default SIGINT, as from a terminal: pytest-xdist's workers ignore
    SIGINT, and a child inherits that, so an interrupt meant to stop it cleanly would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A log line of gRPC's C core ("E1128 01:33:22.878644   14736 ev_epoll1_linux.cc:373] ...").
_GRPC_CORE_LINE = re.compile(r"[EWID]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] .*")


def child_stderr(text: str) -> str:
    """A `default_sigint` child's stderr less what gRPC printed in it before it ran: a `preexec_fn` makes
    subprocess fork (not spawn), and gRPC's fork handlers, loaded in a pytest worker by earlier tests, can log
    from the child between fork and exec (seen once in four suite runs: an epoll_wait error line ahead of the
    command's own message; the command itself, `python -m models_registry`, never imports grpc)."""
    return "\n".join(line for line in text.splitlines() if not _GRPC_CORE_LINE.fullmatch(line))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that the `finally` blocks which stop servers on Ctrl-C run on it too."""


def _raise_terminated(signum: int, frame: object) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no event loop in this (the main) thread
        raise Terminated from None
    # In a running event loop (the soak's), raised by the loop itself: raised here, it went into whichever task was
    # running, which then logged "Task exception was never retrieved" with a traceback.
    loop.call_soon_threadsafe(_terminate)


def _terminate() -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM (a timeout, `kill`, a test harness) raises `Terminated` in the main thread. Its default
    action ended a command at once and left the servers it had started (each in a session of its own) running,
    with their private BENTOML_HOME folders."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by `interrupt`: 143 (128 + SIGTERM) for `Terminated`, 130 for Ctrl-C."""
    return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130


def answered(main: Callable[[], int], interrupted: str = "any server this command started was stopped") -> int:
    """The status of a command that starts servers (`main`'s finally blocks stop them). Ctrl-C ends it with one
    line and 130, not a traceback (the benchmark, the soak and the memory measurement printed one), SIGTERM the same
    way with 143; a server that would not start, or any other failure, with one line and 1 (a helper's find: a bad
    --service-env, a model not in the store or an --out that is a file gave tracebacks)."""
    try:
        with sigterm_interrupts():
            return main()
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return interrupted_status(interrupt)
    except ServerExited as exc:
        print(f"error: {exc.summary}", file=sys.stderr)
        return 1
    except KeyError as exc:  # e.g. a results file of another kind than the command reads
        print(f"error: no field {exc} where this command expected one (a results file of another kind?)",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line, never a stack trace
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1


def exit_with(main: Callable[[], int]) -> NoReturn:
    """Run a command that starts servers and exit with its status, failures in one line (`answered`)."""
    sys.exit(answered(main))


def server_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: its tools first on PATH, no telemetry, plus `extra`."""
    env = dict(os.environ)
    env.update(BENTOML_DO_NOT_TRACK="true", PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    env.update(extra)
    return env


def private_home(shared: Path) -> Path:
    """A BENTOML_HOME of its own that reuses `shared`'s model store, promotions and Bento store.

    `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts,
    which silently freezes the /metrics of any other server on the same home.
    """
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    for store in ("models", "model_registry", "bentos"):  # model_registry: the promotion records (models_registry.store)
        (shared / store).mkdir(exist_ok=True)
        (home / store).symlink_to(shared / store, target_is_directory=True)
    return home


def _expected_workers(env: dict[str, str]) -> int:
    """How many workers the started service will run (its own settings decide the default)."""
    from settings import ServingSettings

    value = env.get("PNEUMONIA_WORKERS", os.environ.get("PNEUMONIA_WORKERS", "0"))
    try:
        return ServingSettings.model_construct(workers=int(value)).worker_count()
    except ValueError:  # a test of bad configuration: the server will refuse to start by itself
        return 0


def bentoml_serve(target: str, port: int, log_path: Path, *, serve_args: list[str] | None = None,
                  tls: TLS | None = None, stores: Path | None = None, **env: str) -> ServerProcess:
    """`bentoml serve TARGET` on 127.0.0.1:PORT, its gRPC endpoint on a free loopback port (not yet started).

    `serve_args`: more `bentoml serve` options (e.g. `--ssl-certfile`); `tls`: how to reach it over HTTPS;
    `stores`: the BENTOML_HOME whose model and Bento stores it uses (default: this process's).
    """
    args = [str(VENV_BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port), *(serve_args or [])]
    # Never the default 3001: with SO_REUSEPORT two servers on one port would silently share it. The gRPC host
    # is left to follow --host (serving.lifecycle.follow_http_host), which tests/test_grpc.py checks.
    grpc_port = int(env.setdefault("PNEUMONIA_GRPC__PORT", str(free_port())))
    scratch: list[Path] = []
    if "BENTOML_HOME" not in env:
        shared = stores or Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")  # BentoML's own default
        scratch.append(private_home(shared))
        env["BENTOML_HOME"] = str(scratch[0])
    return ServerProcess(args=args, port=port, env=server_env(**env), log_path=log_path, grpc_port=grpc_port,
                         scratch_dirs=scratch, warm_workers=_expected_workers(env), tls=tls)


SERVER_TOKEN = "HARNESS_SERVER_TOKEN"


def kill_leftovers(server: ServerProcess) -> list[int]:
    """SIGKILL every process that still carries the server's token (workers orphaned by a killed or crashed
    arbiter live on in process groups of their own); returns their pids. Never raises."""
    killed = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(SERVER_TOKEN) == server.token:
                process.kill()
                killed.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return killed


def kill_group(server: ServerProcess) -> None:
    """SIGKILL the server's whole process group and every process it started (also workers orphaned by a
    crashed arbiter); never raises."""
    if server.process is None:  # never started, or started unrecorded (see ServerProcess._terminate)
        kill_leftovers(server)
        return
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        server.process.wait(timeout=10)
    except Exception:  # noqa: BLE001 - cleanup must not mask the caller's own failure
        pass
    kill_leftovers(server)


def start_server(log_path: Path, ready_timeout: float = HANG_S, **env: str) -> ServerProcess:
    """`bentoml serve` of the service on free loopback ports (HTTP and gRPC), started and ready."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = bentoml_serve("service:PneumoniaClassifier", free_port(), log_path, **env)
    try:
        return server.start(ready_timeout=ready_timeout)
    except BaseException:
        kill_group(server)
        raise


@contextlib.contextmanager
def model_store() -> Iterator[Path]:
    """BENTOML_HOME for a script: the caller's if set, else a temporary one holding the shipped model.

    Must run before anything imports bentoml (BentoML reads BENTOML_HOME once).
    """
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    temporary = None
    if "BENTOML_HOME" not in os.environ:
        temporary = tempfile.mkdtemp(prefix="pneumonia-faults-bentoml-")
        os.environ["BENTOML_HOME"] = temporary
    try:
        from models_registry.default import ensure_default

        print(ensure_default(), file=sys.stderr)
        yield Path(os.environ["BENTOML_HOME"])
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
