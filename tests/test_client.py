"""The typed client package and its CLI, over both transports, against the live session server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from client import (
    TLS,
    AsyncClassifierClient,
    AuthenticationError,
    ClassifierClient,
    DeadlineExceeded,
    ImageUpload,
    InvalidInput,
    LimitExceeded,
    RateLimited,
    Prediction,
    Unavailable,
    connect,
    connect_async,
)
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import HANG_S, ServerProcess, free_port, server_env
from harness.tls import Pki
from tests.images import encode, gradient
from tests.secured import BURST, KEY_CLI_LARGE, KEY_CLI_LIMIT, KEY_CLIENT, KEY_FILE, MAX_REQUEST

SAME = ("label", "probability", "threshold", "confidence", "model", "image", "warnings", "filename", "client_id")


def _target(server: ServerProcess, transport: str) -> str:
    return server.grpc_target if transport == "grpc" else server.url


@pytest.fixture(scope="module")
def live(server: ServerProcess) -> ServerProcess:
    with connect(server.grpc_target, transport="grpc") as api:  # SERVING follows HTTP readiness by milliseconds
        deadline = time.monotonic() + 15
        while not api.ready():
            assert time.monotonic() < deadline, "gRPC endpoint never became SERVING"
            time.sleep(0.05)
    return server


def _essentials(predictions: list[Prediction]) -> list[dict]:
    return [p.model_dump(include=set(SAME)) for p in predictions]


def test_sync_clients_agree_across_transports(live: ServerProcess) -> None:
    paths = sample_xrays(2, offset=11)
    uploads = [ImageUpload(data=p.read_bytes(), filename=p.name, client_id=f"id-{i}") for i, p in enumerate(paths)]
    results = {}
    for transport in ("http", "grpc"):
        with connect(_target(live, transport), transport=transport) as api:
            assert isinstance(api, ClassifierClient) and api.ready()
            results[transport] = api.classify(uploads)
            assert api.classify(paths[0])[0].filename == paths[0].name  # a bare path works too
    assert _essentials(results["http"]) == _essentials(results["grpc"])
    assert [p.client_id for p in results["grpc"]] == ["id-0", "id-1", "id-2", "id-3"]
    assert all(isinstance(p, Prediction) and p.batch_size >= 4 for p in results["grpc"])


def test_async_clients_agree_across_transports(live: ServerProcess) -> None:
    paths = sample_xrays(2, offset=13)

    async def run(transport: str) -> tuple[list[Prediction], dict]:
        async with connect_async(_target(live, transport), transport=transport) as api:
            assert isinstance(api, AsyncClassifierClient) and await api.ready()
            predictions = await api.classify(paths)
            info = await api.model_info()
        return predictions, info.model_dump()

    (http_predictions, http_info), (grpc_predictions, grpc_info) = asyncio.run(run("http")), asyncio.run(run("grpc"))
    assert _essentials(http_predictions) == _essentials(grpc_predictions)
    for key in ("ready", "model", "arch", "threshold", "temperature", "workers"):
        assert http_info[key] == grpc_info[key], key
    for key in ("max_bytes", "max_pixels", "min_side", "max_images_per_request"):
        assert http_info["limits"][key] == grpc_info["limits"][key], key
    assert http_info["validation_metrics"]["accuracy"] == pytest.approx(grpc_info["validation_metrics"]["accuracy"])


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_rejections_raise_the_same_typed_errors(live: ServerProcess, transport: str) -> None:
    good = sample_xrays(1)[0]
    with connect(_target(live, transport), transport=transport) as api:
        with pytest.raises(InvalidInput) as invalid:
            api.classify([good, ImageUpload(data=b"GIF89a but not really", filename="fake.gif")])
        assert type(invalid.value) is InvalidInput
        assert "image 1 (fake.gif)" in invalid.value.message and invalid.value.reasons[0] in ("corrupt", "not_an_image")
        with pytest.raises(LimitExceeded) as limit:
            api.classify([good] * 17)
        assert limit.value.reasons == ("too_many_images",) and "the limit is 16" in limit.value.message


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_unreachable_server_is_unavailable(transport: str) -> None:
    url = f"127.0.0.1:{free_port()}" if transport == "grpc" else f"http://127.0.0.1:{free_port()}"
    with connect(url, transport=transport, timeout=5) as api, pytest.raises(Unavailable) as error:
        api.classify(sample_xrays(1)[0])
    assert "cannot reach" in error.value.message


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_classify_and_health(live: ServerProcess, transport: str) -> None:
    flags = ["--grpc"] if transport == "grpc" else []
    url = _target(live, transport)
    paths = sample_xrays(1, offset=17)
    text = _cli("classify", *map(str, paths), *flags, "--url", url)
    assert text.returncode == 0, text.stderr
    for path in paths:
        assert f"{path.name}: " in text.stdout
    assert "probability of pneumonia" in text.stdout and f"via {transport} {url}" in text.stdout
    as_json = _cli("classify", *map(str, paths), *flags, "--url", url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = [Prediction.model_validate(item) for item in json.loads(as_json.stdout)]
    assert [p.filename for p in parsed] == [p.name for p in paths]
    assert all(f"{p.filename}: {p.label}" in text.stdout for p in parsed)
    health = _cli("health", *flags, "--url", url)
    assert health.returncode == 0 and health.stdout.startswith("ready at"), health.stdout + health.stderr


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_errors_exit_non_zero_with_a_message(live: ServerProcess, transport: str, tmp_path: Path) -> None:
    flags = ["--grpc"] if transport == "grpc" else []
    bad = tmp_path / "scan.jpeg"
    bad.write_bytes(b"this is not a jpeg")
    refused = _cli("classify", str(bad), *flags, "--url", _target(live, transport))
    assert refused.returncode == 3 and "scan.jpeg" in refused.stderr and "Traceback" not in refused.stderr
    down_url = f"127.0.0.1:{free_port()}" if transport == "grpc" else f"http://127.0.0.1:{free_port()}"
    down = _cli("health", *flags, "--url", down_url)
    assert down.returncode == 4 and "cannot reach" in down.stderr and "Traceback" not in down.stderr
    missing = _cli("classify", str(tmp_path / "absent.png"), *flags, "--url", _target(live, transport))
    assert missing.returncode == 2 and "absent.png" in missing.stderr
    no_wait = _cli("health", *flags, "--url", _target(live, transport), "--timeout", "-1")
    assert no_wait.returncode == 2 and "--timeout" in no_wait.stderr and "positive number of seconds" in no_wait.stderr


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_answers_every_file_of_a_large_or_mixed_batch(live: ServerProcess, transport: str, tmp_path: Path) -> None:
    """20 files (the server takes 16 per request) were refused as a whole; one bad file among good ones cost the
    good ones their answers. Now: more requests, and each file its own result."""
    flags = ["--grpc"] if transport == "grpc" else []
    paths = sample_xrays(10, offset=60)  # 10 per class
    many = _cli("classify", *map(str, paths), *flags, "--url", _target(live, transport), "--json")
    assert many.returncode == 0, many.stderr
    assert [(item["filename"], item["path"]) for item in json.loads(many.stdout)] == [(p.name, str(p)) for p in paths]
    bad = tmp_path / "notes.jpeg"
    bad.write_bytes(b"minutes of the meeting, not an X-ray")
    mixed = _cli("classify", str(paths[0]), str(bad), str(paths[1]), *flags, "--url", _target(live, transport))
    assert mixed.returncode == 3, mixed.stderr
    # each file as given: two of one name in two folders were told apart only by their order
    assert mixed.stdout.startswith(f"{paths[0]}: ") and f"\n{paths[1]}: " in mixed.stdout, mixed.stdout
    assert mixed.stderr.strip().splitlines() == [line for line in mixed.stderr.strip().splitlines()
                                                 if line.startswith(f"error: {bad}: ")]
    assert "not a recognised image" in mixed.stderr and "Traceback" not in mixed.stderr
    as_json = _cli("classify", str(paths[0]), str(bad), *flags, "--url", _target(live, transport), "--json")
    first, second = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and second["reasons"] == ["not_an_image"] and first["filename"] == paths[0].name
    # the second file: its message named it "image 0", its place in the one-file request sent again
    assert second["error"] == "the file is not a recognised image file", second
    # `status` was 400 or "INVALID_ARGUMENT" here, and "ok" / "refused" in a prediction of the same list
    assert first["status"] == "ok" and second["status"] == "error" and second["sent"] is True, second
    assert (second["http_status"], second["grpc_status"]) == ((None, "INVALID_ARGUMENT") if transport == "grpc"
                                                              else (400, None)), second


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_reports_files_it_cannot_read_and_answers_the_others(live: ServerProcess, transport: str,
                                                                 tmp_path: Path) -> None:
    """Found by a helper: a folder or a broken link among the files (a `*` over a PACS export) stopped the run with
    no answers at all, and a FIFO blocked it for good. Now each is reported and the readable files are classified."""
    import os

    flags = ["--grpc"] if transport == "grpc" else []
    good = sample_xrays(1, offset=61)
    (tmp_path / "series").mkdir()
    (tmp_path / "gone.jpeg").symlink_to(tmp_path / "missing.jpeg")
    os.mkfifo(tmp_path / "pipe.jpeg")
    names = [str(good[0]), str(tmp_path / "series"), str(tmp_path / "gone.jpeg"), str(tmp_path / "pipe.jpeg"),
             str(good[1])]
    done = subprocess.run([sys.executable, "-m", "client", "classify", *names, *flags, "--url", _target(live, transport),
                           "--json"], cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60)
    entries = json.loads(done.stdout)
    assert done.returncode == 2 and [e["status"] for e in entries] == ["ok", "error", "error", "error", "ok"], entries
    assert [(e["filename"], e["path"]) for e in entries] == [(Path(n).name, n) for n in names]
    assert all(e["sent"] is False and e["http_status"] is None for e in entries[1:4])
    assert "a folder" in entries[1]["error"] and "No such file" in entries[2]["error"], entries
    assert "not a regular file" in entries[3]["error"], entries
    assert len(done.stderr.strip().splitlines()) == 3 and "Traceback" not in done.stderr, done.stderr
    nothing = _cli("classify", str(tmp_path / "series"), *flags, "--url", _target(live, transport))
    assert nothing.returncode == 2 and nothing.stderr.strip() == f"error: cannot read {tmp_path / 'series'}: a folder"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_explain_never_leaves_an_earlier_heatmap_in_place(live: ServerProcess, transport: str,
                                                              tmp_path: Path) -> None:
    """Found by a helper: `explain refused.png --out heat.png` exited 0 with the previous image's heatmap still in
    heat.png (and grid.json), for a script to attach to the refused image."""
    flags = ["--grpc"] if transport == "grpc" else []
    out, grid = tmp_path / "heat.png", tmp_path / "grid.json"
    target = ["--out", str(out), "--grid", str(grid), *flags, "--url", _target(live, transport)]
    first = _cli("explain", str(sample_xrays(1, offset=62)[0]), *target)
    assert first.returncode == 0 and out.read_bytes().startswith(b"\x89PNG") and grid.is_file(), first.stderr
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(Image.new("L", (300, 300), 128), "PNG"))
    refused = _cli("explain", str(blank), *target)
    # no verdict: exit 3 and a line on stderr, as for a refusal by the server's input checks (it was 0)
    assert refused.returncode == 3 and "REFUSED (blank)" in refused.stdout, refused.stdout + refused.stderr
    assert refused.stderr.startswith(f"error: {blank}: refused (blank): "), refused.stderr
    assert not out.exists() and not grid.exists() and "no heatmap written" in refused.stdout
    again = _cli("explain", str(sample_xrays(1, offset=62)[0]), *target)
    assert again.returncode == 0 and out.is_file(), again.stderr
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    failed = _cli("explain", str(notes), *target)
    assert failed.returncode == 3 and not out.exists() and not grid.exists(), failed.stderr
    # Removing first must never remove the X-ray itself (a review's find: `explain x.jpeg --out x.jpeg` against a
    # server that was down deleted x.jpeg), nor write both into one file.
    xray = tmp_path / "x.jpeg"
    xray.write_bytes(sample_xrays(1, offset=62)[0].read_bytes())
    for flags_out in (["--out", str(xray)], ["--grid", str(xray)], ["--out", str(out), "--grid", str(out)]):
        usage = _cli("explain", str(xray), *flags_out, *flags, "--url", _target(live, transport))
        assert usage.returncode == 2 and "write the heatmap elsewhere" in usage.stderr, usage.stderr
        assert xray.read_bytes() == sample_xrays(1, offset=62)[0].read_bytes()
    # Only regular files are removed first (a helper's find: `--out /dev/null`, run as root, replaced the device
    # with a file); a link to a device is written through and stays a link.
    sink = tmp_path / "sink.png"
    sink.symlink_to("/dev/null")
    through = _cli("explain", str(xray), "--out", str(sink), *flags, "--url", _target(live, transport))
    assert through.returncode == 0 and sink.is_symlink() and Path("/dev/null").is_char_device(), through.stderr
    (tmp_path / "folder").mkdir()  # a link to a folder is a folder: kept, and refused (a review's find: removed)
    (tmp_path / "to-folder").symlink_to(tmp_path / "folder")
    kept = _cli("explain", str(xray), "--grid", str(tmp_path / "to-folder"), *flags, "--url", _target(live, transport))
    assert kept.returncode == 2 and "cannot replace" in kept.stderr and (tmp_path / "to-folder").is_symlink()
    full = _cli("explain", str(xray), "--grid", "/dev/full", *flags, "--url", _target(live, transport))
    assert full.returncode == 2 and "cannot write /dev/full: No space left on device" in full.stderr, full.stderr


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_odd_file_names_urls_keys_and_timeouts(live: ServerProcess, transport: str, tmp_path: Path) -> None:
    """A helper's finds: a file name that is not UTF-8 stopped the whole run with an encoding error; an API key
    read with its line end was printed in full and called "unreachable"; `--timeout 1e10` was a traceback (HTTP) or
    an instant deadline (gRPC); a --client-id count mismatch and a non-HTTP URL exited as if not ready or
    unreachable; a URL with a path said "not ready" for ever; a gRPC address with a trailing slash never connected."""
    import os

    flags = ["--grpc"] if transport == "grpc" else []
    url = _target(live, transport)
    good = sample_xrays(1, offset=63)[0]
    odd = tmp_path / os.fsdecode(b"ok\xffname.jpeg")
    odd.write_bytes(good.read_bytes())
    both = _cli("classify", str(good), str(odd), *flags, "--url", url, "--json")
    assert both.returncode == 0, both.stderr
    assert [e["filename"] for e in json.loads(both.stdout)] == [good.name, "ok\ufffdname.jpeg"]
    # A newline in a name split its line of text output in two (a helper's find): escaped on one line.
    broken = tmp_path / "two\nlines.jpeg"
    broken.write_bytes(good.read_bytes())
    text = _cli("classify", str(broken), *flags, "--url", url)
    assert text.returncode == 0 and len(text.stdout.strip().splitlines()) == 3, text.stdout  # answer, image, model
    assert "two\\nlines.jpeg" in text.stdout.splitlines()[0], text.stdout
    secret = "sekrit-" + "k" * 20
    for key in (secret + "\r", secret + "\n", secret + "\u2013"):  # a line end read with it; a pasted en dash
        keyed = _cli("health", *flags, "--url", url, "--api-key", key)
        assert keyed.returncode == 2 and "not printable ASCII" in keyed.stderr and secret not in keyed.stderr, \
            keyed.stderr
    for args, words in ((["--timeout", "1e10"], "more than a day"),
                        (["--client-id", "a"], "1 --client-id for 2 images"),
                        (["--url", "ftp://127.0.0.1:21" if transport == "http" else "grpc://"],
                         "use http:// or https://" if transport == "http" else "is not a gRPC address")):
        usage = _cli("classify", str(good), str(good), *flags, *(["--url", url] if "--url" not in args else []), *args)
        assert usage.returncode == 2 and words in usage.stderr and "Traceback" not in usage.stderr, usage.stderr
    if transport == "http":
        pathed = _cli("health", "--url", url + "/v1")  # /v1/readyz: 404, not "the model is loading"
        assert pathed.returncode == 4 and "no classifier at" in pathed.stderr, pathed.stdout + pathed.stderr
    else:
        slashed = _cli("health", "--grpc", "--url", url + "/")
        assert slashed.returncode == 0 and slashed.stdout.startswith("ready at"), slashed.stdout + slashed.stderr


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_both_transports_treat_empty_lists_timeouts_and_byte_buffers_alike(live: ServerProcess, transport: str) -> None:
    """classify([]) was a 415 ClientError over HTTP and InvalidInput over gRPC; timeout=0 failed at once over HTTP
    and meant the default over gRPC; a bytearray was refused."""
    data = sample_xrays(1, offset=64)[0].read_bytes()
    with connect(_target(live, transport), transport=transport) as api:
        with pytest.raises(InvalidInput) as empty:
            api.classify([])
        assert empty.value.reasons == ("no_images",)
        for timeout in (0, -1, float("nan"), 1e10, True):
            with pytest.raises(ValueError, match="timeout"):
                api.classify(data, timeout=timeout)
        import numpy as np

        assert api.classify(data, timeout=np.float32(60))  # any real number of seconds
        assert [p.probability for p in api.classify([bytearray(data), memoryview(data)])] == \
            [api.classify(data)[0].probability] * 2


def test_cli_reads_each_requests_files_only_when_it_sends_them(live: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of the CLI's reads and requests for 20 files (the test below checks only how they are grouped):
    16 read, 16 sent, then the other 4."""
    import client.__main__ as cli

    events: list[str] = []
    read, send = cli._read, cli.classify_each
    monkeypatch.setattr(cli, "_read", lambda path, client_id: events.append("read") or read(path, client_id))
    monkeypatch.setattr(cli, "classify_each",
                        lambda api, uploads, *rest: events.append(f"send {len(uploads)}") or send(api, uploads, *rest))
    paths = sample_xrays(10, offset=67)
    assert cli.main(["classify", *map(str, paths), "--url", live.url, "--json"]) == 0
    assert events == ["read"] * 16 + ["send 16"] + ["read"] * 4 + ["send 4"]


def test_grpc_targets_as_grpcio_takes_them() -> None:
    from client._common import grpc_target

    assert grpc_target("grpc://host:3001/") == grpc_target("host:3001/") == grpc_target(" dns:///host:3001") == "host:3001"
    assert grpc_target("unix:/run/pneumonia.sock") == "unix:/run/pneumonia.sock"  # a review's find: refused
    assert grpc_target("ipv4:127.0.0.1:3001") == "ipv4:127.0.0.1:3001"  # a helper's find: the CLI refused it
    assert grpc_target("[::1]:3001") == "[::1]:3001"
    assert grpc_target("classifier.example", secure=True) == "classifier.example"  # 443, over TLS only
    for bad in ("grpc://", "http://host:3001", "host:3001/v1"):
        with pytest.raises(ValueError, match="not a gRPC address"):
            grpc_target(bad)
    for bad in ("host", "host:"):
        with pytest.raises(ValueError, match="has no port"):
            grpc_target(bad)


def test_cli_reads_a_request_of_files_at_a_time(tmp_path: Path) -> None:
    """A helper measured 331 MiB for 28 ten-megabyte DICOM files: every file was read before the first request.
    Requests now take at most BATCH_IMAGES files and BATCH_BYTES, read when they are sent (sparse files here)."""
    from client.__main__ import BATCH_BYTES, BATCH_IMAGES, _batches

    small = []
    for i in range(BATCH_IMAGES + 4):
        small.append(tmp_path / f"s{i}.jpeg")
        small[-1].write_bytes(b"x")
    assert [len(b) for b in _batches(small)] == [BATCH_IMAGES, 4]
    large = []
    for i in range(5):
        large.append(tmp_path / f"l{i}.dcm")
        with large[-1].open("wb") as f:
            f.truncate(BATCH_BYTES // 2 - 1)
    huge = tmp_path / "huge.dcm"
    with huge.open("wb") as f:
        f.truncate(BATCH_BYTES * 2)
    assert list(_batches([*large, huge, small[0], tmp_path / "absent.jpeg"])) == [[0, 1], [2, 3], [4], [5], [6, 7]]


def test_a_proxys_413_without_reasons_sends_the_files_one_at_a_time(live: ServerProcess, tmp_path: Path) -> None:
    """A review's find: ingress-nginx (1 MiB by default) answers 413 with an HTML page and no reasons, and both files
    of the request were refused although each fits. A stand-in proxy with that limit in front of the real server."""
    import http.server

    import httpx

    from tests.stubs import serving

    limit = 1024 * 1024

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if len(body) > limit:
                status, content_type, out = 413, "text/html", b"<html><center><h1>413 Request Entity Too Large</h1>"
            else:
                answer = httpx.post(live.url + self.path, content=body, timeout=60,
                                    headers={"content-type": self.headers["content-type"]})
                status, content_type, out = answer.status_code, answer.headers["content-type"], answer.content
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)) as url:
        files = _large_xrays(tmp_path, 2, offset=68)
        assert sum(f.stat().st_size for f in files) > limit > max(f.stat().st_size for f in files)
        done = _cli("classify", *map(str, files), "--url", url, "--json")
        assert done.returncode == 0, done.stderr
        assert [e["status"] for e in json.loads(done.stdout)] == ["ok", "ok"]


def _answering(status: int, content_type: str, body: bytes, **headers: str):  # -> a ThreadingHTTPServer to serve
    """A stand-in for what may sit at a URL instead of the classifier (a proxy's login page, a redirect, another
    API): it answers every request with this. The client's handling of it is under test, not a server."""
    import http.server

    class Answer(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(status)
            for name, value in {"content-type": content_type, **headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)


@pytest.mark.parametrize("status, content_type, body, headers", [
    (200, "text/html", b"<html><body>Please log in</body></html>", {}),
    (308, "text/html", b"", {"location": "https://classifier.example/classify"}),
    (200, "application/json", b"[]", {}),
    (200, "application/json", b"{}", {}),
    (404, "text/html", b"<html>Not Found</html>", {}),
])
def test_answers_that_are_not_the_classifiers_are_client_errors(status: int, content_type: str, body: bytes,
                                                                headers: dict[str, str]) -> None:
    """A helper's finds: an HTML page or a redirect raised JSONDecodeError (the CLI said "usage error"), `{}` a
    pydantic dump, `[]` for two images an empty list (the CLI then crashed with StopIteration), a 404 said "not
    ready" to `health` for ever. Each is a ClientError now, and the CLI says so in one line."""
    from client import ClientError, ServerError
    from tests.stubs import serving

    with serving(_answering(status, content_type, body, **headers)) as url:
        images = [sample_xrays(1, offset=65)[0]] * 2
        with connect(url) as api:
            with pytest.raises(ClientError) as failed:
                api.classify(images)
            if status != 200:  # /readyz: 200 ready and 503 loading are the service's answers; others are not
                with pytest.raises(ClientError):
                    api.ready()
        assert isinstance(failed.value, Unavailable if status == 404 else ServerError), repr(failed.value)
        cli = _cli("classify", *map(str, images), "--url", url)
        assert cli.returncode == (4 if status == 404 else 5) and "Traceback" not in cli.stderr, cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1 and len(cli.stderr) < 400, cli.stderr


def test_cli_refuses_bad_options_before_connecting_and_stops_on_ctrl_c(live: ServerProcess, tmp_path: Path) -> None:
    """Found by a helper: an empty --url meant the default server, port 99999 read as 'connection refused', a
    garbage --ca-file gave gRPC's handshaker errors, a password in the URL was printed, Ctrl-C a traceback."""
    import signal
    import socket

    import certifi

    from harness.servers import child_stderr, default_sigint

    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    for args, words in ((["--url", ""], "argument --url: empty"),
                        (["--url", "http://127.0.0.1:99999"], "argument --url: 'http://127.0.0.1:99999': Port out of range"),
                        (["--ca-file", str(garbage)], f"the TLS ca_file {garbage} holds no PEM certificate"),
                        (["--ca-file", str(garbage), "--grpc"], f"the TLS ca_file {garbage} holds no PEM certificate"),
                        # a CA for a plain-HTTP URL went unused, silently
                        (["--ca-file", certifi.where(), "--url", live.url], f"{live.url} is plain HTTP: the TLS files")):
        refused = _cli("health", *args)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and "handshaker" not in refused.stderr
    for url, flags in (("http://tok3n-as-user@127.0.0.1:99999", []), ("someone:hunter2@127.0.0.1:3001", ["--grpc"])):
        leaked = _cli("health", "--url", url, *flags)
        assert leaked.returncode == 2 and "tok3n" not in leaked.stderr and "hunter2" not in leaked.stderr, leaked.stderr
    with_password = live.url.replace("http://", "http://someone:hunter2@")
    health = _cli("health", "--url", with_password)
    assert health.returncode == 0 and "hunter2" not in health.stdout + health.stderr and "someone:***@" in health.stdout
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        process = subprocess.Popen([sys.executable, "-m", "client", "health", "--url",
                                    f"http://127.0.0.1:{silent.getsockname()[1]}"], cwd=ROOT, env=server_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        time.sleep(3)  # imported and waiting for the answer (the timeout is 60 s)
        process.send_signal(signal.SIGINT)
        stderr = child_stderr(process.communicate(timeout=30)[1])
    assert process.returncode == 130 and stderr.strip() == "interrupted", stderr[-2000:]


def test_cli_takes_a_url_without_its_scheme(live: ServerProcess) -> None:
    """`--url 127.0.0.1:3000`, as people type it for gRPC too, means http://."""
    bare = live.url.removeprefix("http://")
    health = _cli("health", "--url", bare)
    assert health.returncode == 0 and health.stdout.startswith("ready at"), health.stdout + health.stderr


# --------------------------------------------------------------------------- against the secured server


def _secured_target(server: ServerProcess, transport: str) -> str:
    return server.grpc_target if transport == "grpc" else server.url  # https://


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_client_against_a_secured_server(secured_server: tuple[ServerProcess, Pki], transport: str) -> None:
    """HTTPS and gRPC over mutual TLS with an API key; the typed errors for a missing or wrong key, a
    deadline, and the server's rate limit."""
    server, pki = secured_server
    target, key = _secured_target(server, transport), {"x-api-key": KEY_CLIENT[transport]}
    path = sample_xrays(1, offset=21)[0]
    with connect(target, transport=transport, headers=key, tls=pki.client()) as api:
        assert api.ready()
        (prediction,) = api.classify(path)
        assert prediction.label in ("NORMAL", "PNEUMONIA") and prediction.filename == path.name
        assert api.model_info().model == prediction.model  # protect_health: needs the key, which it has
    for headers in (None, {"x-api-key": "wrong-key-" + "x" * 20}):
        with connect(target, transport=transport, headers=headers, tls=pki.client()) as api:
            with pytest.raises(AuthenticationError) as refused:
                api.classify(path)
            assert refused.value.status == (401 if transport == "http" else "UNAUTHENTICATED")
            assert refused.value.reasons == ("unauthorized",)  # HTTP's 401 body names it; it was dropped
            assert api.ready()  # probes need no key
    with connect(target, transport=transport, tls=TLS()) as api, pytest.raises(Unavailable):
        api.classify(path)  # the private CA is not in the system's trust store: no connection
    heavy = [ImageUpload(data=encode(gradient((3000, 3000)), "PNG"), filename=f"big-{i}.png") for i in range(16)]
    with connect(target, transport=transport, headers=key, tls=pki.client()) as api:
        with pytest.raises(DeadlineExceeded):
            api.classify(heavy, timeout=0.05)  # 16 decodes of 9 megapixels each cannot finish in 50 ms
        (again,) = api.classify(path)  # the client is usable after a deadline
        assert again.probability == prediction.probability
        for calls in range(1, 500):  # spend the key's bucket: the rate limit's 429 / RESOURCE_EXHAUSTED
            try:
                api.model_info()
            except RateLimited as limited:  # a LimitExceeded (an InvalidInput, exit 3) before
                assert limited.status == (429 if transport == "http" else "RESOURCE_EXHAUSTED")
                # the server's reason and wait (they were dropped: reasons (), no retry_after_s)
                assert isinstance(limited, Unavailable) and limited.reasons == ("rate_limited",)
                assert limited.retry_after_s is not None and limited.retry_after_s >= 1
                assert limited.exit_code == 4  # retry later, as busy; not a refused input (3)
                break
        else:
            pytest.fail("never rate limited")
        assert calls > BURST // 2


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_against_a_secured_server(secured_server: tuple[ServerProcess, Pki], transport: str) -> None:
    server, pki = secured_server
    flags = ["--url", _secured_target(server, transport), "--ca-file", str(pki.ca),
             "--cert", str(pki.client_cert), "--key", str(pki.client_key)] + (["--grpc"] if transport == "grpc" else [])
    path = str(sample_xrays(1, offset=23)[0])
    keyless = _cli("classify", path, *flags)
    assert keyless.returncode == 5 and "Traceback" not in keyless.stderr, keyless.stderr  # AuthenticationError
    keyed = _cli("classify", path, *flags, "--api-key", KEY_FILE)
    assert keyed.returncode == 0 and "probability of pneumonia" in keyed.stdout, keyed.stderr
    untrusted = _cli("classify", path, *flags[:2], "--api-key", KEY_FILE, *(["--grpc"] if transport == "grpc" else []))
    assert untrusted.returncode == 4 and "cannot reach" in untrusted.stderr, untrusted.stderr


def _large_xrays(folder: Path, count: int, offset: int) -> list[Path]:
    """`count` copies of a real X-ray as 2000 px JPEGs of about 0.7 MB each."""
    xray = Image.open(sample_xrays(1, offset=offset)[0]).convert("L").resize((2000, 2000), Image.BICUBIC)
    files = [folder / f"large-{i}.jpeg" for i in range(count)]
    for path in files:
        path.write_bytes(encode(xray, "JPEG", quality=100))
    return files


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_answers_files_whose_request_is_over_the_servers_byte_limit(secured_server: tuple[ServerProcess, Pki],
                                                                        transport: str, tmp_path: Path) -> None:
    """Four 0.7 MB X-rays against a 2 MB request limit: over HTTP the 413 made the CLI send them one by one; over
    gRPC the server's "Received message larger than max" carried no reason, and no file was answered."""
    server, pki = secured_server
    flags = ["--url", _secured_target(server, transport), "--ca-file", str(pki.ca), "--cert", str(pki.client_cert),
             "--key", str(pki.client_key), "--api-key", KEY_CLI_LARGE[transport]] + (["--grpc"] if transport == "grpc" else [])
    files = _large_xrays(tmp_path, 4, offset=66)
    assert sum(f.stat().st_size for f in files) > MAX_REQUEST > max(f.stat().st_size for f in files)
    done = _cli("classify", *map(str, files), *flags, "--json")
    assert done.returncode == 0, done.stderr
    assert [e["filename"] for e in json.loads(done.stdout)] == [f.name for f in files]
    assert all(e["status"] == "ok" for e in json.loads(done.stdout))


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_keeps_the_answers_it_has_when_the_rate_limit_stops_it(secured_server: tuple[ServerProcess, Pki],
                                                                    transport: str, tmp_path: Path) -> None:
    """A bad file in every request makes the CLI send files one by one, and the rate limit (20 a key) stops it
    part way: it printed nothing and dropped the predictions already received. Now every file has an entry."""
    server, pki = secured_server
    flags = ["--url", _secured_target(server, transport), "--ca-file", str(pki.ca), "--cert", str(pki.client_cert),
             "--key", str(pki.client_key), "--api-key", KEY_CLI_LIMIT[transport]] + (["--grpc"] if transport == "grpc" else [])
    bad = tmp_path / "notes.jpeg"
    bad.write_bytes(b"not an X-ray")
    files = [str(p) for good in sample_xrays(10, offset=90) for p in (bad, good)]  # 40 files, 3 requests' worth
    done = _cli("classify", *files, *flags, "--json")
    entries = json.loads(done.stdout)
    assert done.returncode == 4 and len(entries) == len(files), done.stderr
    answered = [e for e in entries if "label" in e]
    limited = [e for e in entries if e.get("reasons") == ["rate_limited"]]
    assert answered and limited and entries[-1] in limited and entries[-1]["sent"] is False, entries
    assert "file(s) not answered" in done.stderr and "Traceback" not in done.stderr


def test_tls_files_without_a_url_mean_the_default_server_over_https() -> None:
    """A reviewer's find: with TLS files and no --url, the default URL (written with http://) was refused as plain
    HTTP, naming a URL the user never typed; TLS files with an explicit http:// URL are still refused."""
    import certifi

    from client import connect
    from client._common import TLS

    tls = TLS(certifi.where())
    with connect(None, transport="http", tls=tls) as api:
        assert api.url == "https://127.0.0.1:3000"
    with pytest.raises(ValueError, match="is plain HTTP"):
        connect("http://127.0.0.1:3000", transport="http", tls=tls)


def _dripping(total: int, every_s: float):  # -> a ThreadingHTTPServer to serve
    """A server that answers 200 with a `total`-byte body, one byte every `every_s`: each read is quick, the answer
    as a whole is not. The client's deadline is under test."""
    import http.server

    class Drip(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(total))
            self.end_headers()
            try:
                for _ in range(total):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(every_s)
            except OSError:  # the client gave up
                pass

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)


def test_the_http_timeout_bounds_the_whole_answer_not_each_read(tmp_path: Path) -> None:
    """Found by a helper: httpx's timeout bounds each read, so a server sending its answer a byte at a time held the
    client (and the CLI's --timeout 3) for ever. The drip here would take 12 s; the call must end at its deadline."""
    from client import DeadlineExceeded, connect_async
    from tests.stubs import serving

    image = sample_xrays(1, offset=66)[0]
    with serving(_dripping(240, 0.05)) as url:
        with connect(url, timeout=1.0) as api:
            with pytest.raises(DeadlineExceeded, match="still arriving after 1 s"):
                api.classify([image])

        async def call() -> None:
            async with connect_async(url, timeout=1.0) as api:
                await api.classify([image])

        with pytest.raises(DeadlineExceeded):
            asyncio.run(call())
        cli = _cli("classify", str(image), "--url", url, "--timeout", "1", "--json")
        assert cli.returncode == 4 and "in time" in cli.stderr, cli.stderr
        assert json.loads(cli.stdout)[0]["status"] == "error"


def test_retry_after_values_as_rfc_9110_allows_them() -> None:
    """Found by a helper: `Retry-After: ²` passed str.isdigit() and then crashed float(); an HTTP date, which the
    standard allows, and '1.5' were dropped."""
    from email.utils import format_datetime
    from datetime import UTC, datetime, timedelta

    from client._common import MAX_TIMEOUT_S, retry_after_s

    assert retry_after_s("120") == 120.0 and retry_after_s(" 1.5 ") == 1.5
    for junk in ("²", "abc", "-1", "", None, "1e3"):
        assert retry_after_s(junk) is None, junk
    assert retry_after_s("9" * 30) == MAX_TIMEOUT_S
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 80 <= retry_after_s(later) <= 91
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: retry now


@contextlib.contextmanager
def _grpc_answering(response: Any) -> Iterator[str]:
    """A gRPC server whose Classify answers every call with `response`: what another server, or a broken one, may
    send. The client's checks of it are under test."""
    from concurrent import futures

    import grpc

    from api.grpc import pb_grpc

    class Answer(pb_grpc.ClassifierServicer):
        def Classify(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClassifierServicer_to_server(Answer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("images, predictions", [(2, 0), (1, 1)])
def test_grpc_answers_that_are_not_the_classifiers_are_server_errors(images: int, predictions: int) -> None:
    """Found by a helper: a gRPC answer with no predictions for two images came back as an empty list (the CLI then
    crashed with StopIteration), and an empty Prediction as "ok" with no label (the CLI crashed formatting it).
    HTTP refused both; gRPC now does too."""
    from api.grpc import pb
    from client import ServerError

    files = [sample_xrays(1, offset=67)[0]] * images  # (1, 1): the count is right, the empty Prediction is not
    response = pb.ClassifyResponse(predictions=[pb.Prediction() for _ in range(predictions)])
    with _grpc_answering(response) as target:
        with connect(target, transport="grpc", timeout=10) as api:
            with pytest.raises(ServerError):
                api.classify(files)
        cli = _cli("classify", *map(str, files), "--grpc", "--url", target)
        assert cli.returncode == 5 and "Traceback" not in cli.stderr, cli.stderr


def test_json_output_is_json_whatever_fails(tmp_path: Path) -> None:
    """Found by a helper: with --json, a first request that failed as a whole (server down), an explain the server
    refused and a health check of a server that is down printed nothing on stdout; a later failed request printed
    JSON. A script can now always parse stdout."""
    image = sample_xrays(1, offset=68)[0]
    down = f"http://127.0.0.1:{free_port()}"
    for transport in ("http", "grpc"):
        flags = ["--grpc", "--url", down.removeprefix("http://")] if transport == "grpc" else ["--url", down]
        classify = _cli("classify", str(image), str(image), "--json", *flags)
        entries = json.loads(classify.stdout)
        assert classify.returncode == 4 and [e["status"] for e in entries] == ["error", "error"], classify.stderr
        assert entries[0]["path"] == str(image) and entries[0]["sent"] is False
        explain = _cli("explain", str(image), "--json", *flags)
        assert explain.returncode == 4 and json.loads(explain.stdout)["status"] == "error", explain.stderr
        assert json.loads(explain.stdout)["sent"] is False
        health = _cli("health", "--json", *flags)
        assert health.returncode == 4 and json.loads(health.stdout)["status"] == "error", health.stderr
    missing = _cli("explain", str(tmp_path / "nope.png"), "--json", "--url", down)
    assert missing.returncode == 2 and json.loads(missing.stdout)["sent"] is False, missing.stderr
    half_tls = _cli("health", "--json", "--cert", str(image), "--url", down.replace("http:", "https:"))  # after parsing
    assert half_tls.returncode == 2 and "needs both" in json.loads(half_tls.stdout)["error"], half_tls.stderr


@pytest.mark.parametrize("args, words", [
    (["--url", "http:/127.0.0.1:3000"], "a scheme needs '://'"),
    (["--url", "http//127.0.0.1:3000"], "a scheme needs '://'"),
    (["--url", "http://:3000"], "names no host"),
    (["--url", "http://127.0.0.1:3000?x=1"], "without a query or fragment"),
    (["--url", "127.0.0.1:3000#top"], "without a query or fragment"),
    (["--grpc", "--url", "127.0.0.1"], "has no port"),
    (["--grpc", "--url", "127.0.0.1:"], "has no port"),
])
def test_cli_refuses_addresses_that_would_go_elsewhere(args: list[str], words: str) -> None:
    """Found by a helper: `http:/host` was sent to the host 'http', a query was pasted into every path (405), and a
    gRPC host without a port dialled 443 in plaintext, each reported as an unreachable server (exit 4)."""
    done = _cli("health", *args)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


def _slow_reader(chunk: int, pause_s: float):  # -> a ThreadingHTTPServer to serve
    """A server that reads an upload `chunk` bytes per `pause_s` (a slow uplink, seen from the server), then answers
    at once: 503 with Retry-After 3. Whether the client reads that answer is under test."""
    import http.server

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            left = int(self.headers.get("content-length") or 0)
            while left > 0:
                left -= len(self.rfile.read(min(chunk, left)))
                time.sleep(pause_s)
            body = json.dumps({"error": "busy", "detail": [{"type": "not_ready", "loc": [], "msg": "busy"}]}).encode()
            self.send_response(503)
            for name, value in (("content-type", "application/json"), ("retry-after", "3"),
                                ("content-length", str(len(body)))):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)


def test_a_slow_upload_still_gets_its_answer() -> None:
    """A review's find: with the deadline counted from the call's start, a 10 MB upload that took longer than
    --timeout (each wait shorter) was sent whole, answered, and the answer thrown away as late. The timeout bounds
    each wait while sending and the answer's download, not the upload as a whole."""
    from client import Unavailable, connect_async
    from tests.stubs import serving

    files = [bytes(1024 * 1024)] * 10  # httpx writes each file's bytes in one send: 0.4 s each here
    with serving(_slow_reader(64 * 1024, 0.025)) as url:  # about 4 s to read them all
        with connect(url, timeout=1.5) as api:
            with pytest.raises(Unavailable) as answered:
                api.classify(files)
        assert answered.value.retry_after_s == 3.0

        async def call() -> None:
            async with connect_async(url, timeout=1.5) as api:
                await api.classify(files)

        with pytest.raises(Unavailable):
            asyncio.run(call())


def _logged_routes(server: ServerProcess, expected: int, timeout_s: float = 10.0) -> list[tuple[str, int]]:
    """(route, status) of the server's request-log lines, once `expected` of them have reached its log file."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [json.loads(line[line.find('{"ts"'):]) for line in server.logs().splitlines() if '{"ts"' in line]
        routes = [(r["route"], r["status"]) for r in records if r.get("logger") == "pneumonia.request"]
        if len(routes) >= expected or time.monotonic() > deadline:
            return routes
        time.sleep(0.2)


def test_cli_asks_a_smaller_per_request_limit_once(tmp_path: Path) -> None:
    """Found by a helper: against a server that takes fewer images per request than the CLI's 16, every batch was
    refused and the limit asked again (two extra requests per batch). Now it is asked once and kept."""
    from harness.servers import start_server

    server = start_server(tmp_path / "server.log", PNEUMONIA_MAX_IMAGES_PER_REQUEST="4", PNEUMONIA_WORKERS="1")
    try:
        paths = sample_xrays(20, offset=120)  # 40 files: the CLI's batches of 16, 16 and 8
        done = _cli("classify", *map(str, paths), "--url", server.url, "--json")
        assert done.returncode == 0, done.stderr
        assert [e["filename"] for e in json.loads(done.stdout)] == [p.name for p in paths]
        before = server.logs()
        routes = _logged_routes(server, expected=1 + 1 + 10)
    finally:
        server.stop()
    # one refused request of 16, one /health for the limit, then ten requests of 4 (batches split at once)
    assert routes == [("/classify", 400), ("/health", 200)] + [("/classify", 200)] * 10, (routes, before[-2000:])
