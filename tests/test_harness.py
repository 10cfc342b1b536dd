"""The test harness itself: ports it hands out, and a server start that loses its port to another listener.

Tests and load tests start many servers in parallel processes; a port picked but not yet bound can be taken by
another one first (CI failed once on "Address already in use"). These check the two defences on a tiny uvicorn app.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from harness.loadgen import _cancel_until_done
from harness.paths import VENV_BIN
from harness.servers import ServerProcess, free_port, kill_group, server_env

app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("up"))])


def test_free_port_never_hands_out_a_reserved_port_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free when handed out, and still free now


def test_a_start_that_loses_its_port_moves_to_a_free_one(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = ServerProcess(
            args=[str(VENV_BIN / "uvicorn"), "tests.test_harness:app", "--host", "127.0.0.1", "--port", str(taken)],
            port=taken, env=server_env(), log_path=tmp_path / "uvicorn.log",
        )
        try:
            server.start(ready_path="/")
            assert server.port != taken and str(server.port) in server.args
            assert httpx.get(server.url + "/", timeout=30).text == "up"
        finally:
            server.stop()


def server_with_a_child_of_its_own(tmp_path: Path) -> ServerProcess:
    """A started server that has started a child in a process group of its own, as circus starts each worker."""
    port = free_port()
    uvicorn = str(VENV_BIN / "uvicorn")
    script = ("import os, subprocess, sys; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
              f"os.execv({uvicorn!r}, [{uvicorn!r}, 'tests.test_harness:app', '--host', '127.0.0.1', '--port', '{port}'])")
    server = ServerProcess(args=[sys.executable, "-c", script], port=port, env=server_env(),
                           log_path=tmp_path / "server.log")
    return server.start(ready_path="/")


def test_kill_group_also_ends_children_in_groups_of_their_own(tmp_path: Path) -> None:
    """circus starts each worker in a process group of its own, so a SIGKILL of a server's group left the workers
    of a crashed or killed arbiter running (holding ports and CPU). This server starts such a child, is killed
    as a crashed arbiter would be, and `kill_group` must still end the child."""
    server = server_with_a_child_of_its_own(tmp_path)
    assert server.process is not None
    try:
        (child,) = psutil.Process(server.process.pid).children()
        assert os.getpgid(child.pid) != os.getpgid(server.process.pid)
        os.kill(server.process.pid, signal.SIGKILL)  # the arbiter dies; its child lives on, orphaned
        server.process.wait(timeout=10)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        kill_group(server)
        child.wait(timeout=10)
        assert not child.is_running()
    finally:
        server.stop()
        kill_group(server)


def test_load_generators_end_a_consumer_that_swallowed_its_cancellation() -> None:
    """Python 3.11's asyncio.wait_for can swallow a cancellation that races an answer; the soak's consumer then waited
    on its queue for ever and a soak stopped with Ctrl-C never exited (seen once in a whole-suite run). A consumer
    that swallows the first cancellation, as that race does, is ended by the next."""

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # what the race in wait_for does
        await asyncio.Queue().get()  # the consumer's next wait: nothing will come

    async def run() -> asyncio.Task:
        task = asyncio.create_task(swallows_once())
        await asyncio.sleep(0)
        await asyncio.wait_for(_cancel_until_done([task]), 10)
        return task

    assert asyncio.run(run()).cancelled()


def test_the_capacity_ramp_backs_off_from_a_refused_connection() -> None:
    """Against a dead port `closed_loop` retried ~12,000 times a second, a busy loop beside the server it measures.
    After a transport error each client waits 0.05 s, so half a second holds at most 11 tries of one client."""
    from harness.loadgen import closed_loop

    step = asyncio.run(closed_loop("127.0.0.1", free_port(), [b"GET / HTTP/1.1\r\n\r\n"], 1, 0.5))
    assert step["rps"] == 0 and 1 <= step["failures"] <= 11, step
    assert set(step["failure_kinds"]) == {"ConnectionRefusedError"}


def test_stop_ends_the_orphans_of_a_server_that_died(tmp_path: Path) -> None:
    """stop() returned at once when the server process had already exited, so the workers a crashed or killed
    arbiter left behind (in process groups of their own) kept running and listening after it."""
    server = server_with_a_child_of_its_own(tmp_path)
    assert server.process is not None
    try:
        (child,) = psutil.Process(server.process.pid).children()
        os.kill(server.process.pid, signal.SIGKILL)  # the arbiter dies; its child lives on, orphaned
        server.process.wait(timeout=10)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        server.stop()
        child.wait(timeout=10)
        assert not child.is_running()
    finally:
        kill_group(server)


def test_soak_latencies_are_those_of_answered_requests() -> None:
    """The soak's percentiles counted failed requests too: a server refusing everything in a millisecond showed a
    fast p50. Against a stub answering 500, every request fails and no latency is kept."""
    from harness.loadgen import open_loop
    from tests.stubs import stub_server

    with stub_server() as url:
        port = int(url.rsplit(":", 1)[1])
        request = b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        outcomes, latencies = asyncio.run(open_loop("127.0.0.1", port, [request], rate=50, seconds=0.2, connections=2,
                                                    max_queue=100, timeout_s=30, sample_s=10,
                                                    on_sample=lambda figures: None))
    assert outcomes == {"http_500": 10} and latencies == []


def test_a_stopped_server_gives_its_ports_back() -> None:
    """Every free_port() left a claim file in the reservations folder for ever (1,721 there): a server's are removed
    when it stops."""
    from harness import servers

    port, grpc_port = free_port(), free_port()
    claims = [servers._RESERVATIONS / str(p) for p in (port, grpc_port)]
    assert all(claim.exists() for claim in claims)
    server = ServerProcess(
        args=[str(VENV_BIN / "uvicorn"), "tests.test_harness:app", "--host", "127.0.0.1", "--port", str(port)],
        port=port, env=server_env(), log_path=Path(os.devnull), grpc_port=grpc_port,
    )
    server.start(ready_path="/")
    server.stop()
    assert not any(claim.exists() for claim in claims)


def test_stale_port_claims_are_swept_and_others_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims older than an hour, free by definition, were never removed; another process's claim is never touched."""
    from harness import servers

    monkeypatch.setattr(servers, "_RESERVATIONS", tmp_path)
    monkeypatch.setattr(servers, "_swept", False)
    stale, fresh = tmp_path / "1234", tmp_path / "1235"
    stale.write_text("1")
    fresh.write_text("1")  # pid 1's: not this process's
    old = time.time() - 2 * servers._RESERVATION_S
    os.utime(stale, (old, old))
    port = free_port()
    servers.release_port(1235)
    assert not stale.exists() and fresh.exists() and (tmp_path / str(port)).read_text() == str(os.getpid())
