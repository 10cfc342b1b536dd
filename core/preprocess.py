"""The one preprocessing path: decode, validate, grayscale, resize, normalise.

Training, evaluation, the HTTP service, the gRPC endpoint and the benchmarks all
call these functions, parameterised by the `PreprocessConfig` stored with each
model, so served predictions cannot drift from what the model was trained on.
Nothing else in the project decodes or resizes an image. DICOM Part 10 files are
read by core/dicom.py (tags, tag gate, windowing to 8 bits) and then take the
same grayscale/resize/normalise steps as every other format.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import dicom
from core.dicom import DicomInfo

# Truncated files must fail loudly, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own (configurable) pixel limit before decoding; PIL's global
# guard would otherwise raise or warn with its own message first.
Image.MAX_IMAGE_PIXELS = None

RejectReason = Literal[
    "empty",
    "too_many_bytes",
    "not_an_image",
    "unsupported_format",
    "too_many_pixels",
    "too_small",
    "corrupt",
    "dicom_no_pixel_data",
    "dicom_unsupported_syntax",
]

# Formats a radiology client can reasonably send; anything else PIL happens to
# understand (EPS, ICNS, ...) is refused rather than fed to a decoder we never test.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO"})


class PreprocessConfig(BaseModel):
    """Preprocessing parameters; stored with every model in the registry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(224, ge=16, le=1024, description="square input side in pixels")
    normalization: Literal["per_image", "equalize", "fixed"] = Field(
        "per_image",
        description="per_image: zero mean, unit variance per image (robust to exposure); "
        "equalize: each pixel replaced by its grey level's mid-rank in the image's own histogram, "
        "then scaled to zero mean, unit variance (unchanged by any monotonic grey-level change: "
        "exposure, gamma, a window); fixed: (x - mean) / std with the constants below",
    )
    mean: float = 0.5
    std: float = 0.25
    dicom_window: int = Field(
        0,
        ge=0,
        le=15,
        description="which of a DICOM file's VOI LUTs or Window Center/Width pairs to apply (0: the first); "
        "stored with the model, so its training data and its served inputs are windowed alike",
    )


class InputLimits(BaseModel):
    """Bounds on what one uploaded image may cost before it is decoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted file")
    max_pixels: int = Field(50_000_000, gt=0, description="largest width*height (decompression bombs)")
    # 64: below it the shipped model's verdicts fail (validation X-rays sent at a 32 px side: specificity 0.52 with
    # the gate's 72 % refusals counted as answers; at 64 px 0.96 against 0.985 at full size; docs/model_card.md).
    min_side: int = Field(64, ge=1, description="smallest accepted width or height")

    @model_validator(mode="after")
    def _some_image_fits(self) -> InputLimits:
        """Refuse limits no image can meet (PNEUMONIA_LIMITS__MAX_PIXELS=10 started a server that refused all)."""
        if self.max_pixels < self.min_side**2:
            raise ValueError(f"max_pixels {self.max_pixels:,} is below min_side squared ({self.min_side}x{self.min_side} "
                             f"= {self.min_side**2:,}): no image could be accepted")
        return self


class ImageRejected(ValueError):
    """An input that cannot be classified; `reason` is a stable machine-readable code."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason
        self.message = message


@dataclass(frozen=True)
class PreparedImage:
    """A validated image reduced to the model's input grid, plus what a client should know."""

    pixels: np.ndarray  # uint8, shape (image_size, image_size)
    width: int
    height: int
    mode: str
    format: str
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # (reason, message) when the file itself says it is not a frontal chest X-ray (e.g. DICOM tags): the
    # image gets a per-image refusal without a verdict, whatever the model's validity gate finds.
    refusal: tuple[str, str] | None = None
    # DICOM inputs: what the file says about its acquisition and encoding (never the patient); else None.
    dicom: DicomInfo | None = None
    # The decoded grey image at display size (aspect kept), only when `prepare` was asked for one: the picture an
    # explanation's heatmap is drawn on (core/explain.py). None otherwise.
    preview: np.ndarray | None = field(default=None, repr=False)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_crcs(data: bytes) -> None:
    """A PNG chunk whose CRC does not match means a damaged file; PIL ignores image-data CRCs."""
    view, pos = memoryview(data), len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return  # truncated: decoding reports it
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            kind = "".join(c for c in bytes(view[pos + 4 : pos + 8]).decode("latin-1") if c.isalnum())
            raise ImageRejected("corrupt", f"PNG chunk {kind or '?'} fails its CRC check: the file is damaged")
        if view[pos + 4 : pos + 8] == b"IEND":
            return
        pos = end + 4


# libjpeg's warnings that the compressed data is damaged (its JWRN_HIT_MARKER, HUFF_BAD_CODE, MUST_RESYNC,
# ARITH_BAD_CODE, EXTRANEOUS_DATA, JPEG_EOF). Two kinds of stray bytes are let through: between the segments
# before the first scan (removed, then decoded again strictly: no pixel depends on them), and one or two before the
# end-of-image marker, which some writers leave. More there is what damaged data that lost its sync leaves (a
# review found 8, with a quarter of the grid wrong).
_DAMAGED_JPEG = ("Corrupt JPEG data", "Premature end of JPEG file")
_HARMLESS_JPEG = re.compile(r"Corrupt JPEG data: [12] extraneous bytes before marker 0xd9")


def libjpeg_damage(message: str) -> bool:
    """Whether libjpeg's warning (simplejpeg's strict error) says the compressed data is damaged, not harmless."""
    return message.startswith(_DAMAGED_JPEG) and _HARMLESS_JPEG.fullmatch(message) is None


def without_header_junk(data: bytes) -> bytes | None:
    """`data` without the stray bytes between its segments before the first scan, or None when it has none (or
    its header cannot be walked: the decoder then says what is wrong)."""
    out, pos, changed = bytearray(data[:2]), 2, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            following = data.find(b"\xff", pos)
            if following < 0:
                return None
            pos, changed = following, True
            continue
        while pos + 1 < len(data) and data[pos + 1] == 0xFF:  # fill bytes before a marker are allowed
            pos += 1
        marker = data[pos + 1] if pos + 1 < len(data) else None
        if marker == 0xDA:  # start of scan: the rest is compressed data, checked by the decoder
            return bytes(out + data[pos:]) if changed else None
        if marker is None or marker == 0x00:
            return None
        length = 0 if marker in dicom.STANDALONE_MARKERS else int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        out += data[pos:end]
        pos = end
    return None


def _decode_jpeg(data: bytes, header: Image.Image, side: int) -> Image.Image | None:
    """A grey or RGB JPEG decoded once by libjpeg-turbo (simplejpeg), strictly, at the scale PIL's `draft` picks:
    the largest of 1/8, 1/4, 1/2 and 1 whose both sides still cover `side`. None: let PIL decode it (CMYK, or a
    process simplejpeg does not take).

    Why not PIL: it decodes damaged data without a word (libjpeg's "Corrupt JPEG data" is a warning it does not
    pass on), and from the damage on the picture is grey noise or shifted blocks that the model still classified.
    The pixels are PIL's own, bit for bit (the same libjpeg-turbo code: all 5,216 training X-rays and the full-size
    samples compared; tests/test_preprocess.py keeps comparing), and one decode instead of a decode plus a check.
    Damage libjpeg cannot see (a flipped bit that still decodes) passes, as it did.
    """
    width, height = header.size
    scale = next((s for s in (8, 4, 2, 1) if min(width // side, height // side) >= s), 1)  # smaller: as is
    options = dict(colorspace="GRAY" if header.mode == "L" else "RGB", min_factor=scale,
                   min_width=-(-width // scale), min_height=-(-height // scale))
    try:
        pixels = simplejpeg.decode_jpeg(data, strict=True, **options)
    except ValueError as exc:
        message = str(exc)
        if "extraneous bytes" in message and (cleaned := without_header_junk(data)) is not None:
            return _decode_jpeg(cleaned, header, side)
        if message.startswith("Premature end of JPEG file"):
            raise ImageRejected("corrupt", "the image could not be decoded: the JPEG file ends before its image "
                                           "data does (it was cut short; send the whole file)") from None
        if libjpeg_damage(message):
            raise ImageRejected("corrupt", f"the JPEG data is damaged ({message}): part of the picture would be "
                                           "noise; send the file again or export it anew") from None
        if _HARMLESS_JPEG.fullmatch(message) is None:
            return None
        pixels = simplejpeg.decode_jpeg(data, strict=False, **options)
    if pixels.shape[:2] != (options["min_height"], options["min_width"]):
        return None  # not the scale PIL would use: PIL decodes it
    image = Image.fromarray(pixels[:, :, 0] if header.mode == "L" else pixels, mode=header.mode)
    image.info.update(header.info)  # its EXIF, for ImageOps.exif_transpose
    return image


def _check_bytes(data: bytes, limits: InputLimits) -> None:
    if not data:
        raise ImageRejected("empty", "the file is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "too_many_bytes",
            f"the file is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes",
        )


def _open(data: bytes, limits: InputLimits) -> Image.Image:
    if data.startswith(_PNG_SIGNATURE):
        _check_png_crcs(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if dicom.looks_like_bare_data_set(data):
            raise ImageRejected("not_an_image", "the file looks like a DICOM data set without its Part 10 header (no "
                                "'DICM' marker, no File Meta Information): export it from the PACS or viewer as "
                                "a DICOM Part 10 file") from None
        raise ImageRejected("not_an_image", "the file is not a recognised image file") from None
    except Exception as exc:  # PIL raises many types on hostile headers
        raise ImageRejected("corrupt", f"the image header could not be read: {exc}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageRejected(
            "unsupported_format",
            f"image format {image.format} is not supported; send DICOM, JPEG, PNG, TIFF, BMP, GIF or WebP",
        )
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {limits.max_pixels:,} pixels",
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            "too_small",
            f"the image is {width}x{height} pixels; both sides must be at least {limits.min_side}",
        )
    return image


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit 'L', keeping the full dynamic range of 16-bit scans."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():  # one NaN or inf made every pixel NaN: refused as blank, blamed on a marker
            raise ImageRejected("corrupt", "the image holds pixel values that are not numbers (NaN or infinity)")
        lo, hi = float(array.min()), float(array.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((array - lo) * scale).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become black, the background of a radiograph.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image.convert("L")


_SCALED_MODES = frozenset({"I;16", "I;16B", "I;16L", "I", "F"})  # scaled min to max by _to_grayscale
# 1st to 99th percentile of the grid, in grey levels: every training X-ray spans 120 or more (one in 50 measured).
_MIN_SPREAD = 48


def _range_note(pixels: np.ndarray) -> list[str]:
    """A warning when scaling an image's full range (min to max) to 8 bits left the anatomy in a few grey levels:
    a handful of extreme pixels (a burned-in label, a marker) set the range. The validity gate then refuses the
    image as 'not a chest X-ray', which points the sender the wrong way without this line."""
    low, high = np.percentile(pixels, [1, 99])
    if high - low >= _MIN_SPREAD:
        return []
    return [f"the image's full range (min to max) was scaled to 8 bits, and 98 % of its pixels fell in "
            f"{high - low:.0f} of 256 grey levels: a few extreme pixels (a marker, a burned-in label) set the range; "
            "send it windowed (an 8-bit export, or DICOM with a window)"]


def _grid(image: Image.Image, config: PreprocessConfig, original_side: int,
          preview_side: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded image -> the model's uint8 grid (grayscale, then resize; every format, DICOM included), and the
    grey preview when one was asked for."""
    gray = _to_grayscale(image)
    preview = None if preview_side is None else _preview(gray, original_side, preview_side)
    gray = gray.resize((config.image_size, config.image_size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(gray, dtype=np.uint8), preview


def _preview(gray: Image.Image, original_side: int, preview_side: int) -> np.ndarray:
    shown = gray.resize(preview_size(gray.width, gray.height, original_side, preview_side),
                        Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(shown, dtype=np.uint8)


def _sharper_jpeg(data: bytes, longest: int) -> Image.Image:
    """The JPEG decoded again, at the smallest scale whose longer side still covers `longest`, for a preview: the
    model's decode is scaled for its 224 px grid (1/8 of a 2000 px scan), and a 512 px picture enlarged from that
    blurred a burned-in marker a reviewer reads (a helper's find). The model's pixels never come from here."""
    with Image.open(io.BytesIO(data)) as header:
        width, height = header.size
        decoded = _decoded_at(data, header, -(-longest * min(width, height) // max(width, height)))  # shorter side
        return decoded.copy() if decoded is header else decoded  # the file closes here


def _decoded_at(data: bytes, image: Image.Image, side: int) -> Image.Image:
    """`image` (opened from `data`, not yet loaded) decoded; a JPEG at the smallest power-of-two scale whose both
    sides still cover `side` (PIL's draft mode, libjpeg's DCT scaling), by `_decode_jpeg` where it can."""
    if image.format == "JPEG":
        decoded = _decode_jpeg(data, image, side) if image.mode in ("L", "RGB") else None
        if decoded is not None:
            return decoded
        image.draft(image.mode, (side, side))
    image.load()
    return image


# Chest radiographs are taken on 14x17 or 17x14 inch plates and cropped from them; a side more than this many
# times the other is a strip, a panorama or a collage, which the square resize below would squeeze out of shape.
MAX_ASPECT = 2.5


def _shape_notes(width: int, height: int, config: PreprocessConfig) -> list[str]:
    """Warnings about the decoded size: too few pixels, or a shape no chest radiograph has."""
    notes = []
    if min(width, height) < 2 * config.image_size // 3:
        notes.append(f"low resolution ({width}x{height}); the model expects at least {config.image_size} px")
    if max(width, height) > MAX_ASPECT * min(width, height):
        notes.append(f"unusual shape ({width}x{height}, {max(width, height) / min(width, height):.1f}:1); it is "
                     f"squeezed to a square for the model, and chest X-rays are within {MAX_ASPECT}:1")
    return notes


def prepare(
    data: bytes, config: PreprocessConfig, limits: InputLimits | None = None, preview_side: int | None = None
) -> PreparedImage:
    """Validate and decode one upload into the model's uint8 input grid.

    Raises `ImageRejected` (never anything else) for input that cannot be used.
    Large JPEGs are decoded at a reduced scale (draft mode), which is both the
    fast path and the only path, so training and serving see identical pixels.
    DICOM Part 10 files are read by core.dicom (tags, windowing) and then take
    the same grayscale and resize steps; a DICOM object that is not a frontal
    chest radiograph comes back with `refusal` set and a blank grid.
    `preview_side`: also keep the grey image, aspect kept, its longer side that
    many pixels or the original's if smaller (`preview_size`); the model's grid
    is the same with or without it.
    """
    limits = limits or InputLimits()
    _check_bytes(data, limits)
    if dicom.is_dicom(data):
        return _prepare_dicom(data, config, limits, preview_side)
    image = _open(data, limits)
    width, height, mode, fmt = image.width, image.height, image.mode, image.format or "?"
    notes: list[str] = []
    try:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            notes.append(f"{fmt} has {frames} frames; only the first was classified")
        orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
        # Stored turned a quarter: the size reported is the upright image's. PIL's TIFF reader turns the image itself
        # (its size is the upright one already; swapping it reported 1900x1600 for a 1600x1900 X-ray).
        if orientation in (5, 6, 7, 8) and fmt != "TIFF":
            width, height = height, width
        image = _decoded_at(data, image, config.image_size)  # a 2000 px JPEG scan decodes 8x faster
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
        coloured = image.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "P") and _looks_coloured(image)
        original_side = max(width, height)
        # A JPEG decoded smaller than the preview is decoded again for it (`_sharper_jpeg`), not enlarged.
        sharper = preview_side is not None and fmt == "JPEG" and max(image.size) < min(preview_side, original_side)
        pixels, preview = _grid(image, config, original_side, None if sharper else preview_side)
        if sharper:
            assert preview_side is not None
            shown = _sharper_jpeg(data, min(preview_side, original_side))
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                shown = ImageOps.exif_transpose(shown)
            preview = _preview(_to_grayscale(shown), original_side, preview_side)
    except ImageRejected:
        raise
    except Exception as exc:  # truncated data, bad CRC, decoder errors
        raise ImageRejected("corrupt", f"the image could not be decoded: {exc}") from None
    notes += _shape_notes(width, height, config)
    if image.mode in _SCALED_MODES:
        notes += _range_note(pixels)
    if coloured:
        notes.append("colour image: it may not be a radiograph")
    return PreparedImage(pixels=pixels, width=width, height=height, mode=mode, format=fmt, warnings=tuple(notes),
                         preview=preview)


def preview_size(width: int, height: int, original_side: int, side: int) -> tuple[int, int]:
    """(width, height) of a preview of a `width` x `height` decoded image: aspect kept, the longer side
    `side` pixels, or `original_side` (the file's own longer side) when that is smaller."""
    longest = min(side, original_side)
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _prepare_dicom(data: bytes, config: PreprocessConfig, limits: InputLimits, preview_side: int | None) -> PreparedImage:
    try:
        read = dicom.read(data, max_pixels=limits.max_pixels, min_side=limits.min_side,
                          window_index=config.dicom_window)
    except dicom.DicomError as exc:
        raise ImageRejected(exc.reason, exc.message) from None  # type: ignore[arg-type]
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - anything pydicom or a decoder plugin raises (Rust panics are
        # BaseExceptions) is a bad file
        raise ImageRejected("corrupt", f"the DICOM file could not be read ({type(exc).__name__})") from None
    common = dict(width=read.width, height=read.height, mode=read.mode, format="DICOM", dicom=read.info)
    if read.image is None:  # refused by its tags: never decoded, never classified
        blank = np.zeros((config.image_size, config.image_size), dtype=np.uint8)
        return PreparedImage(pixels=blank, refusal=read.refusal, **common)
    notes = list(read.warnings)
    try:
        coloured = read.image.mode == "RGB" and _looks_coloured(read.image)
        shown = _square_size(read.image.size, read.info.pixel_spacing_mm)
        square = shown == read.image.size
        pixels, preview = _grid(read.image, config, max(shown), preview_side if square else None)
        if not square and preview_side is not None:  # the preview as a viewer shows it, from the resampled image
            resampled = read.image.resize(shown, Image.Resampling.BILINEAR, reducing_gap=None)
            preview = _preview(_to_grayscale(resampled), max(shown), preview_side)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a pathological image
        raise ImageRejected("corrupt", f"the DICOM image could not be resized ({type(exc).__name__})") from None
    notes += _shape_notes(*shown, config)
    if read.info.voi == "min_max":  # no window in the file: scaled min to max, as a 16-bit PNG
        notes += _range_note(pixels)
    if coloured:
        notes.append("colour image: it may not be a radiograph")
    return PreparedImage(pixels=pixels, warnings=tuple(notes), preview=preview, **common)


def _square_size(size: tuple[int, int], spacing_mm: tuple[float, float] | None) -> tuple[int, int]:
    """(width, height) of the image as a viewer shows it when its rows and columns are spaced differently (Pixel
    Spacing or Imager Pixel Spacing, e.g. 0.2 x 0.1 mm): the finer axis at the coarser spacing, so nothing grows.
    The preview (and heatmap) had the stored shape, 2:1 for a square field, and the shape check judged that (a
    helper's find). The model's grid comes from the stored pixels all the same: it squeezes any shape to a square.
    Spacings more than 4:1 apart are taken as wrong tags, and the stored shape is kept."""
    if spacing_mm is None:
        return size
    row, column = spacing_mm  # the distance between rows (a pixel's height), between columns (its width)
    ratio = row / column
    if abs(ratio - 1) < 0.01 or not 0.25 <= ratio <= 4:
        return size
    width, height = size
    return (max(1, round(width / ratio)), height) if ratio > 1 else (width, max(1, round(height * ratio)))


def _looks_coloured(image: Image.Image) -> bool:
    """True when the channels differ noticeably (X-rays saved as RGB have equal channels)."""
    try:  # shrink first, convert after: converting the whole image cost more than decoding it
        small = image.resize((32, 32), Image.Resampling.BOX).convert("RGB")
    except Exception:
        return False
    rgb = np.asarray(small, dtype=np.int16)
    spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()
    return bool(spread > 8.0)


# Per-image scaling's floor on the standard deviation, in [0, 1] grey levels (a flat image stays flat).
_MIN_STD = 1e-3


def to_tensor(pixels: np.ndarray | torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 grid(s) (..., H, W) -> normalised float32 tensor (N, 1, H, W).

    Training applies augmentation to the uint8/float grid first and then calls
    this, so normalisation is identical in every flow.
    """
    if config.normalization == "per_image" and pixels.dtype in (np.uint8, torch.uint8):
        return _per_image_uint8(np.asarray(pixels))
    x = torch.as_tensor(pixels)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    x = x.float()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if config.normalization == "equalize":
        return _equalize(x)
    if config.normalization == "per_image":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(_MIN_STD)
        return (x - mean) / std
    return (x - config.mean) / config.std


def _per_image_uint8(grids: np.ndarray) -> torch.Tensor:
    """`per_image` normalisation of uint8 grids, what serving and evaluation feed: the same values as the float
    path (to ~1e-6; tests/test_preprocess.py), computed in place on one float32 copy with an exact integer mean.
    Why a second route: on one thread the float path's six passes cost 0.4-0.5 ms per 224 px image, a tenth of
    a service worker's forward pass; this one 0.06 ms (docs/performance.md)."""
    shape = grids.shape
    flat = grids.reshape(-1, shape[-2] * shape[-1])
    x = flat.astype(np.float32)
    x -= (flat.sum(axis=1, dtype=np.int64) / flat.shape[1]).astype(np.float32)[:, None]
    variance = np.add.reduce(x * x, axis=1) / (flat.shape[1] - 1)  # unbiased, as torch.std
    x *= (1 / np.maximum(np.sqrt(variance), 255 * _MIN_STD))[:, None]  # scale-free: grey levels 0-255, not 0-1
    return torch.from_numpy(x.reshape(-1, 1, shape[-2], shape[-1]))


# Standard deviation of a uniform distribution on [0, 1]: equalised grids are uniform by construction.
_UNIFORM_STD = 12 ** -0.5


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) floats in [0, 1] -> histogram-equalised, zero mean, unit variance.

    Acquisition differs between sites mostly by monotonic grey-level maps (exposure, gamma, the window a
    workstation exports with); a model fed ranks instead of grey levels cannot learn those as a shortcut.
    Ties share their mid-rank (256 levels), so the result does not depend on pixel order.
    """
    levels = x.clamp(0.0, 1.0).mul(255.0).round_().long().flatten(1)  # (N, H*W)
    counts = torch.zeros(levels.shape[0], 256, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float32))
    mid_rank = (counts.cumsum(1) - counts / 2) / levels.shape[1]
    ranks = mid_rank.gather(1, levels).view_as(x)
    return (ranks - 0.5) / _UNIFORM_STD


def load_file(path: str | os.PathLike[str], config: PreprocessConfig, limits: InputLimits | None = None) -> PreparedImage:
    """`prepare` for a file on disk (training data, evaluation folders, CLI)."""
    with open(path, "rb") as handle:
        return prepare(handle.read(), config, limits)
