"""Images that are not frontal chest X-rays, from what is available offline, to measure the validity gate.

None of these is used to fit the gate (it is fitted on chest X-rays only); they only
say how much of each kind it catches. Sources: the pictures bundled with
scikit-image and matplotlib, pydicom's bundled example objects (CT, MR, US,
secondary captures, ...), synthetic images (blank, noise, gradients, shapes,
documents), and validation X-rays transformed the ways radiology pipelines get
wrong (inverted polarity, rotated, a cropped part).
"""

from __future__ import annotations

import glob
import gzip
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.preprocess import PreprocessConfig
from training.stress import served_grey


@dataclass(frozen=True)
class Negative:
    kind: str  # e.g. "photograph", "dicom CT", "synthetic noise", "X-ray rotated 90"
    name: str
    image: Image.Image  # mode "L"


def _to_grey(array: np.ndarray) -> Image.Image:
    """Any pixel array -> 8-bit grey, stretched between its 0.5th and 99.5th percentiles."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=-1)
    lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.5)
    return Image.fromarray((np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8), mode="L")


def library_images() -> Iterator[Negative]:
    """Bundled pictures of scikit-image and matplotlib, and pydicom's example objects (one per modality and shape)."""
    import matplotlib
    import pydicom
    import pydicom.data
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    for path in sorted([*folder.glob("*.png"), *folder.glob("*.jpg")]):
        with Image.open(path) as image:
            if min(image.size) >= 32:
                yield Negative("photograph or other picture", f"skimage/{path.name}", image.convert("L"))
    samples = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"):
        with Image.open(samples / name) as image:
            yield Negative("photograph or other picture", f"matplotlib/{name}", image.convert("L"))
    mr = np.frombuffer(gzip.open(samples / "s1045.ima.gz").read(), dtype="<u2").reshape(256, 256)
    yield Negative("MR", "matplotlib/s1045.ima", _to_grey(mr))
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(pydicom.data.__file__), "**", "*"), recursive=True)):
        if os.path.isdir(path):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(path, force=True)
                array = dataset.pixel_array
        except Exception:  # noqa: BLE001 - most files in that folder are not images
            continue
        if array.ndim == 4 or (array.ndim == 3 and getattr(dataset, "SamplesPerPixel", 1) == 1):
            array = array[0]
        modality = str(getattr(dataset, "Modality", "") or "unknown")
        if min(array.shape[:2]) < 32 or (modality, array.shape) in seen:
            continue
        seen.add((modality, array.shape))
        yield Negative(f"DICOM {modality}", f"pydicom/{os.path.basename(path)}", _to_grey(array))


def synthetic_images(count: int = 6, seed: int = 0) -> Iterator[Negative]:
    """Blank, noise, gradients, shapes, smooth noise and text documents."""
    rng = np.random.default_rng(seed)
    for value in (0, 128, 255):
        yield Negative("synthetic blank", f"constant {value}", Image.new("L", (512, 512), value))
    words = ["lorem", "ipsum", "radiology", "report", "patient", "chest", "findings", "impression"]
    for i in range(count):
        yield Negative("synthetic noise", f"uniform noise {i}", Image.fromarray(rng.integers(0, 256, (400, 400), dtype=np.uint8)))
        ramp = np.rot90(np.linspace(0, 255, 512)[None, :] * np.ones((512, 1)), i % 4)
        yield Negative("synthetic gradient", f"gradient {i}", Image.fromarray(ramp.astype(np.uint8)))
        page = Image.new("L", (600, 800), 255)
        draw = ImageDraw.Draw(page)
        for line in range(30):
            text = " ".join(random.Random(seed * 100 + i * 31 + line).choice(words) for _ in range(8))
            draw.text((30, 20 + line * 25), text, fill=0)
        yield Negative("synthetic document", f"document {i}", page)
        shapes = Image.new("L", (512, 512), int(rng.integers(0, 255)))
        draw = ImageDraw.Draw(shapes)
        for _ in range(12):
            x, y = rng.integers(0, 512, 2)
            r = int(rng.integers(10, 120))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(0, 255)))
        yield Negative("synthetic shapes", f"shapes {i}", shapes)
        smooth = rng.normal(size=(16, 16))
        yield Negative("synthetic smooth noise", f"smooth noise {i}",
                       _to_grey(smooth).resize((512, 512), Image.Resampling.BICUBIC))


def transformed_xrays(paths: list[Path], config: PreprocessConfig) -> Iterator[Negative]:
    """Each X-ray once, transformed in turn: inverted, rotated 90/180/270 degrees, a corner or the centre cropped."""
    for i, path in enumerate(paths):
        image = served_grey(path, config)
        w, h = image.size
        kind = i % 6
        if kind == 0:
            yield Negative("X-ray inverted", path.name, Image.fromarray(255 - np.asarray(image)))
        elif kind in (1, 2, 3):
            degrees = 90 * kind
            yield Negative(f"X-ray rotated {degrees}", path.name, image.rotate(degrees, expand=True))
        elif kind == 4:
            left, top = random.Random(i).choice([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)])
            yield Negative("X-ray corner crop", path.name, image.crop((left, top, left + w // 2, top + h // 2)).resize((w, h)))
        else:
            box = (int(w * 0.3), int(h * 0.3), int(w * 0.7), int(h * 0.7))
            yield Negative("X-ray centre crop", path.name, image.crop(box).resize((w, h)))


def partial_xrays(paths: list[Path], config: PreprocessConfig) -> Iterator[Negative]:
    """Each X-ray once, in turn: its bottom half, a middle band (40 % of the height), side by side with the next
    X-ray, tiled 2 x 2 with the next three. Every pixel is an X-ray's, but no view is one whole frontal X-ray (a
    helper found such views called PNEUMONIA with confidence before the gate learned them, 2026-11-28)."""
    images = [served_grey(path, config) for path in paths]
    for i, (path, image) in enumerate(zip(paths, images)):
        w, h = image.size
        grid = np.asarray(image)
        others = [np.asarray(images[(i + k) % len(images)].resize((w, h))) for k in (1, 2, 3)]
        kind = i % 4
        if kind == 0:
            yield Negative("X-ray bottom half", path.name, image.crop((0, h // 2, w, h)))
        elif kind == 1:
            yield Negative("X-ray middle band", path.name, image.crop((0, int(h * 0.3), w, int(h * 0.7))))
        elif kind == 2:
            yield Negative("X-rays side by side", path.name, Image.fromarray(np.hstack([grid, others[0]])))
        else:
            yield Negative("X-rays tiled 2 x 2", path.name, Image.fromarray(np.block([[grid, others[0]], [others[1], others[2]]])))


def tone_xrays(paths: list[Path], config: PreprocessConfig) -> Iterator[Negative]:
    """Each X-ray once, in turn: binarised at its median grey level, posterised to four levels. No longer an X-ray's
    grey scale (a DICOM window far too narrow does the same); a helper found them called PNEUMONIA with confidence
    (2026-11-28)."""
    for i, path in enumerate(paths):
        grid = np.asarray(served_grey(path, config))
        if i % 2 == 0:
            yield Negative("X-ray binarised", path.name, Image.fromarray(((grid > np.median(grid)) * 255).astype(np.uint8)))
        else:
            yield Negative("X-ray posterised (4 levels)", path.name, Image.fromarray((grid // 64 * 85).astype(np.uint8)))


def all_negatives(xray_paths: list[Path], config: PreprocessConfig) -> list[Negative]:
    return [*library_images(), *synthetic_images(), *transformed_xrays(xray_paths, config),
            *partial_xrays(xray_paths, config), *tone_xrays(xray_paths, config)]
