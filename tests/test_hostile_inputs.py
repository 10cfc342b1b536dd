"""The hostile-input matrix (tests/hostile_matrix.py) against the live session server.

Each row posts one input and asserts the exact status and the JSON reason,
then checks that the same server still classifies a good X-ray: no input may
cost a worker or leave the service answering differently afterwards.
"""

from __future__ import annotations

import json

import httpx
import pytest
from PIL import Image

from tests.hostile_matrix import ROWS, Request, Row, encode, exif_rotated_jpeg, raw_http, render, xray, xray_jpeg
from harness.paths import ROOT
from harness.servers import ServerProcess


def send(url: str, request: Request) -> tuple[int, dict[str, str], bytes]:
    if request.declared_length is not None:
        return raw_http(url, request)
    kwargs: dict = {"headers": request.headers, "timeout": 120}
    if request.files is not None:
        kwargs["files"] = request.files()
    elif request.body is not None:
        kwargs["content"] = request.body()
    response = httpx.request(request.method, url + request.path, **kwargs)
    return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content


def classify(server: ServerProcess, *images: bytes) -> list[dict]:
    files = [("images", (f"{i}.jpeg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(server.url + "/classify", files=files, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_hostile_input(server: ServerProcess, row: Row) -> None:
    status, headers, body = send(server.url, row.request)
    assert status == row.status, body[:600]
    assert headers["content-type"].startswith("application/json")
    assert headers.get("x-request-id")
    answer = json.loads(body)
    if row.status == 200:
        [prediction] = answer
        if row.refusal:
            assert prediction["status"] == "refused" and prediction["refusal"]["reason"] == row.refusal, prediction
            assert prediction["label"] is None and prediction["probability"] is None
        else:
            assert prediction["label"] in ("NORMAL", "PNEUMONIA") and 0 <= prediction["probability"] <= 1
        assert f"{prediction['image']['mode']}/{prediction['image']['format']}" == row.reason
        if row.warning:
            assert any(row.warning in w for w in prediction["warnings"]), prediction["warnings"]
    else:
        assert isinstance(answer, dict) and isinstance(answer["error"], str) and answer["error"]
        assert answer["detail"][0]["type"] == row.reason, answer
        assert answer["detail"][0]["msg"]
        assert "Traceback" not in body.decode("utf-8", "replace")
    # The server is unharmed: a good X-ray still gets its usual answer.
    [good] = classify(server, xray_jpeg())
    assert good["label"] in ("NORMAL", "PNEUMONIA") and not good["warnings"]


def test_exif_orientation_is_honoured(server: ServerProcess) -> None:
    """A JPEG stored sideways with EXIF orientation 6 is classified as the upright original."""
    stripped = encode(xray().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95)  # same pixels, no tag
    upright, rotated, sideways = classify(server, xray_jpeg(), exif_rotated_jpeg(), stripped)
    assert upright["status"] == rotated["status"] == "ok"
    assert abs(rotated["probability"] - upright["probability"]) < 0.02, (upright, rotated)
    # The same pixels without the tag are a sideways X-ray, which the validity gate refuses: the tag, not
    # luck, made the first two agree.
    assert sideways["status"] == "refused" and sideways["refusal"]["reason"] == "rotated", sideways


def test_docs_matrix_is_current() -> None:
    doc = ROOT / "docs" / "hardening.md"
    text = doc.read_text()
    assert render(text) == text, "run: python -m tests.hostile_matrix --write docs/hardening.md"
