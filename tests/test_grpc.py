"""The gRPC endpoint against a live `bentoml serve`: health, reflection, parity with HTTP, batching, errors, workers."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from api._proto.pneumonia.v1 import classifier_pb2 as pb
from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc
from api.grpc import model_info_fields
from tests.images import encode, gradient, png_bomb
from harness.paths import ROOT, VENV_BIN
from harness.payloads import sample_xrays
from harness.servers import HANG_S, ServerProcess, bentoml_serve, free_port, server_env

SERVICE = "pneumonia.v1.Classifier"
COMPARED = ("label", "probability", "threshold", "confidence", "model", "warnings")


def wait_serving(target: str, timeout_s: float = 15.0) -> None:
    """SERVING follows HTTP readiness by a few milliseconds (the worker's health task)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gRPC {target} not SERVING after {timeout_s} s")
            time.sleep(0.05)


def samples(metrics_text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called `name` whose labels include `labels`."""
    return [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return sum(samples(httpx.get(server.url + "/metrics", timeout=10).text, name, **labels))


def image(path: Path, **fields: str) -> pb.Image:
    return pb.Image(data=path.read_bytes(), **fields)


def big_png(side: int = 3000) -> bytes:
    """A small file (25 KB) that costs the server about 50 ms to decode and shrink."""
    return encode(gradient((side, side)), "PNG")


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> grpc.Channel:
    wait_serving(server.grpc_target)
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
    with grpc.insecure_channel(server.grpc_target, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(channel)


def test_health_check_says_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service_and_drives_a_classify_call(channel: grpc.Channel) -> None:
    """What grpcurl does: discover the service and its messages by reflection, then call it without the proto."""
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {"Classify", "Explain", "GetModelInfo"}
    method = service.methods_by_name["Classify"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{SERVICE}/Classify", request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
    )
    path = sample_xrays(1)[1]
    request = request_cls()
    request.images.add(data=path.read_bytes(), filename=path.name)
    response = call(request, timeout=60)
    assert len(response.predictions) == 1
    assert response.predictions[0].label in ("NORMAL", "PNEUMONIA") and response.predictions[0].filename == path.name


def test_grpc_and_http_give_identical_predictions(server: ServerProcess, stub: pb_grpc.ClassifierStub) -> None:
    paths = sample_xrays(3, offset=7)
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    over_http = httpx.post(server.url + "/classify", files=files, timeout=60)
    assert over_http.status_code == 200, over_http.text
    over_grpc = stub.Classify(pb.ClassifyRequest(images=[image(p, filename=p.name, client_id=f"acc-{i}") for i, p in enumerate(paths)]), timeout=60)
    assert len(over_grpc.predictions) == len(paths)
    for i, (expected, got) in enumerate(zip(over_http.json(), over_grpc.predictions)):
        for name in COMPARED:
            value = list(getattr(got, name)) if name == "warnings" else getattr(got, name)
            assert value == expected[name], (paths[i].name, name)
        assert {k: getattr(got.image, k) for k in ("width", "height", "mode", "format")} == {
            k: v for k, v in expected["image"].items() if k != "dicom"}
        assert expected["image"]["dicom"] is None and not got.image.HasField("dicom")  # DICOM only: tests/test_dicom.py
        assert got.batch_size == expected["batch_size"] == len(paths)  # same forward pass composition
        assert (got.filename, got.client_id) == (paths[i].name, f"acc-{i}")


def test_concurrent_grpc_calls_are_batched(server: ServerProcess) -> None:
    name = "bentoml_service_adaptive_batch_size"
    before_sum, before_count = metric(server, name + "_sum", method_name="classify"), metric(server, name + "_count", method_name="classify")
    paths = sample_xrays(8, offset=20)

    async def burst() -> list[pb.ClassifyResponse]:
        async with grpc.aio.insecure_channel(server.grpc_target) as aio_channel:
            aio_stub = pb_grpc.ClassifierStub(aio_channel)
            return await asyncio.gather(*(aio_stub.Classify(pb.ClassifyRequest(images=[image(p)]), timeout=60) for p in paths))

    responses = asyncio.run(burst())
    sizes = [r.predictions[0].batch_size for r in responses]
    requests = metric(server, name + "_sum", method_name="classify") - before_sum
    batches = metric(server, name + "_count", method_name="classify") - before_count
    assert requests == len(paths)  # every call went through the batcher of the HTTP API
    assert batches < len(paths) and max(sizes) > 1, (batches, sizes)


def test_grpc_and_http_calls_share_forward_passes(server: ServerProcess) -> None:
    """12 gRPC + 12 HTTP single-image calls at once: a forward pass of more than 12 images held both kinds."""
    paths = sample_xrays(6, offset=40)

    async def burst() -> tuple[list[int], list[int]]:
        async with grpc.aio.insecure_channel(server.grpc_target) as aio_channel, httpx.AsyncClient(timeout=60) as http:
            aio_stub = pb_grpc.ClassifierStub(aio_channel)
            grpc_calls = [aio_stub.Classify(pb.ClassifyRequest(images=[image(p)]), timeout=60) for p in paths]
            http_calls = [http.post(server.url + "/classify", files=[("images", (p.name, p.read_bytes()))]) for p in paths]
            results = await asyncio.gather(*grpc_calls, *http_calls)
        grpc_sizes = [r.predictions[0].batch_size for r in results[: len(paths)]]
        http_sizes = [r.json()[0]["batch_size"] for r in results[len(paths) :]]
        return grpc_sizes, http_sizes

    for _ in range(3):  # the dispatcher decides; a mixed pass shows up in the first round nearly always
        grpc_sizes, http_sizes = asyncio.run(burst())
        if max(grpc_sizes + http_sizes) > len(paths):
            return
    pytest.fail(f"no forward pass mixed gRPC and HTTP calls: gRPC {grpc_sizes}, HTTP {http_sizes}")


def _tiny_png() -> bytes:
    return encode(gradient((8, 8)), "PNG")


@pytest.mark.parametrize(
    ("make_images", "code", "words", "reason"),
    [
        (lambda: [], grpc.StatusCode.INVALID_ARGUMENT, "at least one image", "no_images"),
        (lambda: [pb.Image(data=b"definitely not an image", filename="notes.txt")], grpc.StatusCode.INVALID_ARGUMENT, "image 0 (notes.txt): the file is not a recognised image", "not_an_image"),
        (lambda: [pb.Image(data=b"")], grpc.StatusCode.INVALID_ARGUMENT, "empty", "empty"),
        (lambda: [pb.Image(data=sample_xrays(1)[0].read_bytes()[:1500])], grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded", "corrupt"),
        (lambda: [image(sample_xrays(1)[0]), pb.Image(data=_tiny_png(), filename="thumb.png")], grpc.StatusCode.INVALID_ARGUMENT, "image 1 (thumb.png)", "too_small"),
        (lambda: [pb.Image(data=png_bomb(8000))], grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit of 50,000,000 pixels", "too_many_pixels"),
        (lambda: [pb.Image(data=b"\xff\xd8\xff" + bytes(21 * 1024 * 1024))], grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit of 20,971,520 bytes", "too_many_bytes"),
        (lambda: [image(sample_xrays(1)[0])] * 17, grpc.StatusCode.RESOURCE_EXHAUSTED, "images in one request; the limit is 16", "too_many_images"),
        (lambda: [pb.Image(data=bytes(23 * 1024 * 1024))] * 3, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max", None),
    ],
    ids=["no-images", "not-an-image", "empty", "truncated", "too-small", "too-many-pixels", "too-many-bytes", "too-many-images", "message-too-large"],
)
def test_bad_input_gets_its_status_code(server: ServerProcess, stub: pb_grpc.ClassifierStub, make_images, code, words,
                                       reason) -> None:
    """Refused with its status, named, and counted by reason as HTTP counts it."""
    before = metric(server, "pneumonia_rejected_inputs_total", reason=reason) if reason else 0.0
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(pb.ClassifyRequest(images=make_images()), timeout=60)
    assert error.value.code() == code, error.value.details()
    assert words in error.value.details()
    if reason is not None:
        assert dict(error.value.trailing_metadata())["pneumonia-reject-reasons"].split(",")[0] == reason
        assert metric(server, "pneumonia_rejected_inputs_total", reason=reason) - before == 1
    path = sample_xrays(1, offset=2)[0]  # the worker is unharmed
    assert len(stub.Classify(pb.ClassifyRequest(images=[image(path)]), timeout=60).predictions) == 1


def test_a_long_or_odd_file_name_is_cut_in_the_status_as_in_the_log(stub: pb_grpc.ClassifierStub) -> None:
    """A helper's find: the refusal echoed `filename` whole, so a 20,000-character name pushed the status past
    gRPC's metadata limit (RESOURCE_EXHAUSTED "Stream removed", trailers lost) and control characters went
    through as sent. Names are now shown as the request log keeps them: printable, at most 64 characters."""
    names = ["A" * 20000, "x\r\n\x1b[31mred\x00" + "y" * 600]
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(pb.ClassifyRequest(images=[pb.Image(data=b"", filename=name) for name in names]), timeout=60)
    details = error.value.details()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"image 0 ({'A' * 64})" in details and "A" * 65 not in details
    assert "image 1 (x???[31mred?yyy" in details and "\r" not in details and "\x1b" not in details
    assert dict(error.value.trailing_metadata())["pneumonia-reject-reasons"] == "empty,empty"


def test_client_deadline_is_honoured(server: ServerProcess, stub: pb_grpc.ClassifierStub) -> None:
    """A call whose deadline passes is abandoned by the server too (counted as DEADLINE_EXCEEDED there)."""
    labels = {"grpc_method": "Classify", "grpc_code": "DEADLINE_EXCEEDED"}
    before = metric(server, "pneumonia_grpc_server_handled_total", **labels)
    big = big_png()
    with pytest.raises(grpc.RpcError) as error:  # 16 decodes of 9 megapixels each cannot finish in 0.2 s
        stub.Classify(pb.ClassifyRequest(images=[pb.Image(data=big)] * 16), timeout=0.2)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 120  # a hang detector: the server records the call once it gives up on it
    while metric(server, "pneumonia_grpc_server_handled_total", **labels) <= before:
        assert time.monotonic() < deadline, "the server never recorded the expired call"
        time.sleep(0.2)
    path = sample_xrays(1, offset=3)[1]
    assert len(stub.Classify(pb.ClassifyRequest(images=[image(path)]), timeout=60).predictions) == 1


def test_model_info_matches_http_health(server: ServerProcess, stub: pb_grpc.ClassifierStub, production_tag: str) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    health = httpx.post(server.url + "/health", json={}, timeout=10).json()
    assert info.ready and info.model == health["model"] == production_tag
    assert (info.arch, info.threshold, info.temperature) == (health["arch"], health["threshold"], health["temperature"])
    assert info.limits.max_bytes == health["limits"]["max_bytes"]
    assert info.limits.max_images_per_request == health["limits"]["max_images_per_request"]
    fields = model_info_fields(info)
    # every field of both sections (a helper: the DICOM window and the dispatcher were HTTP's only)
    assert fields["batching"] == health["batching"] and health["batching"]["max_batch_size"] == 32
    assert fields["preprocess"] == health["preprocess"] and "dicom_window" in fields["preprocess"]
    assert info.validation_metrics["accuracy"] == pytest.approx(health["validation_metrics"]["accuracy"])
    assert info.engine == health["engine"] and not info.HasField("site_calibration")
    # every limit, those a gate may lack read back as null (an absent optional field), as HTTP says it
    assert fields["validity"] == health["validity"] and health["validity"]["fitted"] is True


def test_grpc_listens_only_on_the_interface_http_was_given(server: ServerProcess) -> None:
    """`bentoml serve --host 127.0.0.1` with no PNEUMONIA_GRPC__HOST: gRPC must not listen on every interface."""
    import ipaddress

    import psutil

    def ipv4(address: str) -> str:  # gRPC listens on an IPv6 socket: ::ffff:127.0.0.1 is 127.0.0.1
        ip = ipaddress.ip_address(address)
        return str(getattr(ip, "ipv4_mapped", None) or ip)

    assert "PNEUMONIA_GRPC__HOST" not in server.env
    listening = {ipv4(conn.laddr.ip) for conn in psutil.net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN and conn.laddr.port == server.grpc_port}
    assert listening == {"127.0.0.1"}  # not 0.0.0.0 or ::


def test_grpc_calls_are_counted_in_metrics(server: ServerProcess, stub: pb_grpc.ClassifierStub) -> None:
    ok = {"grpc_service": SERVICE, "grpc_method": "Classify", "grpc_code": "OK"}
    bad = {**ok, "grpc_code": "INVALID_ARGUMENT"}
    before_ok, before_bad = metric(server, "pneumonia_grpc_server_handled_total", **ok), metric(server, "pneumonia_grpc_server_handled_total", **bad)
    before_latency = {labels["grpc_code"]: metric(server, "pneumonia_grpc_server_handling_seconds_count", **labels)
                      for labels in (ok, bad)}
    path = sample_xrays(1, offset=5)[0]
    stub.Classify(pb.ClassifyRequest(images=[image(path)]), timeout=60)
    stub.Classify(pb.ClassifyRequest(images=[image(path)]), timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(images=[pb.Image(data=b"nope")]), timeout=60)
    assert metric(server, "pneumonia_grpc_server_handled_total", **ok) - before_ok == 2
    assert metric(server, "pneumonia_grpc_server_handled_total", **bad) - before_bad == 1
    # Latency by code too: the alert's p99 of answered calls must not mix in refusals that end in milliseconds.
    assert metric(server, "pneumonia_grpc_server_handling_seconds_count", **ok) - before_latency["OK"] == 2
    assert metric(server, "pneumonia_grpc_server_handling_seconds_count", **bad) - before_latency["INVALID_ARGUMENT"] == 1


def test_calls_to_unknown_methods_are_counted_under_one_label(server: ServerProcess, channel: grpc.Channel) -> None:
    """A scanner's method names must not each become a metric series, nor go uncounted."""
    labels = {"grpc_service": "unmatched", "grpc_method": "unmatched", "grpc_code": "UNIMPLEMENTED"}
    before = metric(server, "pneumonia_grpc_server_handled_total", **labels)
    for name in ("/pneumonia.v1.Classifier/NoSuchMethod", "/no.such.Service/Probe", "/x"):
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary(name)(b"", timeout=10)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert "NoSuchMethod" not in text and "no.such.Service" not in text
    assert metric(server, "pneumonia_grpc_server_handled_total", **labels) - before == 3


def test_a_body_that_is_not_a_protobuf_message_is_invalid_argument(server: ServerProcess, channel: grpc.Channel,
                                                                   stub: pb_grpc.ClassifierStub) -> None:
    """grpcio itself answered a body that does not parse with UNKNOWN, naming Python's DecodeError, uncounted."""
    raw = channel.unary_unary(f"/{SERVICE}/Classify")  # no serialisers: the bytes go out as they are
    bad = {"grpc_service": SERVICE, "grpc_method": "Classify", "grpc_code": "INVALID_ARGUMENT"}
    before = metric(server, "pneumonia_grpc_server_handled_total", **bad)
    for body in (b"\xff\xff\xff\xff\xff", bytes([0x0A, 6, 0x12, 4, 0xFF, 0xFE, 0, 1])):  # bad wire format; bad UTF-8
        with pytest.raises(grpc.RpcError) as info:
            raw(body, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid protobuf message" in info.value.details() and "Error" not in info.value.details()
    assert metric(server, "pneumonia_grpc_server_handled_total", **bad) - before == 2
    path = sample_xrays(1, offset=6)[0]
    assert len(stub.Classify(pb.ClassifyRequest(images=[image(path)]), timeout=60).predictions) == 1


def test_garbage_to_health_and_reflection_is_invalid_argument_without_a_traceback(server: ServerProcess,
                                                                                  channel: grpc.Channel) -> None:
    """A helper's find: the parse check covered the classifier's unary methods only. Garbage sent to health Watch
    or to reflection got UNKNOWN naming Python's DecodeError and an ERROR traceback in the log per call (375 KB in
    a second, no key needed), uncounted for Watch. Every method now answers INVALID_ARGUMENT, counted."""
    calls = {
        "Check": lambda: channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff", timeout=10),
        "Watch": lambda: list(channel.unary_stream("/grpc.health.v1.Health/Watch")(b"\xff", timeout=10)),
        "ServerReflectionInfo": lambda: list(channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(iter([b"\xff"]), timeout=10)),
    }
    tracebacks = server.logs().count("Traceback")
    for method, call in calls.items():
        service = "grpc.reflection.v1alpha.ServerReflection" if method == "ServerReflectionInfo" else "grpc.health.v1.Health"
        labels = {"grpc_service": service, "grpc_method": method, "grpc_code": "INVALID_ARGUMENT"}
        before = metric(server, "pneumonia_grpc_server_handled_total", **labels)
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
        assert "not a valid protobuf message" in info.value.details() and "classifier.proto" not in info.value.details()
        assert metric(server, "pneumonia_grpc_server_handled_total", **labels) - before == 1, method
    assert server.logs().count("Traceback") == tracebacks


def test_a_malformed_image_beside_an_oversized_one_is_invalid_argument_in_either_order(
        stub: pb_grpc.ClassifierStub) -> None:
    """The status followed the first image's reason: the same two images gave two codes, by order."""
    bomb, garbage = pb.Image(data=png_bomb(), filename="bomb.png"), pb.Image(data=b"notanimage", filename="x.bin")
    for images in ([bomb, garbage], [garbage, bomb]):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(images=images), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


@pytest.mark.slow
def test_two_workers_share_the_grpc_port(tmp_path: Path, production_tag: str) -> None:
    """On the bound port of a server whose models are not warm yet, a call gets UNAVAILABLE from the servicer;
    once warm, connections spread over both workers. The warm-up is held until the test releases it."""
    release = tmp_path / "release-warm-up"
    proc = bentoml_serve("service:PneumoniaClassifier", free_port(), tmp_path / "server.log", PNEUMONIA_WORKERS="2",
                         PNEUMONIA_WARMUP_DELAY_S="600", PNEUMONIA_WARMUP_RELEASE_FILE=str(release),
                         PNEUMONIA_READY_WAIT_S="0.2")  # each early call waits this long for the model first
    path = sample_xrays(1, offset=9)[0]
    try:
        proc.start(ready_timeout=HANG_S, ready_path="/livez")  # listening, models held back
        with grpc.insecure_channel(proc.grpc_target) as ch:
            grpc.channel_ready_future(ch).result(timeout=HANG_S)  # both workers bind in their start-up hook
            for _ in range(8):  # fresh calls on one connection, then fresh connections below: either worker
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        for _ in range(8):
            with grpc.insecure_channel(proc.grpc_target) as ch, pytest.raises(grpc.RpcError) as early:
                pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(images=[image(path)]), timeout=30)
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in early.value.details(), early.value.details()  # answered, not refused
        assert "ready: model warm" not in proc.logs()
        release.touch()
        deadline = time.monotonic() + HANG_S  # a hang detector: both models load and warm up
        while len(set(re.findall(r"worker (\d+) ready: model warm", proc.logs()))) < 2:
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.2)
        wait_serving(proc.grpc_target, timeout_s=120)
        workers_seen: set[str] = set()
        for attempt in range(60):  # a fresh connection each time: SO_REUSEPORT hands them to either worker
            with grpc.insecure_channel(proc.grpc_target) as ch:
                pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(images=[image(path)]), timeout=60)
            if attempt % 8 == 7:
                text = httpx.get(proc.url + "/metrics", timeout=10).text
                workers_seen = {
                    s.labels["worker_index"]
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                    if s.name == "bentoml_service_adaptive_batch_size_count"
                    and s.labels.get("method_name") == "classify" and s.value > 0
                }
                if len(workers_seen) >= 2:
                    break
        assert len(workers_seen) == 2, f"gRPC calls reached only worker(s) {workers_seen}"
    finally:
        proc.stop()


@pytest.mark.slow
def test_locust_grpc_user_runs_without_failures(server: ServerProcess, tmp_path: Path) -> None:
    """The gRPC user class inside the project's Locust suite, a few seconds against the live server."""
    wait_serving(server.grpc_target)
    stats_json = tmp_path / "final_stats.json"
    # Until every request type was sent 3 times (PNEUMONIA_LOADTEST_STOP_AFTER); -t is only the upper bound.
    env = server_env(PNEUMONIA_LOADTEST_GRPC="1", PNEUMONIA_GRPC_URL=server.grpc_target,
                     PNEUMONIA_LOADTEST_STATS_JSON=str(stats_json), PNEUMONIA_LOADTEST_STOP_AFTER="3")
    args = [
        str(VENV_BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "-u", "3", "-r", "3",
        "-t", f"{HANG_S:.0f}s", "--host", server.url, "--only-summary", "GrpcClassifyUser",
    ]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S + 300)
    assert stats_json.exists(), result.stderr[-3000:]
    stats = json.loads(stats_json.read_text())
    rows = {row["name"]: row for row in stats["by_request"]}
    assert set(rows) == {"Classify [full-size]", "Classify [single]", "Classify [4 images]", "Health/Check"}, rows
    assert all(row["type"] == "gRPC" and row["requests"] >= 3 for row in rows.values()), rows
    assert stats["aggregated"]["failures"] == 0, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
