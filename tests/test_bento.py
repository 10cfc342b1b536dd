"""`bentoml build` of this repository, the built Bento served by tag, and its generated Dockerfile."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from harness import dicom_files
from harness.paths import ROOT, VENV_BIN
from harness.payloads import sample_xrays
from harness.servers import bentoml_serve, free_port, server_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bento_tag(production_tag: str) -> str:
    result = subprocess.run([str(VENV_BIN / "bentoml"), "build", "--output", "tag"], cwd=ROOT, env=server_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].replace("__tag__:", "").strip()
    assert tag.startswith("pneumonia-classifier-service:")
    return tag


def _bento_dir(bento_home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return bento_home / "bentos" / name / version


def test_bento_packs_code_model_and_pinned_dependencies(bento_tag: str, bentoml_home: Path, production_tag: str) -> None:
    root = _bento_dir(bentoml_home, bento_tag)
    info = yaml.safe_load((root / "bento.yaml").read_text())
    assert [m["tag"] for svc in info["services"] for m in svc["models"]] == [production_tag]
    for path in ("src/service.py", "src/settings.py", "src/core/preprocess.py", "src/models_registry/loader.py",
                 "src/api/_proto/pneumonia/v1/classifier_pb2.py", "src/serving/grpc/servicer.py"):
        assert (root / path).is_file(), path
    assert not (root / "src/tests").exists() and not (root / "src/loadtests").exists()
    for room in ("training", "client", "harness", "scripts"):  # the trainer and the client are not served
        assert not (root / "src" / room).exists(), room
    requirements = (root / "env/python/requirements.txt").read_text()
    assert "torch==2.14.0" in requirements and "bentoml==1.4.39" in requirements
    # DICOM input: pydicom and the pylibjpeg decoders of the compressed transfer syntaxes (not the test encoders)
    for package in ("pydicom==", "pylibjpeg==", "pylibjpeg-libjpeg==", "pylibjpeg-openjpeg==", "pylibjpeg-rle=="):
        assert package in requirements, package
    assert "imagecodecs" not in requirements
    pinned = [line.split("==")[0] for line in requirements.splitlines() if "==" in line and not line.lstrip().startswith("#")]
    assert not [p for p in pinned if p.startswith(("nvidia-cu", "triton"))]  # CPU-only image
    assert "python_version: '3.11'" in (root / "src/bentofile.yaml").read_text().replace('"', "'")


def test_generated_dockerfile(bento_tag: str, tmp_path: Path) -> None:
    import bentoml

    out = tmp_path / "Dockerfile"
    bentoml.container.get_containerfile(bento_tag, output_path=str(out))
    dockerfile = out.read_text()
    assert "python:3.11" in dockerfile or "3.11" in dockerfile
    assert "EXPOSE 3000" in dockerfile
    # The gRPC endpoint's port (bentofile envs) is set in the image and exposed.
    assert "ENV PNEUMONIA_GRPC__PORT=$PNEUMONIA_GRPC__PORT" in dockerfile and "ARG PNEUMONIA_GRPC__PORT=3001" in dockerfile
    assert "EXPOSE 3001" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile or "requirements.txt" in dockerfile
    assert "bentoml" in dockerfile.lower()


def test_built_bento_serves_by_tag(bento_tag: str, tmp_path: Path, production_tag: str) -> None:
    proc = bentoml_serve(bento_tag, free_port(), tmp_path / "bento.log")
    proc.cwd = tmp_path  # prove it runs from the Bento, not from the working tree
    proc.env["PYTHONPATH"] = ""
    proc.start()
    try:
        path = sample_xrays(1, offset=3)[1]
        response = httpx.post(proc.url + "/classify", files=[("images", (path.name, path.read_bytes()))], timeout=60)
        assert response.status_code == 200, response.text
        item = response.json()[0]
        assert item["model"] == production_tag and item["label"] in ("NORMAL", "PNEUMONIA")
        # The same image over the Bento's gRPC endpoint: same answer.
        from api._proto.pneumonia.v1 import classifier_pb2 as pb
        from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc
        from tests.test_grpc import wait_serving

        wait_serving(proc.grpc_target)
        with grpc.insecure_channel(proc.grpc_target) as channel:
            reply = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(data=path.read_bytes(), filename=path.name)]), timeout=30
            )
        assert reply.predictions[0].label == item["label"]
        assert abs(reply.predictions[0].probability - item["probability"]) < 1e-6
        # DICOM through the Bento (its packed core/dicom.py): 12-bit MONOCHROME1 in JPEG-LS and
        # 16-bit in JPEG 2000 give the answer of a PNG of the same pixels.
        gray = np.asarray(Image.open(path).convert("L"))
        m1, s16 = dicom_files.stored_values(gray, 12, monochrome1=True), dicom_files.stored_values(gray, 16)
        studies = [
            dicom_files.part10(m1.values, bits_stored=12, photometric="MONOCHROME1", window=(m1.center, m1.width),
                               syntax=dicom_files.SYNTAXES["jpeg-ls"]),
            dicom_files.part10(s16.values, bits_stored=16, window=(s16.center, s16.width),
                               syntax=dicom_files.SYNTAXES["jpeg2000"]),
        ]
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format="PNG")
        files = [("images", ("xray.png", buffer.getvalue()))] + [("images", (f"{i}.dcm", d)) for i, d in enumerate(studies)]
        response = httpx.post(proc.url + "/classify", files=files, timeout=60)
        assert response.status_code == 200, response.text
        reference, *answers = response.json()
        for answer in answers:
            assert answer["image"]["format"] == "DICOM" and answer["image"]["dicom"]["voi"] == "window", answer
            assert abs(answer["probability"] - reference["probability"]) < 1e-3, (answer, reference)
    finally:
        proc.stop()
