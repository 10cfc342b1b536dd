"""`bentoml build` of this repository, the built Bento served by tag, and its generated Dockerfile."""

from __future__ import annotations

import io
import re
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from harness import dicom_files
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import bentoml_serve, free_port

pytestmark = pytest.mark.slow


def _bento_dir(bento_home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return bento_home / "bentos" / name / version


def _included(root: Path) -> set[str]:
    """What bentofile.yaml's include patterns select in this working tree, by hand: the files a Bento must carry."""
    spec = yaml.safe_load((root / "bentofile.yaml").read_text())
    # A leading "/" anchors a pattern at the root (gitignore rules); Path.glob patterns are anchored anyway.
    files = {str(p.relative_to(root)) for pattern in spec["include"] for p in root.glob(pattern.lstrip("/"))
             if p.is_file()}
    return {f for f in files if "__pycache__" not in f} | {"bentofile.yaml"}


def test_bento_packs_code_model_and_pinned_dependencies(bento_tag: str, bentoml_home: Path, production_tag: str) -> None:
    root = _bento_dir(bentoml_home, bento_tag)
    info = yaml.safe_load((root / "bento.yaml").read_text())
    # The service entry the bentofile names, with its three APIs, and the production model packed with it.
    assert info["service"] == "service:PneumoniaClassifier" and info["entry_service"] == "pneumonia_classifier"
    assert [svc["name"] for svc in info["services"]] == ["pneumonia_classifier"]
    assert {r["route"] for r in info["schema"]["routes"]} == {"/classify", "/explain", "/health"}
    assert [m["tag"] for svc in info["services"] for m in svc["models"]] == [production_tag]
    # Exactly the files the include list selects (the generated gRPC stubs among them): no trainer, client,
    # harness, tests or scripts, and nothing missing.
    packed = {str(p.relative_to(root / "src")) for p in (root / "src").rglob("*") if p.is_file()}
    expected = _included(ROOT)
    assert packed == expected, {"missing": sorted(expected - packed), "unexpected": sorted(packed - expected)}
    assert "api/_proto/pneumonia/v1/classifier_pb2.py" in packed and "serving/ui/static/index.html" in packed
    # The environment variables of the bentofile, in order.
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert [(e["name"], e["value"]) for e in info["envs"]] == [(e["name"], e["value"]) for e in bentofile["envs"]]
    # Pinned requirements from requirements/bento.txt, resolved against PyTorch's CPU index: no CUDA wheels.
    requirements = (root / "env/python/requirements.txt").read_text()
    assert requirements.splitlines()[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    assert "torch==2.14.0" in requirements and "bentoml==1.4.39" in requirements
    # DICOM input: pydicom and the pylibjpeg decoders of the compressed transfer syntaxes (not the test encoders)
    for package in ("pydicom==", "pylibjpeg==", "pylibjpeg-libjpeg==", "pylibjpeg-openjpeg==", "pylibjpeg-rle=="):
        assert package in requirements, package
    assert "onnxruntime==" in requirements and "onnx==" in requirements  # the default engine (PNEUMONIA_ENGINE)
    assert "httptools==" in requirements and "uvloop==" in requirements  # uvicorn's fast parser and event loop
    assert "imagecodecs" not in requirements
    pinned = [line.split("==")[0] for line in requirements.splitlines() if "==" in line and not line.lstrip().startswith("#")]
    assert not [p for p in pinned if p.startswith(("nvidia-cu", "triton"))]  # CPU-only image


def test_generated_dockerfile(bento_tag: str, bentoml_home: Path, tmp_path: Path) -> None:
    import bentoml

    out = tmp_path / "Dockerfile"
    bentoml.container.get_containerfile(bento_tag, output_path=str(out))
    dockerfile = out.read_text()
    assert re.search(r"^FROM python:3\.11-slim ", dockerfile, re.M)  # docker.python_version and distro debian
    # The pinned requirements above (first line: the CPU index) are what the image installs.
    assert re.search(r"pip install -r \$BENTO_PATH/env/python/requirements\.txt$", dockerfile, re.M)
    # uv's index strategy is set before the install that needs it (test below).
    assert dockerfile.index("ENV UV_INDEX_STRATEGY=") < dockerfile.index("pip install -r $BENTO_PATH/env/python/")
    # Every bentofile variable is set in the image, with its value as the build argument's default.
    info = yaml.safe_load((_bento_dir(bentoml_home, bento_tag) / "bento.yaml").read_text())
    for env in info["envs"]:
        assert f"ARG {env['name']}={env['value']}\n" in dockerfile and f"ENV {env['name']}=${env['name']}\n" in dockerfile
    # Both ports the service listens on in the image are exposed: HTTP and the configured gRPC port.
    grpc_port = next(e["value"] for e in info["envs"] if e["name"] == "PNEUMONIA_GRPC__PORT")
    assert set(re.findall(r"^EXPOSE (\d+)$", dockerfile, re.M)) == {"3000", grpc_port}


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


def _fake_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any") -> None:
    """A wheel that holds only its metadata: enough for uv to resolve it."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    (folder / name).mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name / f"{name}-{version}-{tag}.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_the_image_install_resolves_pins_that_pytorchs_index_also_hosts_at_other_versions(tmp_path: Path) -> None:
    """The image's `uv pip install` (generated Dockerfile) reads requirements whose first line adds PyTorch's CPU
    index before PyPI. That index also hosts numpy, pillow, jinja2 ... at some versions only; with uv's default
    strategy a pin it lacks fails the image build. Two local indexes stand in for the two (no network here)."""
    import http.server
    import os
    import subprocess

    from tests.stubs import serving

    root = tmp_path / "indexes"
    _fake_wheel(root / "torchindex", "torch", "2.14.0+cpu")
    _fake_wheel(root / "torchindex", "numpy", "1.0")  # PyTorch's mirror, an older version than the pin
    _fake_wheel(root / "torchindex", "pillow", "13.0.0", "cp312-cp312-manylinux_2_28_x86_64")  # the pin, not for 3.11
    _fake_wheel(root / "pypi", "torch", "2.14.0")
    _fake_wheel(root / "pypi", "numpy", "2.4.6")
    _fake_wheel(root / "pypi", "pillow", "13.0.0")
    for index in ("torchindex", "pypi"):  # PEP 503 pages
        for package in (root / index).iterdir():
            links = "".join(f'<a href="{w.name}">{w.name}</a>' for w in package.glob("*.whl"))
            (package / "index.html").write_text(f"<html><body>{links}</body></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(root)))) as url:
        requirements = tmp_path / "requirements.txt"
        requirements.write_text(f"--extra-index-url {url}/torchindex\nnumpy==2.4.6\npillow==13.0.0\ntorch==2.14.0\n")
        bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
        image_env = {e["name"]: e["value"] for e in bentofile["envs"] if e["name"].startswith("UV_")}
        assert image_env, "bentofile.yaml sets no uv setting"

        def resolve(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
            env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
            env.update(UV_CACHE_DIR=str(tmp_path / "uv-cache"), UV_NO_CONFIG="1", **extra_env)
            return subprocess.run([str(ROOT / ".venv/bin/uv"), "pip", "compile", str(requirements), "--index-url",
                                   f"{url}/pypi", "--no-header", "--no-annotate", "--python-version", "3.11",
                                   "--python-platform", "x86_64-manylinux_2_28"],
                                  capture_output=True, text=True, env=env, timeout=120)

        default = resolve({})  # the control: uv's default strategy fails on the pin PyTorch's index lacks
        assert default.returncode != 0 and "numpy" in default.stderr, default.stdout + default.stderr
        image = resolve(image_env)
        assert image.returncode == 0, image.stderr
        assert image.stdout.split() == ["numpy==2.4.6", "pillow==13.0.0", "torch==2.14.0+cpu"]  # torch CPU-only
        first_match = resolve({"UV_INDEX_STRATEGY": "unsafe-first-match"})  # a review's find: no cp311 pillow there
        assert first_match.returncode != 0 and "pillow" in first_match.stderr, first_match.stdout

