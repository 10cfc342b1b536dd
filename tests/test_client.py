"""The typed client package and its CLI, over both transports, against the live session server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

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
from tests.secured import BURST, KEY_CLI_LIMIT, KEY_CLIENT, KEY_FILE

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
    assert [item["filename"] for item in json.loads(many.stdout)] == [p.name for p in paths]
    bad = tmp_path / "notes.jpeg"
    bad.write_bytes(b"minutes of the meeting, not an X-ray")
    mixed = _cli("classify", str(paths[0]), str(bad), str(paths[1]), *flags, "--url", _target(live, transport))
    assert mixed.returncode == 3, mixed.stderr
    assert f"{paths[0].name}: " in mixed.stdout and f"{paths[1].name}: " in mixed.stdout
    assert mixed.stderr.strip().splitlines() == [line for line in mixed.stderr.strip().splitlines()
                                                 if line.startswith("error: notes.jpeg: ")]
    assert "not a recognised image" in mixed.stderr and "Traceback" not in mixed.stderr
    as_json = _cli("classify", str(paths[0]), str(bad), *flags, "--url", _target(live, transport), "--json")
    first, second = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and second["reasons"] == ["not_an_image"] and first["filename"] == paths[0].name
    # the second file: its message named it "image 0", its place in the one-file request sent again
    assert second["error"] == "the upload is not a recognised image file", second
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
    assert [e["filename"] for e in entries] == [Path(n).name for n in names]
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
    assert refused.returncode == 0 and "REFUSED (blank)" in refused.stdout, refused.stdout + refused.stderr
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


def test_cli_refuses_bad_options_before_connecting_and_stops_on_ctrl_c(live: ServerProcess, tmp_path: Path) -> None:
    """Found by a helper: an empty --url meant the default server, port 99999 read as 'connection refused', a
    garbage --ca-file gave gRPC's handshaker errors, a password in the URL was printed, Ctrl-C a traceback."""
    import signal
    import socket

    from harness.servers import child_stderr, default_sigint

    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    for args, words in ((["--url", ""], "argument --url: empty"),
                        (["--url", "http://127.0.0.1:99999"], "argument --url: 'http://127.0.0.1:99999': Port out of range"),
                        (["--ca-file", str(garbage)], f"the TLS ca_file {garbage} holds no PEM certificate"),
                        (["--ca-file", str(garbage), "--grpc"], f"the TLS ca_file {garbage} holds no PEM certificate")):
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
