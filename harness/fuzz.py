"""Property-based fuzzing of the decode-and-validate path, `core.preprocess.prepare`.

The property: for ANY bytes, `prepare` either returns a PreparedImage inside
the limits (model-sized uint8 grid, a source within max_pixels and min_side)
or raises ImageRejected with a known reason and a message; never another
exception. Inputs are arbitrary bytes and mutations (bit flips, overwritten
header fields, insertions, deletions, truncation, splices) of small valid
images in every accepted format.

Used by tests/test_fuzz_decode.py (a short run in CI) and
scripts/fuzz_decode.py (a long run for a given number of minutes).
"""

from __future__ import annotations

import io
from functools import cache
from typing import get_args

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from core.preprocess import ImageRejected, InputLimits, PreparedImage, PreprocessConfig, RejectReason, prepare

CONFIG = PreprocessConfig()
# Small limits keep each example fast while still exercising every limit check.
LIMITS = InputLimits(max_bytes=256 * 1024, max_pixels=2_000_000, min_side=32)
REASONS = frozenset(get_args(RejectReason))


@cache
def seeds() -> tuple[bytes, ...]:
    """Small valid images in every supported format and the modes they commonly come in."""
    y, x = np.mgrid[0:48, 0:40]
    gray = Image.fromarray(((x * 5 + y * 3) % 256).astype(np.uint8), mode="L")
    out = []

    def save(image: Image.Image, fmt: str, **kw: object) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        out.append(buffer.getvalue())

    save(gray, "JPEG", quality=80)
    save(gray.convert("RGB"), "JPEG", quality=80, progressive=True)
    save(gray.convert("CMYK"), "JPEG")
    save(gray, "PNG")
    save(Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257), "PNG")
    save(gray.convert("RGBA"), "PNG")
    save(gray.convert("P"), "PNG")
    save(gray.convert("P"), "GIF", save_all=True, append_images=[gray.rotate(5).convert("P")])
    save(gray, "TIFF", save_all=True, append_images=[gray.rotate(5)])
    save(gray, "TIFF", compression="tiff_deflate")
    save(gray, "BMP")
    save(gray, "WEBP", quality=70)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(gray, "JPEG", exif=exif.tobytes())
    return tuple(out)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image with one to four random mutations, biased to the header."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        head = min(len(data), 256)
        at = draw(st.one_of(st.integers(0, head - 1), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "byte", "int", "insert", "delete", "truncate", "splice"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif kind == "int":  # a width, height, length or offset field set to an extreme
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, draw(st.integers(0, 2**32 - 1))]))
            data[at : at + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:  # splice in a piece of another seed
            other = draw(st.sampled_from(seeds()))
            start = draw(st.integers(0, len(other) - 1))
            data[at : at + 32] = other[start : start + 32]
    return bytes(data)


ANY_INPUT = st.one_of(st.binary(max_size=2048), mutated_images())


def check(data: bytes) -> str:
    """The property; returns 'ok' or the rejection reason (for statistics). Fails on anything else."""
    try:
        prepared = prepare(data, CONFIG, LIMITS)
    except ImageRejected as exc:
        assert exc.reason in REASONS, exc.reason
        assert isinstance(exc.message, str) and exc.message
        return exc.reason
    assert isinstance(prepared, PreparedImage)
    assert prepared.pixels.dtype == np.uint8
    assert prepared.pixels.shape == (CONFIG.image_size, CONFIG.image_size)
    assert 0 < prepared.width * prepared.height <= LIMITS.max_pixels
    assert min(prepared.width, prepared.height) >= LIMITS.min_side
    assert len(data) <= LIMITS.max_bytes
    return "ok"
