"""The input-validity gate: what is not a frontal chest X-ray gets no verdict, real X-rays still do.

Real X-rays come from the shared training folder; everything else is made here
(synthetic images, transformed X-rays) or comes with a library (scikit-image's
pictures, pydicom's example CT).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from api._proto.pneumonia.v1 import classifier_pb2 as pb
from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc
from api.reasons import REFUSAL_REASONS
from core.validity import VALIDITY_FILE
from harness.payloads import sample_xrays
from harness.servers import ServerProcess, start_server
from models_registry import LoadedModel, ModelIntegrityError, load_model
from tests.images import encode


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def xray(index: int = 0) -> Image.Image:
    with Image.open(sample_xrays(per_class=4, offset=60)[index]) as opened:
        return opened.convert("L")


def photograph() -> Image.Image:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png") as opened:
        return opened.convert("L")


def ct_slice() -> Image.Image:
    import pydicom
    from pydicom.data import get_testdata_file

    pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float32)
    return Image.fromarray(((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)).resize((512, 512))


# upload -> the reason it must be refused with (None: any refusal reason)
NOT_CHEST_XRAYS: dict[str, tuple] = {
    "black": (lambda: Image.new("L", (512, 512), 0), "blank"),
    "white": (lambda: Image.new("L", (512, 512), 255), "blank"),
    "uniform noise": (lambda: Image.fromarray(np.random.default_rng(3).integers(0, 256, (400, 400), dtype=np.uint8)), None),
    "grey gradient": (lambda: Image.fromarray(np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))), None),
    "inverted X-ray": (lambda: Image.fromarray(255 - np.asarray(xray())), "inverted"),
    "X-ray rotated 90": (lambda: xray().rotate(90, expand=True), "rotated"),
    "X-ray rotated 180": (lambda: xray(1).rotate(180), "rotated"),
    "centre crop of an X-ray": (lambda: xray(2).crop((70, 70, 160, 160)).resize((224, 224)), "cropped"),
    # The partial-view check (2026-11-28; a helper found such views called PNEUMONIA with confidence)
    "two X-rays side by side": (lambda: Image.fromarray(np.hstack([np.asarray(xray(0)), np.asarray(xray(5))])), "cropped"),
    "four X-rays tiled 2 x 2": (lambda: Image.fromarray(np.block([[np.asarray(xray(i)) for i in (0, 5)],
                                                                  [np.asarray(xray(i)) for i in (2, 7)]])), "cropped"),
    # a normal X-ray at two grey levels (a helper: PNEUMONIA with confidence, as a far too narrow DICOM window)
    "binarised X-ray": (lambda: Image.fromarray(((np.asarray(xray(0).resize((1024, 1024), Image.Resampling.BICUBIC))
                                                   > np.median(np.asarray(xray(0)))) * 255).astype(np.uint8)),
                        "not_a_chest_xray"),
    "photograph": (photograph, None),
    "CT slice": (ct_slice, None),
}


@pytest.fixture(scope="module")
def model(production_tag: str) -> LoadedModel:
    return load_model(production_tag)


def torch_equal(a, b) -> bool:  # noqa: ANN001 - two tensors
    import torch

    return bool(torch.equal(a, b))


def grid(model: LoadedModel, data: bytes) -> np.ndarray:
    from core.preprocess import prepare

    return prepare(data, model.card.preprocess).pixels


def test_shipped_model_carries_a_fitted_gate(model: LoadedModel) -> None:
    gate = model.card.validity
    assert model.gate is not None and gate is not None
    figures = gate.figures
    # Calibrated as the issue asks: at most 1 % of held-out validation X-rays refused, stressed ones included.
    # The partial-view check adds up to a quarter of that budget (training/gate.py).
    assert figures["validation_clean"]["rate"] <= 0.01 and figures["validation_stressed"]["rate"] <= 0.0135
    assert gate.partial_limit is not None and gate.level_share_limit is not None
    by_kind = figures["negatives"]["by_kind"]
    assert figures["negatives"]["catch_rate"] >= 0.85 and by_kind["X-rays tiled 2 x 2"]["catch_rate"] >= 0.8
    for kind in ("X-ray centre crop", "X-ray corner crop", "X-ray inverted", "X-ray rotated 90", "synthetic document",
                 "X-ray binarised", "X-ray posterised (4 levels)"):
        assert by_kind[kind]["catch_rate"] == 1.0, (kind, by_kind[kind])


def test_a_gate_without_the_partial_view_check_still_serves(model: LoadedModel) -> None:
    """Gates fitted before 2026-11-28 have no partial-view arrays and no limit: they load and answer as before,
    and a gate that has them keeps them through its stored bytes."""
    import dataclasses

    from core.validity import ValidityGate

    gate = model.gate
    assert gate is not None and gate.partial_weight is not None
    again = ValidityGate.from_bytes(gate.config, gate.to_bytes())
    assert again.partial_weight is not None and torch_equal(again.partial_weight, gate.partial_weight)
    older = dataclasses.replace(gate, partial_weight=None, partial_bias=None,
                                config=gate.config.model_copy(update={"partial_limit": None, "level_share_limit": None,
                                                                      "arrays_sha256": ""}))
    older = ValidityGate.from_bytes(older.config, older.to_bytes())
    assert older.partial_weight is None and older.config.partial_limit is None
    grids = np.stack([grid(model, png(xray(i))) for i in range(4)])
    features = model.forward(grids)[1]
    outcomes = older.assess(features, grids.reshape(4, -1).std(axis=1))
    assert [o.reason for o in outcomes] == [None] * 4, outcomes
    binary = ((grids > 128) * 255).astype(np.uint8)  # no level check in an older gate: not refused for its levels
    from core.validity import level_share

    assert all(share > 0.9 for share in level_share(binary))
    assert all("grey levels" not in o.message for o in older.assess(model.forward(binary)[1], binary.reshape(4, -1).std(axis=1)))
    assert all("grey levels" in o.message for o in gate.assess(model.forward(binary)[1], binary.reshape(4, -1).std(axis=1),
                                                               level_share(binary)))


def test_real_xrays_are_answered(model: LoadedModel) -> None:
    paths = sample_xrays(per_class=40, offset=500)  # both classes, files the tests use nowhere else
    outcomes = model.assess(np.stack([grid(model, p.read_bytes()) for p in paths]))
    refused = [(p.name, o.validity.reason) for p, o in zip(paths, outcomes) if o.validity.reason]
    assert len(refused) <= 1, refused


@pytest.mark.parametrize("name", list(NOT_CHEST_XRAYS))
def test_not_a_chest_xray_is_refused_with_its_reason(model: LoadedModel, name: str) -> None:
    build, reason = NOT_CHEST_XRAYS[name]
    [outcome] = model.assess(grid(model, png(build()))[None])
    assert outcome.validity.reason in REFUSAL_REASONS
    if reason is not None:
        assert outcome.validity.reason == reason, outcome.validity
    assert outcome.validity.message


def test_a_refusal_quotes_the_check_that_failed(model: LoadedModel) -> None:
    """A not_a_chest_xray refusal names a figure beyond its limit: the outlier score when that is what failed,
    else the upright/whole probability (an image refused by that check and still refused turned back)."""
    import skimage
    from skimage import data

    pictures = [getattr(data, name)() for name in ("astronaut", "camera", "coffee", "rocket", "text", "moon")]
    grids = np.stack([grid(model, png(Image.fromarray(p))) for p in pictures])
    limits = model.card.validity
    by_route = {"outlier": 0, "orientation": 0}
    for outcome in model.assess(grids):
        validity = outcome.validity
        assert validity.reason == "not_a_chest_xray", validity
        if validity.outlier_score > limits.outlier_limit:
            by_route["outlier"] += 1
            assert f"outlier score {validity.outlier_score:.2f}, limit {limits.outlier_limit:.2f}" in validity.message
        else:
            by_route["orientation"] += 1
            assert "outlier" not in validity.message and validity.upright_probability < limits.orientation_limit
            assert f"{validity.upright_probability:.3f}, limit {limits.orientation_limit:.3f}" in validity.message
    assert by_route["outlier"] and by_route["orientation"], (by_route, skimage.__version__)  # both routes checked


def test_a_damaged_gate_stops_the_model_loading(model: LoadedModel, tmp_path: Path, production_tag: str) -> None:
    from models_registry.store import store_path_of

    path = store_path_of(production_tag) / VALIDITY_FILE
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(ModelIntegrityError, match="validity gate"):
            load_model(production_tag)
    finally:
        path.write_bytes(original)


def test_refused_images_get_no_verdict_and_the_rest_are_answered(server: ServerProcess) -> None:
    uploads = [png(xray()), png(Image.new("L", (512, 512), 0)), png(xray().rotate(90, expand=True))]
    before = httpx.get(server.url + "/metrics", timeout=10).text
    response = httpx.post(server.url + "/classify", files=[("images", (f"{i}.png", d)) for i, d in enumerate(uploads)],
                          timeout=60)
    assert response.status_code == 200, response.text
    ok, blank, rotated = response.json()
    assert ok["status"] == "ok" and ok["label"] in ("NORMAL", "PNEUMONIA") and ok["refusal"] is None
    assert ok["validity"]["outlier_score"] <= ok["validity"]["outlier_limit"]
    # every check's figure and limit, the partial-view and grey-level checks too (a reviewer: a `cropped` refusal
    # by the partial-view check had only in-limit figures in its answer)
    assert ok["validity"]["partial_probability"] <= ok["validity"]["partial_limit"]
    assert ok["validity"]["level_share"] <= ok["validity"]["level_share_limit"]
    for item, reason in ((blank, "blank"), (rotated, "rotated")):
        assert item["status"] == "refused" and item["refusal"]["reason"] == reason
        assert item["label"] is None and item["probability"] is None and item["confidence"] is None
    after = httpx.get(server.url + "/metrics", timeout=10).text

    def count(text: str, reason: str) -> float:
        line = [x for x in text.splitlines() if x.startswith(f'pneumonia_rejected_inputs_total{{reason="{reason}"}}')]
        return float(line[0].split()[-1]) if line else 0.0

    assert count(after, "blank") == count(before, "blank") + 1
    assert count(after, "rotated") == count(before, "rotated") + 1


def test_grpc_refuses_the_same_images_the_same_way(server: ServerProcess) -> None:
    uploads = [png(xray()), png(Image.new("L", (512, 512), 255)), png(Image.fromarray(255 - np.asarray(xray())))]
    http = httpx.post(server.url + "/classify", files=[("images", (f"{i}.png", d)) for i, d in enumerate(uploads)],
                      timeout=60).json()
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[pb.Image(data=d) for d in uploads]),
                                                         timeout=60)
    for wire, message in zip(http, reply.predictions):
        assert message.status == wire["status"]
        assert (message.refusal.reason or None) == (wire["refusal"] or {}).get("reason")
        assert message.HasField("probability") == (wire["probability"] is not None)
        assert (message.label or None) == wire["label"]
    assert [m.status for m in reply.predictions] == ["ok", "refused", "refused"]


def test_warn_mode_answers_everything_and_says_why(tmp_path: Path, production_tag: str) -> None:
    server = start_server(tmp_path / "warn.log", PNEUMONIA_WORKERS="1", PNEUMONIA_VALIDITY__MODE="warn")
    try:
        response = httpx.post(server.url + "/classify", files=[("images", ("black.png", png(Image.new("L", (512, 512), 0))))],
                              timeout=60)
        [item] = response.json()
        assert item["status"] == "ok" and item["label"] in ("NORMAL", "PNEUMONIA")
        assert item["warnings"][0].startswith("blank:") and "answered anyway" in item["warnings"][0]
    finally:
        server.stop()


def test_client_and_cli_show_refusals(server: ServerProcess, tmp_path: Path) -> None:
    import subprocess
    import sys

    from client import connect

    black = tmp_path / "black.png"
    black.write_bytes(png(Image.new("L", (300, 300), 0)))
    with connect(server.url) as api:
        [prediction] = api.classify([black])
    assert prediction.refused and prediction.refusal.reason == "blank" and prediction.label is None
    cli = subprocess.run([sys.executable, "-m", "client", "classify", str(black), "--url", server.url],
                         capture_output=True, text=True, timeout=120)
    # no verdict: exit 3 with the reason on stderr, as for the server's own input checks
    assert cli.returncode == 3 and "REFUSED (blank)" in cli.stdout, cli.stdout + cli.stderr
    assert "refused (blank)" in cli.stderr
