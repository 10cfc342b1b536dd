"""Tiny local HTTP servers as targets of the clients, load generators and load-test commands (which are what is under
test): one that answers every POST with 500 (or with a given 200 answer), one that reads every request and never
answers; `serving` runs any other on a loopback port for a `with` block."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer, before_stop: Callable[[], None] = lambda: None) -> Iterator[str]:
    """`server` (bound to a loopback port) serving on a thread: its URL for the block, then stopped and closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        before_stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the service
    server: "_Stub"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200 if self.path == "/readyz" else 404, b"ok")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.silent:
            self.server.stopped.wait()  # accepted, read, never answered
            self.close_connection = True
            return
        self._answer(500, b"stub failure") if self.server.answer is None else self._answer(200, self.server.answer)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, silent: bool, answer: bytes | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.silent, self.answer = silent, answer
        self.stopped = threading.Event()


@contextlib.contextmanager
def stub_server(silent: bool = False, answer: bytes | None = None) -> Iterator[str]:
    """The URL of a stub on a loopback port: /readyz answers 200; a POST gets 500, `answer` with 200, or (`silent`)
    no answer at all."""
    stub = _Stub(silent, answer)
    with serving(stub, before_stop=stub.stopped.set) as url:  # silent handlers return before the shutdown
        yield url
