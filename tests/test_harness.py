"""The test harness itself: ports it hands out, and a server start that loses its port to another listener.

Tests and load tests start many servers in parallel processes; a port picked but not yet bound can be taken by
another one first (CI failed once on "Address already in use"). These check the two defences on a tiny uvicorn app.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from harness.paths import VENV_BIN
from harness.servers import ServerProcess, free_port, server_env

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
