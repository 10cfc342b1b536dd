"""The HTTP service against a real `bentoml serve` of the shipped model, with real X-rays."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.images import encode, gradient, png_bomb
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import HANG_S, ServerProcess, server_env


def classify(server: ServerProcess, files: list[tuple[str, bytes]], field: str = "images") -> httpx.Response:
    return httpx.post(server.url + "/classify", files=[(field, (name, data)) for name, data in files], timeout=120)


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over all label sets that contain `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics", timeout=30).text


def test_served_probabilities_equal_offline_evaluation(server: ServerProcess, tmp_path: Path) -> None:
    files = sample_xrays(6, offset=200)
    for path in files:
        target = tmp_path / "eval" / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    # An image the service refuses (blank): training.evaluate scored it as an answer without a word (a helper's find).
    Image.new("L", (320, 300), 128).save(tmp_path / "eval" / "NORMAL" / "blank.png")
    report = tmp_path / "offline.json"
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", "production", "--data-dir", str(tmp_path),
         "--split", "eval", "--json", str(report)],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=HANG_S,
    )
    assert result.returncode == 0, result.stderr
    assert "roc_auc" in result.stdout and "PNEUMONIA" in result.stdout
    assert f"the validity gate refuses 1 of these {len(files) + 1} images (1 blank)" in result.stdout, result.stdout
    assert f"validity mode (refuse) answers {len(files)}" in result.stdout
    assert f"on the {len(files)} it answers: ROC-AUC" in result.stdout
    offline = {Path(p["file"]).name: p for p in json.loads(report.read_text())["predictions"]}
    assert offline["blank.png"]["refusal"] == "blank" and {p["refusal"] for p in offline.values()} == {"blank", None}
    response = classify(server, [(p.name, p.read_bytes()) for p in files])
    assert response.status_code == 200, response.text
    served = response.json()
    assert len(served) == len(files)
    for path, item in zip(files, served):
        assert item["probability"] == pytest.approx(offline[path.name]["probability"], abs=1e-4)
        assert item["label"] == offline[path.name]["label"] or abs(item["probability"] - item["threshold"]) < 1e-4


def test_response_contract_and_request_order(server: ServerProcess, production_tag: str) -> None:
    normal, pneumonia = sample_xrays(1, offset=10)
    payload = [("a.jpeg", normal.read_bytes()), ("b.jpeg", pneumonia.read_bytes()), ("c.jpeg", normal.read_bytes())]
    response = classify(server, payload)
    items = response.json()
    assert [i["probability"] for i in items][0] == pytest.approx(items[2]["probability"], abs=1e-6)
    alone = classify(server, payload[1:2]).json()[0]
    assert items[1]["probability"] == pytest.approx(alone["probability"], abs=1e-5)
    for item in items:
        assert item["label"] in ("NORMAL", "PNEUMONIA")
        assert 0.0 <= item["probability"] <= 1.0
        assert item["label"] == ("PNEUMONIA" if item["probability"] >= item["threshold"] else "NORMAL")
        assert item["model"] == production_tag
        assert item["confidence"] == pytest.approx(max(item["probability"], 1 - item["probability"]), abs=1e-6)
        assert item["image"] == {"width": 224, "height": 224, "mode": "RGB", "format": "JPEG", "dicom": None}
        # Measured on the server from the image's arrival to its answer: inside what the client waited.
        assert 0 < item["processing_ms"] <= response.elapsed.total_seconds() * 1000
        assert item["batch_size"] >= 3  # the request's three images went through one forward pass


def test_odd_formats_and_warnings_are_served(server: ServerProcess) -> None:
    payload = [("scan.png", encode(gradient(mode="I;16"), "PNG")), ("photo.png", encode(gradient((80, 80), "RGB"), "PNG"))]
    items = classify(server, payload).json()
    assert items[0]["image"]["mode"] == "I;16"
    assert any("low resolution" in w for w in items[1]["warnings"])


def test_concurrent_requests_are_batched(server: ServerProcess) -> None:
    before = metrics(server)
    images = [p.read_bytes() for p in sample_xrays(12, offset=30)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda data: classify(server, [("x.jpeg", data)]), images))
    assert all(r.status_code == 200 for r in responses)
    after = metrics(server)
    name = "bentoml_service_adaptive_batch_size"
    batches = metric_total(after, name + "_count", method_name="classify") - metric_total(before, name + "_count", method_name="classify")
    batched_images = metric_total(after, name + "_sum", method_name="classify") - metric_total(before, name + "_sum", method_name="classify")
    assert batched_images == 24
    assert batches < 24, "no two concurrent requests shared a forward pass"
    assert max(item.json()[0]["batch_size"] for item in responses) > 1


def test_metrics_move_with_traffic(server: ServerProcess, production_tag: str) -> None:
    before = metrics(server)
    ok = classify(server, [(p.name, p.read_bytes()) for p in sample_xrays(1, offset=40)])
    assert ok.status_code == 200
    bad = classify(server, [("notes.jpeg", b"definitely not an image")])
    assert bad.status_code == 400
    after = metrics(server)
    predicted = lambda text: metric_total(text, "pneumonia_predictions_total", model=production_tag)  # noqa: E731
    assert predicted(after) - predicted(before) == 2
    labels = [i["label"] for i in ok.json()]
    for label in set(labels):
        delta = metric_total(after, "pneumonia_predictions_total", label=label) - metric_total(before, "pneumonia_predictions_total", label=label)
        assert delta == labels.count(label)
    assert metric_total(after, "pneumonia_probability_count") - metric_total(before, "pneumonia_probability_count") == 2
    # images per forward pass, not calls (BentoML's adaptive_batch_size counted this call of 2 images as 1)
    assert metric_total(after, "pneumonia_batch_images_sum") - metric_total(before, "pneumonia_batch_images_sum") == 2
    rejected = lambda text: metric_total(text, "pneumonia_rejected_inputs_total", reason="not_an_image")  # noqa: E731
    assert rejected(after) - rejected(before) == 1
    assert re.search(r'pneumonia_model_info\{[^}]*model="' + re.escape(production_tag), after)
    assert "bentoml_service_request_total" in after


def test_request_metrics_are_labelled_by_route_not_by_raw_path(server: ServerProcess) -> None:
    """BentoML labels its request metrics with the path as sent: every URL a scanner tries would add its own series
    to /metrics. Unknown paths count as `unmatched`, the web page's files as `/ui`; routing still sees the real path."""
    requests = lambda text, endpoint: metric_total(text, "bentoml_service_request_total", endpoint=endpoint)  # noqa: E731
    before = metrics(server)
    probes = [f"/no-such-route-{k}" for k in range(5)] + ["/ui/../service.py"]
    assert all(httpx.get(server.url + path, timeout=30).status_code == 404 for path in probes)
    page = httpx.get(server.url + "/ui/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert httpx.get(server.url + "/ui/no-such-file.js", timeout=30).status_code == 404
    ok = classify(server, [(p.name, p.read_bytes()) for p in sample_xrays(1, offset=41)])
    assert ok.status_code == 200
    after = metrics(server)
    assert "no-such" not in after and "service.py" not in after
    assert requests(after, "unmatched") - requests(before, "unmatched") == len(probes)
    assert requests(after, "/ui") - requests(before, "/ui") == 2
    assert requests(after, "/classify") - requests(before, "/classify") == 1


TRUNCATED = sample_xrays(1)[0].read_bytes()[:3000]


@pytest.mark.parametrize(
    "files,field,status,reason",
    [
        ([("notes.jpeg", b"hello, not an image")], "images", 400, "not_an_image"),
        ([("cut.jpeg", TRUNCATED)], "images", 400, "corrupt"),
        ([("empty.jpeg", b"")], "images", 400, "empty"),
        ([("bomb.png", png_bomb())], "images", 400, "too_many_pixels"),
        ([("x.png", encode(gradient(), "PNG"))] * 17, "images", 400, "too_many_images"),
        ([("x.png", encode(gradient(), "PNG"))], "image", 400, "missing"),
    ],
    ids=["not-an-image", "truncated", "empty", "pixel-bomb", "too-many-images", "missing-field"],
)
def test_bad_input_gets_a_4xx_naming_the_problem(server: ServerProcess, files, field, status, reason) -> None:
    """Refused, named, and counted by reason as gRPC counts it (a request with no `images` field is not an image)."""
    refused = lambda: metric_total(metrics(server), "pneumonia_rejected_inputs_total", reason=reason)  # noqa: E731
    before = refused()
    response = classify(server, files, field=field)
    assert response.status_code == status, response.text
    body = response.json()
    assert reason in json.dumps(body)
    assert refused() - before == (0 if reason == "missing" else 1)
    assert not re.match(r"\d+ validation error", body["error"])  # the first reason heads the body
    assert body["detail"][0]["msg"] in body["error"]
    good = classify(server, [("ok.jpeg", sample_xrays(1)[0].read_bytes())])
    assert good.status_code == 200


def test_too_many_bytes_is_refused(server: ServerProcess) -> None:
    big = b"\xff\xd8\xff\xe0" + bytes(21 * 1024 * 1024)
    response = classify(server, [("huge.jpeg", big)])
    assert response.status_code in (400, 413), response.text
    assert "bytes" in response.text
    assert classify(server, [("ok.jpeg", sample_xrays(1)[0].read_bytes())]).status_code == 200


def test_health_and_probes(server: ServerProcess, production_tag: str) -> None:
    import models_registry

    card = models_registry.read_card(production_tag)
    first = httpx.post(server.url + "/health", json={}, timeout=30).json()
    time.sleep(1.5)
    health = httpx.post(server.url + "/health", json={}, timeout=30).json()
    assert health["ready"] is True and health["model"] == production_tag
    # What the store holds for the served model, not values the server could make up.
    assert health["threshold"] == card.threshold and health["temperature"] == card.temperature
    assert health["validation_metrics"] == json.loads(json.dumps(card.val_metrics))
    assert health["preprocess"] == card.preprocess.model_dump(mode="json")
    assert health["batching"]["max_batch_size"] == 32  # as the session server was started
    assert health["engine"] == "onnxruntime" and health["site_calibration"] is None  # the default engine
    assert health["validity"] == {"mode": "refuse", "fitted": True, "blank_limit": card.validity.blank_std_limit,
                                  "outlier_limit": card.validity.outlier_limit,
                                  "upright_limit": card.validity.orientation_limit,
                                  "partial_limit": card.validity.partial_limit,
                                  "level_share_limit": card.validity.level_share_limit}
    # Uptime counts from the worker's start: it grows by the time between two calls, and never exceeds the
    # time since this test started the server process.
    assert health["uptime_s"] - first["uptime_s"] >= 1.4
    assert server.started_at is not None and health["uptime_s"] <= time.monotonic() - server.started_at
    assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def histogram(text: str, name: str, **labels: str) -> tuple[dict[float, float], float, float]:
    """Buckets (upper bound -> cumulative count), count and sum of a Prometheus histogram, summed over the
    label sets that contain `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not all(sample.labels.get(k) == v for k, v in labels.items()):
                continue
            if sample.name == name + "_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == name + "_count":
                count += sample.value
            elif sample.name == name + "_sum":
                total += sample.value
    return buckets, count, total


# The server stops its clock after it has sent the answer, so on a busy machine its figure may end a little after
# the client has the answer in hand: each observation is at most what the client waited plus this much.
STOP_SLACK_S = 0.5


def check_latency_histogram(before: str, after: str, name: str, waited_s: list[float], **labels: str) -> None:
    """The calls measured by the client (`waited_s` each) were observed once each, each no longer than the client
    waited for it (plus STOP_SLACK_S); buckets are cumulative."""
    b0, c0, s0 = histogram(before, name, **labels)
    b1, c1, s1 = histogram(after, name, **labels)
    calls = len(waited_s)
    assert c1 - c0 == calls, (name, c0, c1)
    assert 0 < s1 - s0 <= sum(waited_s) + calls * STOP_SLACK_S, (name, s1 - s0, sum(waited_s))
    bounds = sorted(b1)
    assert bounds[-1] == float("inf") and len(bounds) > 3, bounds
    deltas = [b1[le] - b0.get(le, 0.0) for le in bounds]
    assert deltas == sorted(deltas), deltas  # cumulative: never fewer below a higher bound
    assert deltas[-1] == calls
    for le, delta in zip(bounds, deltas):
        if le >= max(waited_s) + STOP_SLACK_S:  # every call took at most what its client waited
            assert delta == calls, (name, le, delta)


def test_latency_histograms_in_metrics(server: ServerProcess) -> None:
    """HTTP (BentoML's request duration) and gRPC (the interceptor's handling time) latency histograms, the
    series the p99 alert rules read (deploy/prometheus/pneumonia-rules.yaml)."""
    import grpc

    from api._proto.pneumonia.v1 import classifier_pb2 as pb
    from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc

    paths = sample_xrays(2, offset=60)
    before = metrics(server)
    waited = []
    for path in paths:
        response = classify(server, [(path.name, path.read_bytes())])
        assert response.status_code == 200
        waited.append(response.elapsed.total_seconds())
    grpc_waited = []
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for path in paths:
            started = time.monotonic()
            stub.Classify(pb.ClassifyRequest(images=[pb.Image(data=path.read_bytes())]), timeout=120)
            grpc_waited.append(time.monotonic() - started)
    after = metrics(server)
    check_latency_histogram(before, after, "bentoml_service_request_duration_seconds", waited,
                            endpoint="/classify", http_response_code="200")
    check_latency_histogram(before, after, "pneumonia_grpc_server_handling_seconds", grpc_waited,
                            grpc_method="Classify", grpc_code="OK")


def test_served_probability_stays_on_its_labels_side_of_the_threshold() -> None:
    """A helper's find: nearest rounding to 6 decimals served 0.512607 labelled PNEUMONIA beside the threshold
    0.5126070380210876 (the web page: "Verdict: PNEUMONIA ... (below it: NORMAL)"). Rounded away from it now."""
    from serving.answers import rounded_on_its_side

    threshold = 0.5126070380210876
    for probability in (0.51260704, 0.5126070380210876, 0.51260703, 0.5126069, 0.0, 1.0, 0.9999996, 0.0000004):
        shown = rounded_on_its_side(probability, threshold)
        assert (shown >= threshold) == (probability >= threshold), (probability, shown)
        assert abs(shown - probability) <= 1e-6 and shown == round(shown, 6) and 0.0 <= shown <= 1.0


def test_an_upload_abandoned_mid_body_leaves_no_call_in_flight(server: ServerProcess) -> None:
    """A helper's find: each client that left part-way through its upload held BentoML's in-progress gauge (the
    autoscaler's in-flight signal) up for PNEUMONIA_TIMEOUT_S (60 s): its timeout middleware waited for an answer
    the guard never started. The request log also said 0 bytes for the half that did arrive."""
    import socket

    data = sample_xrays(1, offset=70)[0].read_bytes()
    part = (b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a.jpeg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            f"Content-Length: {len(part)}\r\n\r\n").encode()
    port = int(server.url.rsplit(":", 1)[1])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + part[: len(part) // 2])
            time.sleep(0.3)  # read by the guard, then the client is gone
    deadline = time.monotonic() + 15  # well inside the 60 s the gauge was held
    while (in_flight := metric_total(metrics(server), "bentoml_service_request_in_progress", endpoint="/classify")) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert in_flight == 0
    gone = []
    for line in server.logs().splitlines():
        start = line.find('{"ts"')
        record = json.loads(line[start:]) if start >= 0 else {}
        if record.get("logger") == "pneumonia.request" and record.get("status") == 499:
            gone.append(record)
    assert len(gone) >= 3 and all(r["request_bytes"] >= len(part) // 2 for r in gone[-3:]), gone[-3:]


def test_a_file_part_named_only_by_rfc_5987_filename_star_is_a_file(server: ServerProcess) -> None:
    """A helper's find: python-multipart's header parser drops `filename*=UTF-8''...`, so a file part that gave only
    that name was refused as a text value (400 not_a_file)."""
    from serving.http.multipart import _extended_filename

    assert _extended_filename(b"form-data; name=\"images\"; filename*=UTF-8''r%C3%B6ntgen.jpeg") == "röntgen.jpeg".encode()
    assert _extended_filename(b'form-data; name="images"') is None
    data = sample_xrays(1, offset=71)[0].read_bytes()
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"images\"; filename*=UTF-8''r%C3%B6ntgen.jpeg\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    answer = httpx.post(server.url + "/classify", content=body, timeout=60,
                        headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert answer.status_code == 200, answer.text
    assert answer.json()[0]["status"] == "ok"
