"""Real X-ray payloads: single files for tests and drills, and the sample set and request mix of the load tests.

Nothing here is committed: the samples are taken from the shared training folder
at run time and cached under `results/samples/`. The shared images are 224 px;
real radiographs arrive as 1500-2500 px JPEGs, so "full-size" uploads are made by
upscaling samples to such sizes (grayscale, JPEG quality 90) with a little
Gaussian grain, which gives the file sizes (and so the JPEG entropy-decoding
cost) of real scans instead of the unrealistically small files a smooth
upscale compresses to.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from harness.paths import DATA_DIR, RESULTS

CACHE_DIR = RESULTS / "samples"
CLASSES = ("NORMAL", "PNEUMONIA")

# (width, height) of the full-size uploads: the range of digital chest radiographs.
FULL_SIZES = ((2048, 2500), (1760, 2140), (2500, 2048), (1500, 1860), (2200, 2200), (1920, 2350))
GRAIN_SIGMA = 3.0  # grey levels of added grain (quantum noise of a real detector)
JPEG_QUALITY = 90

# The request mix, in Locust task weights (requests, not images). Why these:
#  - full:   one full-size radiograph per request, what a PACS/RIS integration sends per study;
#  - single: one image already downsized by a web or mobile front end (the 224 px originals);
#  - multi:  four images in one request, a worklist or re-read batch job;
#  - health: probes from a load balancer or orchestrator (no image).
# Per 10 requests: 15 images, 3 of them full-size (20% of images, 60% of the bytes).
MIX_WEIGHTS: dict[str, int] = {"full": 3, "single": 4, "multi": 2, "health": 1}
MULTI_COUNT = 4
IMAGE_KINDS = ("full", "single", "multi")  # the kinds that carry images (the benchmark's mix)


@dataclass(frozen=True)
class SampleImage:
    name: str
    data: bytes
    label: str  # the folder it came from (not a ground truth for upscaled copies' difficulty)
    width: int
    height: int


@dataclass(frozen=True)
class SampleSet:
    small: tuple[SampleImage, ...]  # 224 px originals, both classes
    full: tuple[SampleImage, ...]  # 1500-2500 px upscaled JPEGs, both classes
    folder: Path

    def describe(self) -> str:
        full_kb = np.mean([len(s.data) for s in self.full]) / 1024
        small_kb = np.mean([len(s.data) for s in self.small]) / 1024
        return (
            f"{len(self.small)} originals (224 px, mean {small_kb:.0f} KiB) and {len(self.full)} full-size uploads "
            f"(1500-2500 px JPEG q{JPEG_QUALITY}, mean {full_kb:.0f} KiB) from {DATA_DIR / 'train'}"
        )


def _pick(per_class: int, data_dir: Path) -> list[tuple[str, Path]]:
    """A deterministic, spread-out selection of files of both classes."""
    picked: list[tuple[str, Path]] = []
    for name in CLASSES:
        folder = data_dir / "train" / name
        if not folder.is_dir():
            raise FileNotFoundError(f"sample folder {folder} is missing (set PNEUMONIA_DATA_DIR to the chest_xray folder)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        step = max(1, len(files) // per_class)
        picked.extend((name, p) for p in files[::step][:per_class])
    return picked


def _upscale(path: Path, size: tuple[int, int], seed: int) -> bytes:
    gray = Image.open(path).convert("L").resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(gray, dtype=np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, GRAIN_SIGMA, pixels.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def build_samples(small_per_class: int = 12, full_per_class: int = 4, cache_dir: Path = CACHE_DIR,
                  data_dir: Path = DATA_DIR) -> SampleSet:
    """Make (or reuse from `cache_dir`) the sample set; a few seconds the first time."""
    key = hashlib.sha256(
        json.dumps([small_per_class, full_per_class, FULL_SIZES, GRAIN_SIGMA, JPEG_QUALITY, str(data_dir)]).encode()
    ).hexdigest()[:12]
    folder = cache_dir / key
    index = folder / "index.json"
    if not index.exists():
        tmp = cache_dir / f".{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        entries = []
        for label, path in _pick(small_per_class, data_dir):
            (tmp / path.name).write_bytes(path.read_bytes())
            entries.append({"kind": "small", "name": path.name, "label": label})
        originals = _pick(full_per_class, data_dir)
        for i, (label, path) in enumerate(originals):
            size = FULL_SIZES[i % len(FULL_SIZES)]
            name = f"full-{size[0]}x{size[1]}-{path.stem}.jpeg"
            (tmp / name).write_bytes(_upscale(path, size, seed=i))
            entries.append({"kind": "full", "name": name, "label": label})
        (tmp / "index.json").write_text(json.dumps(entries, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process built it at the same time
            pass
    small: list[SampleImage] = []
    full: list[SampleImage] = []
    for entry in json.loads(index.read_text()):
        data = (folder / entry["name"]).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        item = SampleImage(entry["name"], data, entry["label"], width, height)
        (full if entry["kind"] == "full" else small).append(item)
    return SampleSet(small=tuple(small), full=tuple(full), folder=folder)


LABELS = frozenset(CLASSES)  # the labels a verdict may carry


def well_formed(prediction: object) -> bool:
    """One prediction of an answer (as JSON): a verdict (status `ok`, or none from the benchmark's peers; a label; a
    probability in [0, 1]), or the validity gate's refusal (`refused`, a reason, no label, no probability). A refused
    X-ray (one of the soak's payloads is) is an answer, not a failure."""
    if not isinstance(prediction, dict):
        return False
    probability = prediction.get("probability")
    if prediction.get("status") == "refused":
        refusal = prediction.get("refusal")
        return (isinstance(refusal, dict) and isinstance(refusal.get("reason"), str) and bool(refusal["reason"])
                and prediction.get("label") is None and probability is None)
    return (prediction.get("status", "ok") == "ok" and prediction.get("label") in LABELS  # peers send no status
            and isinstance(probability, (int, float)) and not isinstance(probability, bool) and 0.0 <= probability <= 1.0)


API_KEY_ENV = "PNEUMONIA_API_KEY"  # the client CLI's variable


def api_key_headers() -> dict[str, str]:
    """`{"X-API-Key": KEY}` when $PNEUMONIA_API_KEY is set, else `{}`: every load test and benchmark sends it, so
    that they can load a deployed service (its manifests require keys); without it they got 401 and 429."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return {"X-API-Key": key} if key else {}


def encode_multipart(images: list[SampleImage], field: str = "images") -> tuple[bytes, str]:
    """A multipart/form-data body with one part per image, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = []
    for image in images:
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{image.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n".encode() + image.data + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class PlannedRequest:
    kind: str
    images: tuple[SampleImage, ...]
    body: bytes
    content_type: str


def request_plan(samples: SampleSet, count: int, seed: int = 0, kinds: tuple[str, ...] = IMAGE_KINDS) -> list[PlannedRequest]:
    """A deterministic sequence of image requests drawn with the mix weights (bodies pre-encoded)."""
    rng = random.Random(seed)
    weights = [MIX_WEIGHTS[k] for k in kinds]
    plan = []
    for kind in rng.choices(kinds, weights=weights, k=count):
        if kind == "full":
            images = (rng.choice(samples.full),)
        elif kind == "single":
            images = (rng.choice(samples.small),)
        elif kind == "multi":
            images = tuple(rng.sample(samples.small, MULTI_COUNT))
        else:
            raise ValueError(f"request kind {kind!r} carries no images")
        body, content_type = encode_multipart(list(images))
        plan.append(PlannedRequest(kind, images, body, content_type))
    return plan


def explain_plan(samples: SampleSet, count: int, seed: int = 1) -> list[PlannedRequest]:
    """`count` one-image `POST /explain` requests (multipart field `image`, kind "explain"), full-size radiographs
    and small originals in the mix's proportions (3 full : 4 single)."""
    rng = random.Random(seed)
    plan = []
    for kind in rng.choices(("full", "single"), weights=[MIX_WEIGHTS["full"], MIX_WEIGHTS["single"]], k=count):
        image = rng.choice(samples.full if kind == "full" else samples.small)
        body, content_type = encode_multipart([image], field="image")
        plan.append(PlannedRequest("explain", (image,), body, content_type))
    return plan


def sample_xrays(per_class: int, offset: int = 0) -> list[Path]:
    """Real X-rays from the shared training folder, deterministic selection, both classes."""
    files: list[Path] = []
    for name in CLASSES:
        all_files = sorted((DATA_DIR / "train" / name).iterdir())
        files.extend(all_files[offset : offset + per_class])
    return files


def xray_payloads(count: int = 16, offset: int = 300) -> list[bytes]:
    """Real chest X-rays (224 px JPEGs from the shared training folder), both classes."""
    return [p.read_bytes() for p in sample_xrays(max(1, count // 2), offset=offset)]


def large_png(side: int = 1536, seed: int = 0) -> bytes:
    """A real X-ray upscaled to `side` px with detector-like grain, as PNG (no reduced-scale decode: costly)."""
    source = Image.open(sample_xrays(1, offset=400 + seed)[0]).convert("L").resize((side, side), Image.BICUBIC)
    grain = np.random.default_rng(seed).normal(0, 4, (side, side))
    pixels = np.clip(np.asarray(source, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
