"""Access control, TLS, CORS, security headers, rate limits and log privacy, against real servers.

One extra `bentoml serve` for the module, configured the way a hospital
deployment would be: HTTPS with a certificate made here, API keys from an
environment variable and a file, /health protected, a tight rate limit, one
CORS origin, and client identifiers allowed in the log (the positive control
of the privacy test). The default session server is the open, private-by-
default counterpart.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.hostile_matrix import xray, xray_jpeg
from harness.servers import ServerProcess, bentoml_serve, free_port

KEY_ENV = "env-key-" + "a" * 24
KEY_FILE = "file-key-" + "b" * 24
KEY_HTTP_LIMIT = "file-key-" + "c" * 24  # only the HTTP rate-limit test spends this one's tokens
KEY_GRPC_LIMIT = "file-key-" + "d" * 24  # only the gRPC rate-limit test
ORIGIN = "https://viewer.example"
BURST = 20
PER_MINUTE = 60
MAX_REQUEST = 2_000_000
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (openssl CLI; the `cryptography` package is not installed)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class HttpsServer(ServerProcess):
    """A `bentoml serve --ssl-certfile/--ssl-keyfile` server, reached only through HTTPS."""

    ca: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.tls(), timeout=120, headers=headers)

    def start(self, ready_timeout: float = 180.0, ready_path: str = "/readyz") -> HttpsServer:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + ready_timeout
        with httpx.Client(verify=self.tls(), timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
                try:
                    if client.get(self.url + ready_path).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {ready_timeout}s:\n{self.logs()[-4000:]}")


@pytest.fixture(scope="module")
def secured(production_tag: str, tmp_path_factory: pytest.TempPathFactory) -> HttpsServer:
    folder = tmp_path_factory.mktemp("secured")
    cert, key = self_signed_certificate(folder)
    keys = folder / "api-keys.txt"
    keys.write_text(f"# one key per line\n{KEY_FILE}\n\n{KEY_HTTP_LIMIT}\n{KEY_GRPC_LIMIT}\n")
    base = bentoml_serve(
        "service:PneumoniaClassifier",
        free_port(),
        folder / "server.log",
        PNEUMONIA_SECURITY__API_KEYS=KEY_ENV,
        PNEUMONIA_SECURITY__API_KEYS_FILE=str(keys),
        PNEUMONIA_SECURITY__PROTECT_HEALTH="true",
        PNEUMONIA_SECURITY__RATE_LIMIT__ENABLED="true",
        PNEUMONIA_SECURITY__RATE_LIMIT__REQUESTS_PER_MINUTE=str(PER_MINUTE),
        PNEUMONIA_SECURITY__RATE_LIMIT__BURST=str(BURST),
        PNEUMONIA_SECURITY__CORS__ALLOW_ORIGINS=ORIGIN,
        PNEUMONIA_REQUEST_LOG__CLIENT_IDENTIFIERS="true",
        PNEUMONIA_MAX_REQUEST_BYTES=str(MAX_REQUEST),
    )
    server = HttpsServer(
        args=[*base.args, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        port=base.port,
        env=base.env,
        log_path=base.log_path,
        grpc_port=base.grpc_port,
        ca=cert,
    )
    server.start()
    yield server
    server.stop()


def upload(data: bytes | None = None, name: str = "x.jpeg") -> list:
    return [("images", (name, xray_jpeg() if data is None else data, "image/jpeg"))]


# --------------------------------------------------------------------------- TLS


def test_https_with_a_self_signed_certificate(secured: HttpsServer) -> None:
    with secured.client(**{"x-api-key": KEY_ENV}) as client:
        response = client.post("/classify", files=upload())
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] in ("NORMAL", "PNEUMONIA")
    assert response.headers["strict-transport-security"].startswith("max-age=")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(secured.url + "/readyz", timeout=10)  # a client that does not trust the certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{secured.port}/readyz", timeout=10)  # no plain HTTP on a TLS port


# --------------------------------------------------------------------------- API keys


def test_classify_needs_a_key_and_a_refusal_says_nothing_more(secured: HttpsServer) -> None:
    attempts = {
        "missing": {},
        "wrong": {"x-api-key": "x" * len(KEY_ENV)},
        "one character short": {"x-api-key": KEY_ENV[:-1]},
        "wrong scheme": {"authorization": f"Basic {KEY_ENV}"},
        "empty bearer": {"authorization": "Bearer"},
    }
    bodies = set()
    with secured.client() as client:
        for what, headers in attempts.items():
            response = client.post("/classify", files=upload(), headers=headers)
            assert response.status_code == 401, what
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["detail"][0]["type"] == "unauthorized"
            bodies.add(response.content)
        assert len(bodies) == 1  # missing and wrong keys are indistinguishable
        assert client.post("/classify", files=upload(), headers={"x-api-key": KEY_ENV}).status_code == 200
        assert (
            client.post("/classify", files=upload(), headers={"authorization": f"Bearer {KEY_FILE}"}).status_code == 200
        )


def test_health_protected_metrics_and_probes_open(secured: HttpsServer) -> None:
    with secured.client() as client:
        assert client.post("/health", json={}).status_code == 401
        assert client.post("/health", json={}, headers={"x-api-key": KEY_FILE}).json()["ready"] is True
        metrics = client.get("/metrics").text  # protect_metrics=false
        refused = [line for line in metrics.splitlines() if line.startswith("pneumonia_http_refused_total{")]
        assert any('reason="unauthorized"' in line and 'status="401"' in line for line in refused), refused
        assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200
        assert client.get("/no/such/route").status_code == 401  # unknown paths are protected too


def test_open_by_default(server: ServerProcess) -> None:
    assert httpx.post(server.url + "/health", json={}, timeout=30).status_code == 200
    assert httpx.post(server.url + "/classify", files=upload(), timeout=60).status_code == 200


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_per_client_with_retry_after(secured: HttpsServer) -> None:
    limited = {"x-api-key": KEY_HTTP_LIMIT}
    with secured.client() as client:
        statuses = [client.post("/health", json={}, headers=limited).status_code for _ in range(BURST + 10)]
        first = statuses.index(429)
        assert BURST <= first <= BURST + 5, statuses  # the burst, plus what refilled meanwhile
        refused = client.post("/health", json={}, headers=limited)
        assert refused.status_code == 429
        assert refused.json()["detail"][0]["type"] == "rate_limited"
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 60 / PER_MINUTE + 1
        # Another client is not affected, and this one is served again after Retry-After.
        assert client.post("/health", json={}, headers={"x-api-key": KEY_ENV}).status_code == 200
        time.sleep(wait)
        assert client.post("/health", json={}, headers=limited).status_code == 200


# --------------------------------------------------------------------------- CORS and headers


def test_cors_allow_list(secured: HttpsServer, server: ServerProcess) -> None:
    preflight = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "x-api-key",
    }
    with secured.client() as client:
        allowed = client.options("/classify", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        denied = client.options("/classify", headers={**preflight, "origin": "https://evil.example"})
        assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
        simple = client.post("/classify", files=upload(), headers={"origin": ORIGIN, "x-api-key": KEY_ENV})
        assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
    off = httpx.options(server.url + "/classify", headers=preflight, timeout=10)  # default: CORS off
    assert "access-control-allow-origin" not in off.headers


def test_security_headers_on_every_response(secured: HttpsServer, server: ServerProcess) -> None:
    with secured.client() as client:
        responses = {
            "classify": client.post("/classify", files=upload(), headers={"x-api-key": KEY_ENV}),
            "401": client.post("/classify", files=upload()),
            "404": client.get("/nope", headers={"x-api-key": KEY_ENV}),
            "metrics": client.get("/metrics"),
            "readyz": client.get("/readyz"),
            "docs": client.get("/"),
        }
    responses["plain http, 400"] = httpx.post(server.url + "/classify", files=upload(b"not an image"), timeout=60)
    for name, response in responses.items():
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], name
        assert response.headers["x-request-id"], name
    for name in ("classify", "401", "404", "metrics", "plain http, 400"):
        assert responses[name].headers["cache-control"] == "no-store", name
    assert responses["classify"].headers["content-security-policy"].startswith("default-src 'none'")
    assert responses["404"].json()["detail"][0]["type"] == "not_found"


def test_streamed_body_over_the_limit_gets_413(secured: HttpsServer) -> None:
    """A chunked body (no Content-Length) is cut off at max_request_bytes, not buffered to its end."""
    raw = socket.create_connection(("127.0.0.1", secured.port), timeout=30)
    with secured.tls().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nx-api-key: " + KEY_ENV.encode() + b"\r\n\r\n"
        )
        # Send past the limit, then end the body: the server answers now, not after its drain time. (No
        # select() on the socket to stop early: TLS 1.3 session tickets make it readable before any answer.)
        chunk, sent = b"\0" * 65536, 0
        while sent <= MAX_REQUEST + 4 * len(chunk):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:2000]
    assert json.loads(body)["detail"][0]["type"] == "request_too_large"
    with secured.client(**{"x-api-key": KEY_ENV}) as client:
        assert client.post("/classify", files=upload()).status_code == 200


# --------------------------------------------------------------------------- privacy of the logs


def marked_jpeg(marker: str) -> bytes:
    """A valid X-ray JPEG that carries `marker` inside its bytes (a comment segment)."""
    buffer = io.BytesIO()
    xray().save(buffer, format="JPEG", quality=90, comment=marker.encode())
    assert marker.encode() in buffer.getvalue()
    return buffer.getvalue()


def request_lines(server: ServerProcess, request_ids: set[str], timeout_s: float = 10.0) -> dict[str, dict]:
    """The request-log lines of `request_ids` (waits for the workers' output to reach the log file)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[str, dict] = {}
        for line in server.logs().splitlines():
            start = line.find('{"ts"')
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            if record.get("logger") == "pneumonia.request" and record.get("request_id") in request_ids:
                assert record["request_id"] not in found, "one line per request"
                found[record["request_id"]] = record
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def privacy_calls(client: httpx.Client) -> tuple[dict[str, str], dict[str, httpx.Response]]:
    """Calls that carry a recognisable file name, client request id, field name and payload."""
    tag = uuid.uuid4().hex[:12]
    markers = {
        "file name": f"patient-doe-{tag}.jpeg",
        "client request id": f"client-req-{tag}",
        "payload (good image)": f"payload-good-{tag}",
        "payload (bad upload)": f"payload-bad-{tag}",
        "field name": f"patient_field_{tag}",
    }

    def headers(call: str) -> dict[str, str]:
        return {"x-request-id": f"{markers['client request id']}-{call}", "user-agent": "privacy-test"}

    responses = {
        "good": client.post(
            "/classify",
            files=upload(marked_jpeg(markers["payload (good image)"]), markers["file name"]),
            headers=headers("good"),
        ),
        "bad": client.post(
            "/classify",
            files=upload(markers["payload (bad upload)"].encode() * 10, markers["file name"]),
            headers=headers("bad"),
        ),
        "field": client.post(
            "/classify",
            files=[(markers["field name"], ("x.jpeg", xray_jpeg(), "image/jpeg"))],
            headers=headers("field"),
        ),
    }
    assert [r.status_code for r in responses.values()] == [200, 400, 400]
    return markers, responses


def check_request_log(server: ServerProcess, responses: dict[str, httpx.Response]) -> dict[str, dict]:
    ids = {name: r.headers["x-request-id"] for name, r in responses.items()}
    lines = request_lines(server, set(ids.values()))
    assert set(lines) == set(ids.values()), "every call has its line, found by the id the client got back"
    good, bad, field = (lines[ids[name]] for name in ("good", "bad", "field"))
    assert (good["route"], good["status"], good["images"], good["reject_reasons"]) == ("/classify", 200, 1, [])
    assert (bad["status"], bad["images"], bad["reject_reasons"]) == (400, 1, ["not_an_image"])
    assert (field["status"], field["reject_reasons"]) == (400, ["missing", "unexpected_field"])
    assert all(line["duration_ms"] >= 0 for line in lines.values())
    return lines


def test_logs_hold_no_client_identifiers_by_default(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        markers, responses = privacy_calls(client)
    assert all(r.headers["x-request-id"] != markers["client request id"] for r in responses.values())
    lines = check_request_log(server, responses)
    assert all("client" not in line and "file_names" not in line for line in lines.values())
    logs = server.logs()
    leaked = [what for what, marker in markers.items() if marker in logs]
    assert not leaked, f"found in the server log: {leaked}"


def test_client_identifiers_are_logged_only_when_enabled(secured: HttpsServer) -> None:
    """The positive control: with request_log.client_identifiers=true they do appear (bytes never)."""
    with secured.client(**{"x-api-key": KEY_FILE}) as client:
        markers, responses = privacy_calls(client)
    assert responses["good"].headers["x-request-id"] == f"{markers['client request id']}-good"  # accepted, echoed
    lines = check_request_log(secured, responses)
    line = lines[f"{markers['client request id']}-good"]
    assert line["client"] == "127.0.0.1" and line["user_agent"] == "privacy-test"
    assert line["file_names"] == [markers["file name"]] and line["client_request_id"] == line["request_id"]
    logs = secured.logs()
    assert markers["payload (good image)"] not in logs and markers["payload (bad upload)"] not in logs


# --------------------------------------------------------------------------- gRPC


def test_grpc_classify_needs_a_key_and_is_rate_limited(secured: HttpsServer) -> None:
    pb = pytest.importorskip("api._proto.pneumonia.v1.classifier_pb2")
    pb_grpc = pytest.importorskip("api._proto.pneumonia.v1.classifier_pb2_grpc")
    request = pb.ClassifyRequest(images=[pb.Image(data=xray_jpeg())])
    with grpc.insecure_channel(secured.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key
        stub = pb_grpc.ClassifierStub(channel)
        refusals = set()
        for metadata in ((), (("x-api-key", "x" * 32),), (("authorization", "Basic nope"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, metadata=metadata, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            refusals.add(refused.value.details())
        assert len(refusals) == 1
        assert stub.Classify(request, metadata=(("x-api-key", KEY_ENV),), timeout=60).predictions[0].label
        assert stub.Classify(request, metadata=(("authorization", f"Bearer {KEY_FILE}"),), timeout=60).predictions
        limited = (("x-api-key", KEY_GRPC_LIMIT),)
        codes = []
        for _ in range(BURST + 10):
            try:
                stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=limited, timeout=30)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert dict(exc.trailing_metadata())["retry-after"] == "1"
                    break
        assert codes[-1] == "RESOURCE_EXHAUSTED" and BURST <= codes.index("RESOURCE_EXHAUSTED") <= BURST + 5, codes
