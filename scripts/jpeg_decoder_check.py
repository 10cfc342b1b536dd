"""The JPEG decoder against PIL's: the same pixels, the same time, and damage refused.

    ./dev.sh run python scripts/jpeg_decoder_check.py [--data-dir ../shared/datasets/chest_xray]

core/preprocess.py decodes grey and RGB JPEGs with libjpeg-turbo through simplejpeg (strict), at the scale PIL's
draft mode picks. This prints (1) how many files give PIL's grid, preview and warnings bit for bit: every training
X-ray, the full-size samples in results/samples (when present) and synthetic variants (sizes, progressive,
subsampling, restart markers, qualities, EXIF orientations); (2) `prepare()` time of one full-size JPEG, median of
30 calls, three rounds, both decoders; (3) how many damaged progressive and restart-marker files are refused.
"""

from __future__ import annotations

import argparse
import glob
import io
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

import core.preprocess as preprocess
from harness.paths import ROOT
from harness.servers import answered

CONFIG = preprocess.PreprocessConfig()
OURS = preprocess._decode_jpeg


def _pil_only(*_: object) -> None:
    """Stands in for `_decode_jpeg`: PIL decodes, as before simplejpeg."""
    return None


def _prepared(data: bytes, decoder: Callable[..., object]) -> preprocess.PreparedImage:
    preprocess._decode_jpeg = decoder  # type: ignore[assignment]
    try:
        return preprocess.prepare(data, CONFIG, preview_side=512)
    finally:
        preprocess._decode_jpeg = OURS


def same(data: bytes) -> bool:
    a, b = _prepared(data, OURS), _prepared(data, _pil_only)
    return (np.array_equal(a.pixels, b.pixels) and np.array_equal(a.preview, b.preview) and a.warnings == b.warnings
            and (a.width, a.height, a.mode) == (b.width, b.height, b.mode))


def variants(grey: Image.Image) -> Iterator[bytes]:
    rgb = grey.convert("RGB")
    for base in (grey.resize((2048, 2500)), rgb.resize((1500, 1700)), grey.resize((999, 1201)), grey.resize((450, 300)),
                 rgb.resize((333, 777)), grey.resize((224, 224)), grey.resize((64, 72))):
        for options in ({"quality": 95}, {"quality": 50}, {"quality": 90, "progressive": True},
                        {"quality": 90, "subsampling": 2}, {"quality": 90, "restart_marker_blocks": 4},
                        {"quality": 75, "optimize": True}, {"quality": 100}):
            for orientation in (1, 6, 3, 8, 2):
                exif = Image.Exif()
                exif[0x0112] = orientation
                buffer = io.BytesIO()
                base.save(buffer, "JPEG", exif=exif.tobytes(), **options)
                yield buffer.getvalue()


def median_ms(data: bytes, decoder: Callable[..., object], calls: int = 30) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        _prepared(data, decoder)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def damaged(files: list[Path]) -> tuple[int, int]:
    rng, refused, tried = np.random.default_rng(0), 0, 0
    for path in files:
        picture = Image.open(path)
        for options in ({"quality": 95, "progressive": True}, {"quality": 90, "restart_marker_blocks": 4},
                        {"quality": 90, "restart_marker_rows": 1}):
            for size in (None, (1600, 1600)):
                buffer = io.BytesIO()
                (picture if size is None else picture.resize(size)).save(buffer, "JPEG", **options)
                data = bytearray(buffer.getvalue())
                at, count = len(data) // 2, int(rng.integers(128, 513))
                data[at : at + count] = bytes(count)
                tried += 1
                try:
                    preprocess.prepare(bytes(data), CONFIG)
                except preprocess.ImageRejected:
                    refused += 1
    return refused, tried


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets" / "chest_xray")
    args = parser.parse_args(argv)
    training = sorted(Path(p) for p in glob.glob(str(args.data_dir / "train" / "*" / "*.jpeg")))
    if not training:
        parser.error(f"no training JPEGs under {args.data_dir / 'train'}")
    samples = sorted(ROOT.glob("results/samples/*/*.jpeg"))
    grey = Image.open(training[0]).convert("L")
    for name, datas in (("training X-rays", (p.read_bytes() for p in training)),
                        ("full-size samples", (p.read_bytes() for p in samples)),
                        ("synthetic variants", variants(grey))):
        outcomes = [same(data) for data in datas]
        print(f"{name}: {sum(outcomes)} of {len(outcomes)} give PIL's grid, preview and warnings bit for bit")
    full = next((p for p in samples if "full-2048x2500" in p.name), None)
    if full is None:
        buffer = io.BytesIO()
        grey.resize((2048, 2500)).save(buffer, "JPEG", quality=90)
        data, label = buffer.getvalue(), "a 2048x2500 resize of a training X-ray"
    else:
        data, label = full.read_bytes(), full.name
    for round_ in range(1, 4):
        print(f"round {round_}: prepare() of {label}, median of 30: simplejpeg {median_ms(data, OURS):.2f} ms, "
              f"PIL {median_ms(data, _pil_only):.2f} ms")
    refused, tried = damaged(training[:20])
    print(f"damaged progressive and restart-marker JPEGs refused: {refused} of {tried}")
    return 0


if __name__ == "__main__":
    raise SystemExit(answered(main, "stopped"))  # a file that is no JPEG: one line, not a traceback
