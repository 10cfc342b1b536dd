"""DICOM Part 10 input (issue 12): built here from real training X-rays, sent to the live server over HTTP and gRPC.

Each DICOM file is made with pydicom from a real X-ray's 8-bit pixels (harness/dicom_files.py): stored at 8,
12 or 16 bits, MONOCHROME1 or MONOCHROME2, with a window, a VOI LUT, a rescale or none, in every transfer
syntax the service decodes. Its classification must equal, within 1e-3, that of a PNG of the same 8-bit
pixels sent in the same request. Objects that are not frontal chest radiographs are refused per image; broken
files get a 400 with a reason; no patient tag ever leaves the server.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, MPEG2MPML

from client import InvalidInput, connect
from core.preprocess import ImageRejected, InputLimits, PreprocessConfig, prepare
from harness import dicom_files as D
from harness.dicom_files import PHI_MARKER
from harness.payloads import sample_xrays
from harness.servers import ServerProcess, server_env
from tests.test_grpc import wait_serving

TOLERANCE = 1e-3
CONFIG = PreprocessConfig()
PHI = (PHI_MARKER, "19230405", "Jane")  # name marker, birth date, given name: in every file built here


# ------------------------------------------------------------------------------------------- the files


@cache
def xrays() -> tuple[np.ndarray, np.ndarray]:
    """Two real X-rays (one per class) from the shared training folder, as 8-bit grids."""
    return tuple(np.asarray(Image.open(p).convert("L")) for p in sample_xrays(1, offset=7))  # type: ignore[return-value]


def png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def stretched(values: np.ndarray) -> np.ndarray:
    """The full-range display of stored values (no window): min..max onto 0..255, rounded."""
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


@dataclass(frozen=True)
class Case:
    name: str
    dicom: bytes
    reference: bytes  # the same picture as an ordinary image file: the answer must match it within TOLERANCE
    voi: str  # expected DicomInfo.voi
    mode: str


def _case(name: str, gray: np.ndarray, bits: int, *, m1: bool = False, voi: str = "window", ref: bytes | None = None,
          **kwargs: object) -> Case:
    stored = D.stored_values(gray, bits, monochrome1=m1, signed=bool(kwargs.get("signed")))
    values = kwargs.pop("values", stored.values)
    if voi == "window" and "window" not in kwargs:
        kwargs["window"] = (stored.center, stored.width)
    data = D.part10(values, bits_stored=bits, photometric="MONOCHROME1" if m1 else "MONOCHROME2", **kwargs)
    mode = "L" if bits == 8 else ("I;16S" if kwargs.get("signed") else "I;16")
    return Case(name, data, ref if ref is not None else png(gray), voi, mode)


@cache
def equivalence_cases() -> tuple[Case, ...]:
    """DICOM files whose display is exactly the X-ray's own 8-bit pixels (or, where noted, a stated reference)."""
    a, b = xrays()
    s12 = D.stored_values(a, 12)
    lut16 = (np.arange(4096) // 16) * 257  # 12-bit stored -> 16-bit display levels
    lut8 = np.arange(4096) // 16  # 12-bit stored -> 8-bit display levels
    jpeg = io.BytesIO()
    Image.fromarray(a).save(jpeg, format="JPEG", quality=95)
    syntax = D.SYNTAXES
    cases = [
        # uncompressed, 8/12/16 bit, MONOCHROME1/2, CR and DX (and DR, as some vendors write it)
        _case("8bit-mono2-window-cr", a, 8, modality="CR"),
        _case("8bit-mono2-no-window", a, 8, voi="identity"),
        _case("8bit-mono1-window", a, 8, m1=True),
        _case("12bit-mono2-window-dx", a, 12),
        _case("12bit-mono1-window-cr", a, 12, m1=True, modality="CR"),
        _case("12bit-rescale-slope-intercept", a, 12, values=((s12.values.astype(np.int64) + 1024) // 2).astype(np.uint16),
              rescale=(2.0, -1024.0)),
        _case("12bit-voi-lut-over-window", a, 12, voi="voi_lut", voi_lut=(0, 16, lut16), window=(100.0, 20.0)),
        _case("12bit-mono1-voi-lut-8bit", a, 12, m1=True, voi="voi_lut", voi_lut=(0, 8, lut8)),
        _case("16bit-mono2-window-dr-ap", a, 16, modality="DR", view="AP", body_part="THORAX"),
        _case("16bit-mono1-window", a, 16, m1=True),
        _case("16bit-signed-window", a, 16, signed=True),
        _case("16bit-linear-exact", a, 16, window=(32767.5, 65535.0), voi_function="LINEAR_EXACT"),
        _case("16bit-no-view-no-body-part", a, 16, view=None, body_part=None),
        # no window: the full range of the stored values, as a 16-bit PNG would be shown
        _case("12bit-no-window", a, 12, voi="min_max", ref=png(stretched(s12.values))),
        _case("16bit-mono1-no-window", a, 16, m1=True, voi="min_max",
              ref=png(255 - stretched(D.stored_values(a, 16, monochrome1=True).values))),
        # each compressed transfer syntax
        _case("rle-12bit", a, 12, syntax=syntax["rle"]),
        _case("rle-8bit-mono1", a, 8, m1=True, syntax=syntax["rle"]),
        _case("jpeg2000-16bit-mono1", a, 16, m1=True, syntax=syntax["jpeg2000"]),
        _case("jpeg2000-12bit", a, 12, syntax=syntax["jpeg2000"]),
        _case("jpeg-lossless-12bit", a, 12, syntax=syntax["jpeg-lossless"]),
        _case("jpeg-lossless-16bit-mono1", a, 16, m1=True, syntax=syntax["jpeg-lossless"]),
        _case("jpeg-ls-12bit-mono1", a, 12, m1=True, syntax=syntax["jpeg-ls"]),
        _case("jpeg-ls-16bit", a, 16, syntax=syntax["jpeg-ls"]),
        # JPEG baseline is lossy: its reference is the same JPEG file sent as a JPEG
        _case("jpeg-baseline-8bit", a, 8, voi="identity", syntax=syntax["jpeg-baseline"], ref=jpeg.getvalue()),
        # the other class's X-ray, through a few of the paths
        _case("b-12bit-mono1-window", b, 12, m1=True),
        _case("b-16bit-jpeg-ls", b, 16, syntax=syntax["jpeg-ls"]),
        _case("b-12bit-voi-lut", b, 12, voi="voi_lut", voi_lut=(0, 16, lut16)),
        _case("b-16bit-jpeg2000-mono1", b, 16, m1=True, syntax=syntax["jpeg2000"]),
    ]
    return tuple(cases)


REFUSED = {  # name -> (dataset arguments, refusal reason)
    "ct": ({"modality": "CT"}, "dicom_modality"),
    "mr": ({"modality": "MR"}, "dicom_modality"),
    "us": ({"modality": "US"}, "dicom_modality"),
    "no-modality": ({"modality": ""}, "dicom_modality"),
    "lateral-ll": ({"view": "LL"}, "dicom_view"),
    "lateral-rl": ({"view": "RL"}, "dicom_view"),
    "lateral-word": ({"view": "LATERAL"}, "dicom_view"),
    "abdomen": ({"body_part": "ABDOMEN"}, "dicom_body_part"),
    "skull": ({"body_part": "SKULL"}, "dicom_body_part"),
    "multiframe": ({"frames": 3}, "dicom_multiframe"),
}


@cache
def refused_files() -> dict[str, bytes]:
    a, _ = xrays()
    stored = D.stored_values(a, 12)
    return {name: D.part10(stored.values, bits_stored=12, window=(stored.center, stored.width), **kwargs)
            for name, (kwargs, _) in REFUSED.items()}


def _broken_syntax(uid: str) -> bytes:
    ds = D.dataset(xrays()[0].copy(), bits_stored=8)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid
    return D.to_bytes(ds)


@cache
def malformed_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file, reason of the 400)."""
    good = D.part10(xrays()[0].copy(), bits_stored=8)
    no_pixels = D.dataset(xrays()[0].copy(), bits_stored=8)
    del no_pixels.PixelData
    return {
        "truncated": (good[: len(good) // 2], "corrupt"),
        "truncated-in-header": (good[:420], "corrupt"),
        "no-pixel-data": (D.to_bytes(no_pixels), "dicom_no_pixel_data"),
        "unsupported-syntax-mpeg2": (_broken_syntax(MPEG2MPML), "dicom_unsupported_syntax"),
        "unsupported-syntax-deflate": (_deflated(), "dicom_unsupported_syntax"),
        "garbage-after-preamble": (good[:132] + np.random.default_rng(12).bytes(4096), "corrupt"),
    }


def _deflated() -> bytes:
    """The same file claiming the deflated transfer syntax (refused before anything is inflated)."""
    ds = D.dataset(xrays()[0].copy(), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- helpers


def post(server: ServerProcess, files: list[tuple[str, bytes]]) -> httpx.Response:
    return httpx.post(server.url + "/classify", files=[("images", (n, d, "application/octet-stream")) for n, d in files],
                      timeout=180)


def no_phi(text: str, where: str) -> None:
    for marker in PHI:
        assert marker not in text, f"{marker!r} leaked into {where}"


def pairs_in_requests(cases: tuple[Case, ...], per_request: int = 8) -> list[tuple[Case, ...]]:
    return [cases[i : i + per_request] for i in range(0, len(cases), per_request)]


# ------------------------------------------------------------------------------------------- in-process checks


def test_every_case_gives_the_reference_grid_in_process() -> None:
    """The preprocessing itself: each lossless DICOM file yields exactly the grid of its reference image."""
    for case in equivalence_cases():
        got = prepare(case.dicom, CONFIG)
        assert got.refusal is None and got.format == "DICOM" and got.mode == case.mode, case.name
        assert got.dicom is not None and got.dicom.voi == case.voi, (case.name, got.dicom)
        want = prepare(case.reference, CONFIG).pixels
        diff = np.abs(got.pixels.astype(int) - want.astype(int)).max()
        assert diff <= (3 if "baseline" in case.name else 0), (case.name, diff)


def test_window_choice_travels_with_the_model_config() -> None:
    """Two windows: the first is applied unless the model's PreprocessConfig.dicom_window says otherwise."""
    a, _ = xrays()
    s = D.stored_values(a, 12)
    data = D.part10(s.values, bits_stored=12, window=[(s.center, s.width), (s.center + 800, s.width / 2)])
    first, second = prepare(data, CONFIG), prepare(data, PreprocessConfig(dicom_window=1))
    assert np.array_equal(first.pixels, prepare(png(a), CONFIG).pixels)
    assert (first.dicom.window_center, first.dicom.window_width) == (s.center, s.width)
    assert second.dicom.window_center == s.center + 800 and not np.array_equal(first.pixels, second.pixels)
    beyond = prepare(data, PreprocessConfig(dicom_window=5))
    assert np.array_equal(beyond.pixels, first.pixels) and any("window 6" in w for w in beyond.warnings)


def test_implicit_vr_and_big_endian_files() -> None:
    """The other uncompressed syntaxes, with a VOI LUT (whose data follow the file's byte order)."""
    a, _ = xrays()
    s = D.stored_values(a, 12)
    want = prepare(png(a), CONFIG).pixels
    for uid in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        ds = D.dataset(s.values, bits_stored=12, voi_lut=(0, 16, (np.arange(4096) // 16) * 257))
        ds.file_meta.TransferSyntaxUID = uid
        if uid == ExplicitVRBigEndian:
            ds.PixelData = s.values.astype(">u2").tobytes()
        got = prepare(D.to_bytes(ds), CONFIG)
        assert got.dicom.voi == "voi_lut" and got.dicom.transfer_syntax == uid.name
        assert np.array_equal(got.pixels, want), uid.name


def test_presentation_lut_shape_and_presentation_intent() -> None:
    """MONOCHROME2 stored inverted with Presentation LUT Shape INVERSE is shown upright by a viewer: it was
    refused as `inverted`. DX pairs MONOCHROME1 with INVERSE: inverted once, not twice. A FOR PROCESSING
    image (raw detector values) was answered without a word."""
    a, _ = xrays()
    want = prepare(png(a), CONFIG).pixels
    inverted = D.stored_values(a, 12, monochrome1=True)  # 255 - x, as stored values
    for photometric, values in (("MONOCHROME2", inverted), ("MONOCHROME1", inverted)):
        ds = D.dataset(values.values, bits_stored=12, photometric=photometric, window=(values.center, values.width))
        ds.PresentationLUTShape = "INVERSE"
        got = prepare(D.to_bytes(ds), CONFIG)
        assert np.array_equal(got.pixels, want) and not got.warnings, photometric
    s = D.stored_values(a, 12)
    ds = D.dataset(s.values, bits_stored=12, window=(s.center, s.width))
    ds.PresentationLUTShape = "IDENTITY"
    assert np.array_equal(prepare(D.to_bytes(ds), CONFIG).pixels, want)
    ds.PresentationIntentType = "FOR PROCESSING"
    raw = prepare(D.to_bytes(ds), CONFIG)
    assert np.array_equal(raw.pixels, want) and any("FOR PROCESSING" in w for w in raw.warnings)


def test_tag_values_are_shown_only_as_sent_code_strings() -> None:
    """A Modality of 'Jane Doe' was shown upper-cased as 'JANE DOE', a valid-looking code string, in the refusal and
    in `image.dicom`. Values are checked upper-cased (a lower-case 'dx' is a radiograph) but shown as sent, and only
    when they are code strings."""
    a, _ = xrays()
    s = D.stored_values(a, 12)
    ds = D.dataset(s.values, bits_stored=12, window=(s.center, s.width))
    ds.Modality = "Jane Doe"
    named = prepare(D.to_bytes(ds), CONFIG)
    assert named.refusal is not None and named.refusal[0] == "dicom_modality", named.refusal
    assert "'(invalid value)'" in named.refusal[1] and "JANE" not in named.refusal[1].upper()
    assert named.dicom.modality == "(invalid value)"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "dx", "chest", "pa"
    lower = prepare(D.to_bytes(ds), CONFIG)
    assert lower.refusal is None and np.array_equal(lower.pixels, prepare(png(a), CONFIG).pixels)
    # values the gate accepts are shown as it read them (a review's find: 'chest' passed and showed as invalid)
    assert (lower.dicom.modality, lower.dicom.body_part, lower.dicom.view_position) == ("DX", "CHEST", "PA")
    ds.Modality, ds.ViewPosition = "DX", "ll"
    lateral = prepare(D.to_bytes(ds), CONFIG)
    assert lateral.refusal is not None and lateral.refusal[0] == "dicom_view" and "'(invalid value)'" in lateral.refusal[1]
    # Free text in other tags a message or `image.dicom` names (a helper's finds: all three were echoed).
    from pydicom.dataset import Dataset

    ds.ViewPosition, ds.VOILUTFunction = "PA", "Alice Leakcheck"  # answered, with a warning about the function
    warned = prepare(D.to_bytes(ds), CONFIG)
    assert warned.refusal is None and "unknown VOI LUT Function (invalid value); LINEAR was used" in warned.warnings
    del ds.VOILUTFunction
    ds.PhotometricInterpretation = "Alice Leakcheck"
    assert _refusal(D.to_bytes(ds)) == ("unsupported_format", "photometric interpretation (invalid value) is not "
                                        "supported; radiographs are MONOCHROME1 or MONOCHROME2")
    ds.PhotometricInterpretation, ds.Modality = "Alice Leakcheck", "CT"  # refused by its tags: `image.dicom` shown
    assert prepare(D.to_bytes(ds), CONFIG).dicom.photometric_interpretation == "(invalid value)"
    ds.PhotometricInterpretation, ds.Modality, ds.ViewPosition = "MONOCHROME2", "DX", None
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10232", "SRT", "lateral view of Alice Leakcheck"
    ds.ViewCodeSequence = [code]
    coded = prepare(D.to_bytes(ds), CONFIG)
    assert coded.refusal is not None and coded.refusal[1].startswith("the View Code Sequence (0054,0220) names a "
                                                                     "lateral view: only frontal views")
    assert all("ALICE" not in text.upper() for text in (*coded.refusal, *coded.warnings, str(coded.dicom)))


def test_sigmoid_window_and_preamble_left_out() -> None:
    a, _ = xrays()
    s = D.stored_values(a, 16)
    sigmoid = prepare(D.part10(s.values, bits_stored=16, window=(s.center, s.width), voi_function="SIGMOID"), CONFIG)
    assert sigmoid.dicom.voi == "window" and sigmoid.pixels.std() > 10
    file = D.part10(a.copy(), bits_stored=8)
    assert np.array_equal(prepare(file[128:], CONFIG).pixels, prepare(file, CONFIG).pixels)  # starts with DICM


def test_a_png_or_jpeg_with_dicm_at_byte_128_is_that_image() -> None:
    """A helper's find: a PNG whose text chunk put `DICM` at byte 128 was sent to the DICOM reader and refused as
    a broken DICOM ('no Transfer Syntax UID'); a JPEG comment can do the same."""
    import struct
    import zlib

    a, _ = xrays()
    reference = prepare(png(a), CONFIG)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    text = b"Comment\0" + b"x" * (128 - 33 - 8 - 8) + b"DICM exported"
    plain = png(a)
    marked = plain[:33] + chunk(b"tEXt", text) + plain[33:]
    assert marked[128:132] == b"DICM"
    assert np.array_equal(prepare(marked, CONFIG).pixels, reference.pixels)
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="JPEG", quality=95)
    jpeg = buffer.getvalue()
    comment = b"x" * (128 - 2 - 4) + b"DICM exported"  # SOI, then a COM segment: marker, length, text
    jpeg = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
    assert jpeg[128:132] == b"DICM" and prepare(jpeg, CONFIG).format == "JPEG"


def test_a_file_cut_before_its_pixels_says_so() -> None:
    """A helper's find: a DICOM cut inside its Pixel Data element's header (an interrupted copy) was called 'not an
    image (a report, a presentation state ...)'; a report without an image's header still is."""
    good = D.part10(xrays()[0].copy(), bits_stored=8)
    cut = good[: good.find(b"\xe0\x7f\x10\x00") + 6]
    with pytest.raises(ImageRejected) as refused:
        prepare(cut, CONFIG)
    assert refused.value.reason == "dicom_no_pixel_data" and "it was cut short" in str(refused.value)
    report = D.dataset(xrays()[0].copy(), bits_stored=8)
    for name in ("PixelData", "Rows", "Columns"):
        delattr(report, name)
    with pytest.raises(ImageRejected) as not_an_image:
        prepare(D.to_bytes(report), CONFIG)
    assert "it is not an image" in str(not_an_image.value)


def test_limits_are_checked_from_the_header_before_decoding() -> None:
    """Rows x Columns against the pixel limits, and a codestream that lies about its size, before any decoding."""
    a, _ = xrays()
    ds = D.dataset(a.copy(), bits_stored=8)
    ds.Rows = ds.Columns = 30000  # 900 M pixels claimed; 50 KB of data
    with pytest.raises(ImageRejected) as bomb:
        prepare(D.to_bytes(ds), CONFIG)
    assert bomb.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected) as small:
        prepare(D.part10(a[:20, :20].copy(), bits_stored=8), CONFIG)
    assert small.value.reason == "too_small"
    s = D.stored_values(a, 16)
    ds = D.dataset(s.values, bits_stored=16, syntax=D.SYNTAXES["jpeg2000"])
    ds.Rows = 112  # the JPEG 2000 codestream still says 224 rows
    with pytest.raises(ImageRejected) as lie:
        prepare(D.to_bytes(ds), CONFIG, InputLimits())
    assert lie.value.reason == "corrupt" and "224x224" in lie.value.message and "224x112" in lie.value.message


def _with_frame(ds, frame: bytes):
    """`ds` with its one compressed frame replaced by `frame` (items well formed: only the codestream is changed)."""
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return ds


def _frame(ds) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _refusal(data: bytes) -> tuple[str, str]:
    with pytest.raises(ImageRejected) as refused:
        prepare(data, CONFIG)
    return refused.value.reason, refused.value.message


def test_compressed_frames_the_header_check_cannot_read_or_that_are_cut_or_damaged_are_refused() -> None:
    """A helper's finds. The decoders skip what the size check stopped at (a stray byte after the start marker, a
    JP2 file box around the codestream) and allocated the frame's own size, gigabytes from a 200 KB file whose
    header said 112x112; and they filled in a frame cut in half (a NORMAL X-ray was answered PNEUMONIA 0.988) or
    with 2 KB zeroed, without a word."""
    import imagecodecs

    a, _ = xrays()
    s = D.stored_values(a, 12)
    jpeg_ls = D.dataset(s.values, bits_stored=12, window=(s.center, s.width), syntax=D.SYNTAXES["jpeg-ls"])
    frame = _frame(jpeg_ls)
    junk = frame[:2] + b"\x00" + frame[2:]  # a stray byte the decoders skip: so does the size check now
    assert prepare(D.to_bytes(_with_frame(jpeg_ls, junk + b"\x00")), CONFIG).refusal is None
    jpeg_ls.Rows = jpeg_ls.Columns = 112  # the header says 112 x 112; behind the stray byte, the frame is 224 x 224
    reason, message = _refusal(D.to_bytes(_with_frame(jpeg_ls, junk + b"\x00")))
    assert reason == "corrupt" and "the compressed frame is 224x224 pixels but the DICOM header says 112x112" in message
    jpeg_ls.Rows = jpeg_ls.Columns = 224
    reason, message = _refusal(D.to_bytes(_with_frame(jpeg_ls, b"\xff\xd8" + bytes(64))))
    assert reason == "corrupt" and "no frame header this service can read" in message, message
    after_end = frame + b"\x00\x00garbage!"  # bytes after the end marker: ignored by the decoders, and here
    assert prepare(D.to_bytes(_with_frame(jpeg_ls, after_end)), CONFIG).refusal is None
    cut = frame[: len(frame) // 2]
    reason, message = _refusal(D.to_bytes(_with_frame(jpeg_ls, cut + b"\x00" * (len(cut) % 2))))
    assert reason == "corrupt" and "ends before its image data does" in message, message
    j2k = D.dataset(s.values, bits_stored=12, window=(s.center, s.width), syntax=D.SYNTAXES["jpeg2000"])
    jp2 = imagecodecs.jpeg2k_encode(s.values.astype(np.uint16), level=0, codecformat="jp2")
    reason, message = _refusal(D.to_bytes(_with_frame(j2k, jp2 + b"\x00" * (len(jp2) % 2))))
    assert reason == "corrupt" and "is a JP2 file, not the bare JPEG 2000 codestream" in message, message
    baseline = D.dataset(a.copy(), bits_stored=8, syntax=D.SYNTAXES["jpeg-baseline"])
    whole = _frame(baseline)
    assert prepare(D.to_bytes(baseline), CONFIG).refusal is None
    scan = whole.find(b"\xff\xda")
    damaged = bytearray(whole)
    middle = scan + (len(whole) - scan) // 3
    damaged[middle : middle + 500] = bytes(500)
    reason, message = _refusal(D.to_bytes(_with_frame(baseline, bytes(damaged))))
    assert reason == "corrupt" and "pixel data is damaged (Corrupt JPEG data" in message, message


def test_native_pixels_short_of_the_header_colour_depth_and_coded_views_are_named() -> None:
    """Messages a radiographer can act on (a helper's finds): Pixel Data short of Rows x Columns said "could not be
    decoded (ValueError)"; a 16-bit RGB object was told "12 bits stored in 16 allocated is not supported"; a
    lateral view coded only in the View Code Sequence was classified; film-screen radiography (RG) was refused."""
    a, _ = xrays()
    s = D.stored_values(a, 12)
    ds = D.dataset(s.values, bits_stored=12, window=(s.center, s.width))
    needed = len(ds.PixelData)
    ds.PixelData = ds.PixelData[:-1000]
    reason, message = _refusal(D.to_bytes(ds))
    assert reason == "corrupt" and f"holds {needed - 1000:,} bytes" in message and f"need {needed:,}" in message
    ybr = D.dataset(np.stack([a] * 3, axis=-1), bits_stored=8, photometric="RGB")  # native YBR_FULL_422: 2 bytes a
    ybr.PhotometricInterpretation, ybr.PixelData = "YBR_FULL_422", bytes(a.size * 2)  # pixel, not 3 (a review's find)
    ybr.SamplesPerPixel, ybr.PlanarConfiguration = 3, 0
    assert prepare(D.to_bytes(ybr), CONFIG).refusal is None
    rgb = D.dataset(np.stack([s.values] * 3, axis=-1), bits_stored=12, photometric="RGB")
    rgb.SamplesPerPixel, rgb.PlanarConfiguration, rgb.BitsAllocated = 3, 0, 16
    reason, message = _refusal(D.to_bytes(rgb))
    assert reason == "unsupported_format" and "8 bits per sample only, not 16" in message, message
    from pydicom.dataset import Dataset

    lateral = D.dataset(s.values, bits_stored=12, window=(s.center, s.width), view=None)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10232", "SRT", "right lateral"
    lateral.ViewCodeSequence = [code]
    refused = prepare(D.to_bytes(lateral), CONFIG)
    assert refused.refusal is not None and refused.refusal[0] == "dicom_view", refused.refusal
    assert "names a lateral view" in refused.refusal[1]
    for frontal in ("postero-anterior", "bilateral postero-anterior"):
        code.CodeMeaning = frontal
        assert prepare(D.to_bytes(lateral), CONFIG).refusal is None, frontal
    film = D.dataset(s.values, bits_stored=12, window=(s.center, s.width), modality="RG")
    assert prepare(D.to_bytes(film), CONFIG).refusal is None


@pytest.mark.parametrize("implicit", [True, False])
def test_a_data_set_without_its_part10_header_is_named_as_such(implicit: bool) -> None:
    """It was "not a recognised image file" (a helper's find), which gives the sender no clue what to export."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    buffer = io.BytesIO()
    out = DicomFileLike(buffer)
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, D.dataset(xrays()[0].copy(), bits_stored=8))
    reason, message = _refusal(buffer.getvalue())
    assert reason == "not_an_image" and "a DICOM data set without its Part 10 header" in message, message
    reason, message = _refusal(b"\x08\x00\x05\x00" + bytes(100))  # a group-0008 tag and nothing a data set has
    assert message == "the file is not a recognised image file"


def test_pixels_that_are_not_square_are_previewed_as_a_viewer_shows_them() -> None:
    """Imager Pixel Spacing 0.2 x 0.1 mm (rows twice as far apart as columns): the preview (and heatmap) had the
    stored square shape, a field twice as tall drawn square (a helper's find). The model's grid is unchanged."""
    a, _ = xrays()
    square = prepare(D.part10(a.copy(), bits_stored=8), CONFIG, preview_side=512)
    tall = prepare(D.part10(a.copy(), bits_stored=8, spacing=(0.2, 0.1)), CONFIG, preview_side=512)
    height, width = a.shape
    assert square.preview.shape[0] / square.preview.shape[1] == pytest.approx(height / width, rel=0.02)
    assert tall.preview.shape[0] / tall.preview.shape[1] == pytest.approx(2 * height / width, rel=0.02)
    assert (tall.width, tall.height) == (width, height)  # the upload's own size is still what `image` reports
    assert np.array_equal(tall.pixels, square.pixels)


def test_malformed_files_are_rejected_with_their_reason_in_process() -> None:
    for name, (data, reason) in malformed_files().items():
        with pytest.raises(ImageRejected) as caught:
            prepare(data, CONFIG)
        assert caught.value.reason == reason, (name, caught.value.message)
        no_phi(caught.value.message, f"the {name} message")


# ------------------------------------------------------------------------------------------- live server, HTTP


def test_dicom_matches_the_png_of_the_same_pixels_over_http(server: ServerProcess) -> None:
    """Each DICOM file and its reference image in the same request: same answer within 1e-3."""
    for chunk in pairs_in_requests(equivalence_cases()):
        files = [(f"{c.name}.dcm", c.dicom) for c in chunk] + [(f"{c.name}.png", c.reference) for c in chunk]
        response = post(server, files)
        assert response.status_code == 200, response.text[:800]
        no_phi(response.text, "a /classify response")
        answers = response.json()
        for case, got, want in zip(chunk, answers[: len(chunk)], answers[len(chunk) :]):
            assert got["status"] == want["status"] == "ok", (case.name, got, want)
            assert abs(got["probability"] - want["probability"]) < TOLERANCE, (case.name, got, want)
            assert got["label"] == want["label"], case.name
            image = got["image"]
            assert image["format"] == "DICOM" and image["mode"] == case.mode, (case.name, image)
            assert image["dicom"]["voi"] == case.voi and image["dicom"]["bits_stored"] in (8, 12, 16), case.name
            assert want["image"]["dicom"] is None


def test_image_info_reports_the_dicom_tags(server: ServerProcess) -> None:
    a, _ = xrays()
    s = D.stored_values(a, 12, monochrome1=True)
    ds = D.dataset(s.values, bits_stored=12, photometric="MONOCHROME1", modality="CR", view="AP",
                   window=(s.center, s.width), syntax=D.SYNTAXES["jpeg-ls"])
    response = post(server, [("study.dcm", D.to_bytes(ds))])
    assert response.status_code == 200, response.text
    [answer] = response.json()
    assert answer["image"] == {
        "width": 224, "height": 224, "mode": "I;16", "format": "DICOM",
        "dicom": {
            "photometric_interpretation": "MONOCHROME1", "bits_allocated": 16, "bits_stored": 12,
            "transfer_syntax": "JPEG-LS Lossless Image Compression", "transfer_syntax_uid": "1.2.840.10008.1.2.4.80",
            "modality": "CR", "view_position": "AP", "body_part": "CHEST",
            "pixel_spacing_mm": [0.139, 0.139], "pixel_spacing_source": "ImagerPixelSpacing",
            "sop_instance_uid": str(ds.SOPInstanceUID), "study_instance_uid": str(ds.StudyInstanceUID),
            "voi": "window", "window_center": s.center, "window_width": s.width,
        },
    }
    assert answer["status"] == "ok" and answer["validity"] is not None


def test_inversion_matters(server: ServerProcess) -> None:
    """Control: MONOCHROME1 values labelled MONOCHROME2 are shown inverted, and do not pass for the X-ray."""
    a, _ = xrays()
    s = D.stored_values(a, 12, monochrome1=True)
    right = D.part10(s.values, bits_stored=12, photometric="MONOCHROME1", window=(s.center, s.width))
    wrong = D.part10(s.values, bits_stored=12, photometric="MONOCHROME2", window=(s.center, s.width))
    reference, good, bad = post(server, [("x.png", png(a)), ("right.dcm", right), ("wrong.dcm", wrong)]).json()
    assert abs(good["probability"] - reference["probability"]) < TOLERANCE
    assert bad["status"] == "refused" or abs(bad["probability"] - reference["probability"]) > 10 * TOLERANCE, bad


def test_wrong_objects_are_refused_per_image(server: ServerProcess) -> None:
    """CT, MR, US, lateral views, other body parts, multi-frame: each refused with its reason, the X-ray answered."""
    files = refused_files()
    response = post(server, [("x.png", png(xrays()[0]))] + [(f"{n}.dcm", d) for n, d in files.items()])
    assert response.status_code == 200, response.text
    good, *answers = response.json()
    assert good["status"] == "ok"
    for (name, (_, reason)), answer in zip(REFUSED.items(), answers):
        assert answer["status"] == "refused" and answer["refusal"]["reason"] == reason, (name, answer)
        assert answer["label"] is None and answer["probability"] is None and answer["validity"] is None
        assert answer["image"]["format"] == "DICOM" and answer["image"]["dicom"]["voi"] is None
    assert "'CT'" in answers[0]["refusal"]["message"] and "'LL'" in answers[4]["refusal"]["message"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    for reason in ("dicom_modality", "dicom_view", "dicom_body_part", "dicom_multiframe"):
        assert re.search(rf'pneumonia_rejected_inputs_total\{{reason="{reason}"\}} [1-9]', metrics), reason


def test_malformed_dicom_gets_a_400_with_its_reason(server: ServerProcess) -> None:
    for name, (data, reason) in malformed_files().items():
        response = post(server, [("x.png", png(xrays()[0])), (f"{name}.dcm", data)])
        assert response.status_code == 400, (name, response.status_code, response.text[:400])
        body = response.json()
        assert body["detail"][0]["type"] == reason and body["detail"][0]["loc"] == ["images", 1], (name, body)
        assert "Traceback" not in response.text
        no_phi(response.text, f"the 400 for {name}")
    [after] = post(server, [("x.png", png(xrays()[0]))]).json()  # the worker is unharmed
    assert after["status"] == "ok"


# ------------------------------------------------------------------------------------------- live server, gRPC


def test_dicom_over_grpc_matches_http_and_the_png(server: ServerProcess) -> None:
    wait_serving(server.grpc_target)
    cases = equivalence_cases()[::3] + equivalence_cases()[-4:]
    with connect(server.grpc_target, transport="grpc", timeout=120) as api, connect(server.url, timeout=120) as web:
        for chunk in pairs_in_requests(cases):
            uploads = [c.dicom for c in chunk] + [c.reference for c in chunk]
            over_grpc, over_http = api.classify(uploads), web.classify(uploads)
            for case, got, want, http in zip(chunk, over_grpc, over_grpc[len(chunk) :], over_http):
                assert got.status == "ok" and abs(got.probability - want.probability) < TOLERANCE, (case.name, got)
                assert abs(got.probability - http.probability) < 1e-5, case.name
                assert got.image == http.image and got.image.dicom is not None and got.image.dicom.voi == case.voi
        refused = api.classify(list(refused_files().values()))
        assert [p.refusal.reason for p in refused] == [reason for _, reason in REFUSED.values()]
        assert all(p.probability is None and p.label is None for p in refused)
        for name, (data, reason) in malformed_files().items():
            with pytest.raises(InvalidInput) as caught:
                api.classify([data])
            assert caught.value.reasons == (reason,) and caught.value.status == "INVALID_ARGUMENT", name
            no_phi(str(caught.value), f"the gRPC error for {name}")


def test_grpc_reason_trailer_for_bad_dicom(server: ServerProcess) -> None:
    from api._proto.pneumonia.v1 import classifier_pb2 as pb
    from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc

    data, _ = malformed_files()["no-pixel-data"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[pb.Image(data=data)]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(caught.value.trailing_metadata())
    assert trailers["pneumonia-reject-reasons"] == "dicom_no_pixel_data"
    no_phi(caught.value.details(), "the gRPC details")


# ------------------------------------------------------------------------------------------- patient data


def test_no_patient_data_leaves_the_server(server: ServerProcess) -> None:
    """Files whose patient tags hold markers (some invalid for their VR, which pydicom would warn about, quoting
    them): no marker in any answer, error, log line or metric, over HTTP and gRPC."""
    a, _ = xrays()
    s = D.stored_values(a, 12)
    ds = D.dataset(s.values, bits_stored=12, window=(s.center, s.width))
    ds.PatientName = f"{PHI_MARKER}^" + "Jane" * 30  # over the 64-character limit of a PN component
    ds.PatientBirthDate = "1923-04-05 " + PHI_MARKER  # not a DA value
    ds.OtherPatientIDs = PHI_MARKER
    good = D.to_bytes(ds)
    broken = [good[: len(good) - 5000], good[:700]]
    texts = [post(server, [("x.dcm", good)]).text]
    texts += [post(server, [("x.dcm", data)]).text for data in broken]
    texts += [post(server, [("ct.dcm", refused_files()["ct"])]).text]
    with connect(server.grpc_target, transport="grpc", timeout=60) as api:
        texts.append(repr([p.model_dump() for p in api.classify([good, refused_files()["lateral-ll"]])]))
        for data in broken:
            with pytest.raises(InvalidInput) as caught:
                api.classify([data])
            texts.append(str(caught.value))
    assert '"status":"ok"' in texts[0].replace(" ", "") and '"corrupt"' in texts[1]
    texts.append(httpx.get(server.url + "/metrics", timeout=10).text)
    texts.append(server.logs())
    for i, text in enumerate(texts):
        no_phi(text, f"output {i}")
    assert "pydicom" not in server.logs()


# ------------------------------------------------------------------------------------------- client, CLI, training


def test_cli_prints_the_dicom_image_info(server: ServerProcess, tmp_path: Path) -> None:
    a, _ = xrays()
    s = D.stored_values(a, 16, monochrome1=True)
    path = tmp_path / "study.dcm"
    path.write_bytes(D.part10(s.values, bits_stored=16, photometric="MONOCHROME1", window=(s.center, s.width),
                              syntax=D.SYNTAXES["jpeg2000"]))
    run = [sys.executable, "-m", "client"]
    helped = subprocess.run(run + ["classify", "--help"], capture_output=True, text=True, env=server_env(), timeout=60)
    assert "DICOM" in helped.stdout
    for where in (["--url", server.url], ["--grpc", "--url", server.grpc_target]):
        out = subprocess.run(run + ["classify", str(path), *where], capture_output=True, text=True, env=server_env(),
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "224x224 DICOM I;16" in out.stdout and "DICOM DX PA CHEST" in out.stdout, out.stdout
        assert "MONOCHROME1 16/16 bits" in out.stdout and "JPEG 2000" in out.stdout and "window 32768/65536" in out.stdout
        no_phi(out.stdout + out.stderr, "the CLI output")


def test_a_labelled_dicom_folder_trains_and_evaluates(production_tag: str, tmp_path: Path, capsys) -> None:
    """A site's DICOM folder: .dcm and extension-less Part 10 files load through the one path, patients come from
    Patient ID, a lateral view is listed as unusable, and training.evaluate runs on it."""
    from training.data import DataFolderError, load_samples, scan_split
    from training.evaluate import main as evaluate

    root = tmp_path / "site"
    grids = [np.asarray(Image.open(p).convert("L")) for p in sample_xrays(3, offset=20)]
    for i, gray in enumerate(grids):
        folder = root / "test" / ("NORMAL" if i < 3 else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        s = D.stored_values(gray, 12, monochrome1=bool(i % 2))
        data = D.part10(s.values, bits_stored=12, photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                        window=(s.center, s.width), patient=f"P{i // 2}")
        (folder / (f"IM{i:04d}" if i == 0 else f"{i}.dcm")).write_bytes(data)  # one as a PACS export names it
    (root / "test" / "NORMAL" / "DICOMDIR").write_bytes(D.part10(grids[0], bits_stored=8))  # an index, not an image
    samples = scan_split(root, "test")
    assert len(samples) == 6 and sum(not s.path.suffix for s in samples) == 1
    assert len({s.patient for s in samples}) == 4  # P0 (files 0, 1), P1 (2) | P1 (3), P2 (4, 5): class is in the key
    assert all("P0" not in s.patient and PHI_MARKER not in s.patient for s in samples)
    loaded = load_samples(samples, CONFIG, progress=False)
    assert loaded.pixels.shape == (6, 224, 224)
    lateral = root / "test" / "PNEUMONIA" / "9.dcm"
    lateral.write_bytes(D.part10(grids[0], bits_stored=8, view="LL"))
    with pytest.raises(DataFolderError, match="refused \\(dicom_view\\)"):
        load_samples(scan_split(root, "test"), CONFIG, progress=False)
    capsys.readouterr()
    assert evaluate(["--model", production_tag, "--data-dir", str(root), "--split", "test", "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert "on 6 images" in out and "refused (dicom_view)" in out
    no_phi(out, "the evaluation output")
