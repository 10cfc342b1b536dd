"""Small synthetic images made by tests (never committed data)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def gradient(size: tuple[int, int] = (300, 260), mode: str = "L") -> Image.Image:
    """A deterministic, asymmetric grey pattern (so rotations are detectable)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    pattern = ((x * 255 // max(w - 1, 1)) * 0.6 + (y * 255 // max(h - 1, 1)) * 0.4).astype(np.uint8)
    pattern[: h // 4, : w // 3] = 255  # a bright block in one corner
    return Image.fromarray(pattern, mode="L").convert(mode)


def png_bomb(side: int = 30000) -> bytes:
    """A small PNG file whose header claims side x side pixels."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)
