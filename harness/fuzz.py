"""Property-based fuzzing of the decode-and-validate path, `core.preprocess.prepare`.

The property: for ANY bytes, `prepare` either returns a PreparedImage inside
the limits (model-sized uint8 grid, a source within max_pixels and min_side;
a DICOM object refused by its tags with a known refusal reason) or raises
ImageRejected with a known reason and a message; never another exception.
Inputs are arbitrary bytes and mutations (bit flips, overwritten header
fields, insertions, deletions, truncation, splices, padding past the byte
limit) of small valid images in every accepted format, DICOM in each transfer
syntax included.

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

from api.reasons import REFUSAL_REASONS
from core.preprocess import ImageRejected, InputLimits, PreparedImage, PreprocessConfig, RejectReason, prepare
from harness import dicom_files

CONFIG = PreprocessConfig()
# Small limits keep each example fast while still exercising every limit check: the byte limit sits just above
# the largest seed (13 KB), so a seed grown by the "pad" mutation crosses it (too_many_bytes).
LIMITS = InputLimits(max_bytes=16 * 1024, max_pixels=2_000_000, min_side=32)
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
    return tuple(out) + dicom_seeds(np.asarray(gray))


def dicom_seeds(gray: np.ndarray) -> tuple[bytes, ...]:
    """DICOM Part 10 files of the grid: native 8/12/16 bit, windows, a VOI LUT, rescale, MONOCHROME1, every
    compressed syntax, a refused CT and a lateral view, and one without its preamble."""
    d = dicom_files
    lean = dict(patient="FUZZ", spacing=(0.2, 0.2))
    s8, s12, s16 = (d.stored_values(gray, bits) for bits in (8, 12, 16))
    m1 = d.stored_values(gray, 12, monochrome1=True)
    lut = (np.arange(4096) // 16) * 257
    files = [
        d.part10(s8.values, bits_stored=8, window=(s8.center, s8.width), **lean),
        d.part10(s12.values, bits_stored=12, window=[(s12.center, s12.width), (2048.0, 4096.0)], **lean),
        d.part10(s16.values, bits_stored=16, window=(s16.center, s16.width), voi_function="LINEAR_EXACT", **lean),
        d.part10(m1.values, bits_stored=12, photometric="MONOCHROME1", voi_lut=(0, 16, lut), **lean),
        d.part10(((s12.values.astype(np.int64) + 1024) // 2).astype(np.uint16), bits_stored=12, rescale=(2.0, -1024.0),
                 window=(s12.center, s12.width), modality="CR", **lean),
        d.part10(s16.values, bits_stored=16, **lean),
        d.part10(gray, bits_stored=8, modality="CT", **lean),
        d.part10(gray, bits_stored=8, view="LL", **lean),
    ]
    for name, stored in (("rle", s12), ("jpeg2000", s16), ("jpeg-lossless", s12), ("jpeg-ls", s16), ("jpeg-baseline", s8)):
        files.append(d.part10(stored.values, bits_stored=stored.bits, syntax=d.SYNTAXES[name], **lean))
    files.append(files[0][128:])  # no preamble: starts with DICM
    return tuple(files)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image with one to four random mutations, biased to the header."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        head = min(len(data), 1024 if data[128:132] == b"DICM" else 256)  # a DICOM header is longer
        at = draw(st.one_of(st.integers(0, head - 1), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "byte", "int", "insert", "delete", "truncate", "splice", "pad"]))
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
        elif kind == "pad":  # filler up to the byte limit, one byte over it, or far over it: too_many_bytes
            to_limit = max(1, LIMITS.max_bytes - len(data))
            size = draw(st.sampled_from([to_limit, to_limit + 1, 2 * LIMITS.max_bytes, draw(st.integers(1, 4096))]))
            data[at:at] = bytes([draw(st.integers(0, 255))]) * size
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
    if prepared.refusal is not None:  # a DICOM object refused by its tags
        assert prepared.refusal[0] in REFUSAL_REASONS and prepared.refusal[1], prepared.refusal
        assert prepared.format == "DICOM"
    assert prepared.pixels.dtype == np.uint8
    assert prepared.pixels.shape == (CONFIG.image_size, CONFIG.image_size)
    assert 0 < prepared.width * prepared.height <= LIMITS.max_pixels
    assert min(prepared.width, prepared.height) >= LIMITS.min_side
    assert len(data) <= LIMITS.max_bytes
    return f"refused:{prepared.refusal[0]}" if prepared.refusal is not None else "ok"
