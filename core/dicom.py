"""DICOM Part 10 input: read a file from memory, gate it on its tags, window its pixels to 8 bits.

Only `core.preprocess.prepare` calls `read` (the one decode path): it hands the
8-bit image this module returns to the same grayscale/resize/normalise steps as
a PNG, so a DICOM file and a PNG of the same 8-bit pixels give the model the
same grid.

What is read, in order (each step refuses before the next one costs anything):

1. The file: a Part 10 file (128-byte preamble, `DICM`, File Meta Information).
   A file that starts with `DICM` (preamble left out by some writers) is read
   as if the preamble were there. A bare data set without File Meta is not
   recognised as DICOM (it has no transfer syntax to trust). Parsed with pydicom
   from memory, `force=False`; the byte limit was checked by the caller, and the
   deflated transfer syntax is refused before parsing (inflating is unbounded).
2. Structure: a Pixel Data element, its image attributes (Rows, Columns,
   Bits Allocated/Stored, Samples per Pixel, Photometric Interpretation), nothing
   truncated. Then Rows x Columns against the pixel limits, before any decoding.
3. The tag gate (a per-image refusal, nothing decoded): Modality CR, DX, DR or
   RG; Body Part Examined a chest term when present; View Position PA or AP when
   present (else a View Code Sequence naming a non-frontal view refuses); a
   single frame.
4. The transfer syntax has a decoder here (pydicom's own for uncompressed data
   and RLE, the pylibjpeg plugins for JPEG baseline/extended/lossless, JPEG-LS
   and JPEG 2000); a compressed frame states its size in a header read here that
   agrees with Rows x Columns, a JPEG one ends with its end marker (fail closed: a
   codestream cannot make the decoder allocate more than the limits allow, nor be
   padded silently when cut), and an 8-bit JPEG frame decodes strictly;
   uncompressed Pixel Data holds what Rows x Columns need.
5. Pixels, as a radiology viewer shows them: Modality LUT (Rescale Slope and
   Intercept, or a Modality LUT Sequence); then VOI: the VOI LUT Sequence if
   present, else Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID per
   VOI LUT Function), else the full range of the rescaled values (min to max) -
   except 8-bit data with neither, which are shown as stored, like an 8-bit
   PNG. Which of several windows (or LUTs) is `PreprocessConfig.dicom_window`
   (stored with the model: training and serving window alike; 0, the first, by
   default). Rounded to 8 bits, then inverted so bone is bright when the
   Photometric Interpretation is MONOCHROME1 or the Presentation LUT Shape
   (2050,0020) is INVERSE (DX requires INVERSE with MONOCHROME1: once, not twice).
   An image "FOR PROCESSING" (raw detector values, Presentation Intent Type) is
   answered with a warning: the model learnt from images processed for viewing.

Patient data: nothing read from the file is put into a message except
code-string tags (Modality, Body Part, View Position) that match the DICOM
code-string alphabet, and UIDs that match the UID syntax. pydicom's warnings
and log records, which can quote element values, are silenced here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pydicom.uid import UID

# pydicom is imported on the first DICOM file, not with this module: every serving process imports this module,
# and pydicom added about 0.2 s to `import service` (4.85 s -> 4.66 s, median of 3) in the server and each worker.
logging.getLogger("pydicom").propagate = False

PART10_MAGIC = b"DICM"
# computed / digital radiography, and film-screen radiography (RG: a digitised film); "DR" is a common non-standard DX
MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PIXEL_DATA = 0x7FE00010
_INTERRUPTS = (KeyboardInterrupt, SystemExit, GeneratorExit)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class DicomError(Exception):
    """A DICOM file that cannot be used; `reason` is one of core.preprocess.RejectReason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DicomInfo:
    """What a client may learn about a DICOM image: acquisition and encoding, never the patient."""

    photometric_interpretation: str
    bits_allocated: int
    bits_stored: int
    transfer_syntax: str  # its name, e.g. "JPEG-LS Lossless Image Compression"
    transfer_syntax_uid: str
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column)
    pixel_spacing_source: str | None = None  # "PixelSpacing" or "ImagerPixelSpacing" (at the detector)
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    voi: str | None = None  # "voi_lut", "window", "min_max", "identity"; None when not decoded (refused)
    window_center: float | None = None
    window_width: float | None = None


@dataclass(frozen=True)
class DicomImage:
    """The decoded image (8-bit 'L', or 'RGB' for colour objects), or the tag gate's refusal (image None)."""

    image: Image.Image | None
    width: int
    height: int
    mode: str
    info: DicomInfo
    refusal: tuple[str, str] | None = None
    warnings: tuple[str, ...] = ()


# Files that start like these are those images whatever byte 128 holds: a PNG text chunk or a JPEG comment with
# `DICM` there was sent to the DICOM reader and refused as a broken DICOM. (A TIFF header is a legal DICOM preamble:
# dual-format files exist, so TIFF is not among them.)
_OTHER_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: `DICM` after the 128-byte preamble, or at the start (preamble left out), and not a
    PNG, JPEG, GIF or BMP that holds those bytes by chance."""
    if data[:4] == PART10_MAGIC:
        return True
    return data[128:132] == PART10_MAGIC and not data.startswith(_OTHER_IMAGE_SIGNATURES)


def looks_like_bare_data_set(data: bytes) -> bool:
    """A DICOM data set written without its Part 10 header (old ACR-NEMA style, raw PACS exports): its first
    elements, little endian with implicit or explicit VR, start in group 0008 with tags in ascending order and
    lengths that fit. Not read as DICOM (no transfer syntax to trust); only named, so the sender knows what to
    export instead."""
    return any(_elements_walk(data, explicit) for explicit in (False, True))


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _elements_walk(data: bytes, explicit: bool, elements: int = 3) -> bool:
    offset, previous = 0, -1
    for _ in range(elements):
        if offset + 8 > len(data):
            return offset == len(data) and previous >= 0  # a short data set, read to its end
        group, element = struct.unpack_from("<HH", data, offset)
        tag = group << 16 | element
        if group < 0x0008 or tag <= previous or group & 1:  # private groups are odd: not where a data set starts
            return False
        if explicit:
            vr = data[offset + 4 : offset + 6]
            if not (vr.isalpha() and vr.isupper()):
                return False
            if vr in _LONG_VRS:
                if offset + 12 > len(data):
                    return False
                length, header = struct.unpack_from("<I", data, offset + 8)[0], 12
            else:
                length, header = struct.unpack_from("<H", data, offset + 6)[0], 8
        else:
            length, header = struct.unpack_from("<I", data, offset + 4)[0], 8
        if length == _UNDEFINED_LENGTH or offset + header + length > len(data):
            return False
        offset, previous = offset + header + length, tag
    return True


def read(data: bytes, *, max_pixels: int, min_side: int, window_index: int = 0) -> DicomImage:
    """One DICOM Part 10 file -> its 8-bit image and tags, or a refusal; raises `DicomError` for bad files."""
    if data[:4] == PART10_MAGIC:
        data = bytes(128) + data
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds, syntax = _parse(data)
        if any("End of file" in str(w.message) for w in caught):
            raise DicomError("corrupt", "the DICOM file is truncated: it ends inside a data element")
        _check_not_truncated(ds)
        width, height, info, mode = _describe(ds, syntax)
        _check_limits(width, height, max_pixels, min_side)
        refusal = _tag_gate(ds, info)
        if refusal is not None:
            return DicomImage(None, width, height, mode, info, refusal)
        _check_decodable(ds, syntax, info, width, height)
        if _code(ds, "PresentationIntentType") == "FOR PROCESSING":
            notes.append("the DICOM image is FOR PROCESSING (raw detector values, not processed for viewing); the "
                         "model learnt from images for presentation: send the FOR PRESENTATION image if there is one")
        image, info = _pixels(ds, info, (height, width), window_index, notes)
    return DicomImage(image, width, height, mode, info, None, tuple(notes))


def patient_key(data: bytes) -> str | None:
    """A one-way key of the file's Patient ID (sha256), for splitting a DICOM training folder by patient.

    None when the file is not DICOM or carries no Patient ID. The ID itself never leaves this function.
    """
    if not is_dicom(data):
        return None
    if data[:4] == PART10_MAGIC:
        data = bytes(128) + data
    from pydicom.filereader import dcmread

    _configure_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=[0x00100020])
            value = str(ds.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 - an unreadable file has no key; decoding it later reports why
        return None
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:24] if value else None


# ---------------------------------------------------------------------------------------------- parsing


@functools.cache
def _configure_pydicom() -> None:
    """pydicom validates values while reading and reports invalid ones (a patient name that is too long, a
    malformed date) in warnings and log records that quote the value: patient data in a server log. Values are
    not validated here (nothing of the patient module is read), and pydicom's log records go nowhere."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def _parse(data: bytes) -> tuple[Any, UID]:
    from pydicom.filereader import _read_file_meta_info, dcmread, read_preamble
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

    _configure_pydicom()
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        syntax = meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - pydicom raises many types on damaged headers
        raise DicomError("corrupt",
                         "the DICOM File Meta Information (group 0002) after the preamble is unreadable") from None
    if not syntax or not isinstance(syntax, str):
        raise DicomError(
            "corrupt",
            "the DICOM file has no Transfer Syntax UID in its File Meta Information: what follows the preamble "
            "is not a DICOM header",
        )
    syntax = UID(str(syntax).strip("\x00 "))
    if syntax == DeflatedExplicitVRLittleEndian:
        raise DicomError(
            "dicom_unsupported_syntax",
            "the transfer syntax Deflated Explicit VR Little Endian is not accepted (inflating it is unbounded); "
            "send the file uncompressed or with a JPEG, JPEG-LS, JPEG 2000 or RLE transfer syntax",
        )
    try:
        ds = dcmread(io.BytesIO(data), force=False)
    except Exception:  # noqa: BLE001 - ditto; the message of a parse error may quote the file's bytes
        raise DicomError("corrupt", "the DICOM data set is damaged: its elements could not be parsed") from None
    return ds, syntax


def _check_not_truncated(ds: Any) -> None:
    """A top-level element shorter than its stated length: the file was cut (pydicom reads what is there)."""
    from pydicom.dataelem import RawDataElement

    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement) and element.length != _UNDEFINED_LENGTH and element.value is not None:
            if len(element.value) < element.length:
                where = ("in its pixel data" if tag == _PIXEL_DATA
                         else f"in element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                raise DicomError("corrupt", f"the DICOM file is truncated {where}")


def _value(ds: Any, keyword: str, default: Any = None) -> Any:
    """A tag's value, or `default` when absent, empty or unreadable (never raises)."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - a damaged value reads as absent
        return default
    return default if value is None or value == "" else value


def _int(ds: Any, keyword: str, tag: str, required: bool = True, default: int | None = None) -> int | None:
    value = _value(ds, keyword)
    if value is None:
        if required:
            raise DicomError("corrupt", f"the DICOM image lacks {keyword} {tag}")
        return default
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return int(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise DicomError("corrupt", f"the DICOM image's {keyword} {tag} is not a number") from None


def _code(ds: Any, keyword: str) -> str | None:
    """A code-string tag, upper-cased and stripped, for the checks (a lower-case 'dx' is read as DX); None when
    absent or empty."""
    value = _sent(ds, keyword)
    return value.upper() if value else None


def _sent(ds: Any, keyword: str) -> str | None:
    """A code-string tag as sent, stripped; None when absent or empty. What a response may show of it is
    `_shown(_sent(...))`: upper-cased, a value such as 'Jane Doe' became a valid-looking 'JANE DOE'."""
    value = _value(ds, keyword)
    if value is None:
        return None
    if not isinstance(value, str):
        value = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return value.strip() or None


def _shown(value: str | None) -> str | None:
    """A code-string value as it may appear in a message or response: only the DICOM code-string alphabet."""
    if value is None:
        return None
    return value if _CODE_STRING.fullmatch(value) else "(invalid value)"


def _shown_tag(ds: Any, keyword: str, accepted: frozenset[str]) -> str | None:
    """A code-string tag as a response may show it: as sent when it is a code string; upper-cased when only its
    case is wrong and it is a value the gate accepts (a lower-case 'chest' passed the check and was then shown
    as '(invalid value)'); else '(invalid value)' (a 'Jane Doe' was shown as 'JANE DOE')."""
    sent = _sent(ds, keyword)
    checked = sent.upper() if sent else None  # `_code`'s value, without reading the tag again
    return checked if checked in accepted and not _CODE_STRING.fullmatch(sent or "") else _shown(sent)


def _uid(ds: Any, keyword: str) -> str | None:
    value = _value(ds, keyword)
    value = str(value).strip("\x00 ") if value is not None else ""
    return value if len(value) <= 64 and _UID.fullmatch(value) else None


def _spacing(ds: Any) -> tuple[tuple[float, float] | None, str | None]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _value(ds, keyword)
        try:
            row, col = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0:
            return (round(row, 6), round(col, 6)), keyword
    return None, None


def _describe(ds: Any, syntax: UID) -> tuple[int, int, DicomInfo, str]:
    """Structure check and the client-visible description: (width, height, info, PIL-like mode)."""
    if _PIXEL_DATA not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomError("unsupported_format", "the DICOM object holds float pixel data (a parametric map), "
                             "not a radiograph")
        if "Rows" in ds or "Columns" in ds:  # an image's header without its pixels: most often a file cut short
            raise DicomError("dicom_no_pixel_data",
                             "the DICOM file has an image's header but no Pixel Data (7FE0,0010): it was cut short "
                             "(an incomplete transfer or copy; send the whole file), or its pixels were stripped")
        raise DicomError("dicom_no_pixel_data",
                         "the DICOM file has no Pixel Data (7FE0,0010): it is not an image (a report, a "
                         "presentation state, or an image whose pixels were stripped)")
    rows = _int(ds, "Rows", "(0028,0010)")
    columns = _int(ds, "Columns", "(0028,0011)")
    allocated = _int(ds, "BitsAllocated", "(0028,0100)")
    stored = _int(ds, "BitsStored", "(0028,0101)", required=False, default=allocated)
    photometric = _code(ds, "PhotometricInterpretation")
    if photometric is None:
        raise DicomError("corrupt", "the DICOM image lacks PhotometricInterpretation (0028,0004)")
    spacing, source = _spacing(ds)
    shown_uid = str(syntax) if len(syntax) <= 64 and _UID.fullmatch(str(syntax)) else "(invalid UID)"
    info = DicomInfo(
        # as sent, or upper-cased when a supported one: checked upper-cased, 'Jane Doe' showed as 'JANE DOE'
        photometric_interpretation=_shown_tag(ds, "PhotometricInterpretation", MONOCHROME | COLOUR) or "",
        bits_allocated=allocated,  # type: ignore[arg-type]
        bits_stored=stored,  # type: ignore[arg-type]
        transfer_syntax=syntax.name if syntax.is_transfer_syntax else shown_uid,
        transfer_syntax_uid=shown_uid,
        modality=_shown_tag(ds, "Modality", MODALITIES),
        view_position=_shown_tag(ds, "ViewPosition", FRONTAL_VIEWS),
        body_part=_shown_tag(ds, "BodyPartExamined", CHEST_BODY_PARTS),
        pixel_spacing_mm=spacing,
        pixel_spacing_source=source,
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
    )
    signed = _int(ds, "PixelRepresentation", "(0028,0103)", required=False, default=0)
    samples = _int(ds, "SamplesPerPixel", "(0028,0002)", required=False, default=1)
    if samples == 3 or photometric in COLOUR:
        mode = "RGB"
    elif (allocated or 0) <= 8:
        mode = "L"
    else:
        mode = "I;16S" if signed else "I;16"
    return columns, rows, info, mode  # type: ignore[return-value]


def _check_limits(width: int, height: int, max_pixels: int, min_side: int) -> None:
    """The limits every upload has, from Rows and Columns, before any pixel is decoded."""
    if width * height > max_pixels:
        raise DicomError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels",
        )
    if min(width, height) < min_side:
        raise DicomError("too_small", f"the image is {width}x{height} pixels; both sides must be at least {min_side}")


def _tag_gate(ds: Any, info: DicomInfo) -> tuple[str, str] | None:
    """(reason, message) when the tags say this is not a single-frame frontal chest radiograph, else None."""
    # Checked upper-cased, shown as `info` holds them (as sent, or "(invalid value)")
    if _code(ds, "Modality") not in MODALITIES:
        said = f"Modality (0008,0060) is {info.modality!r}" if info.modality else "the file has no Modality (0008,0060)"
        return "dicom_modality", f"{said}; only chest radiographs (CR, DX, RG) are classified"
    body = _code(ds, "BodyPartExamined")
    if body is not None and body not in CHEST_BODY_PARTS:
        return "dicom_body_part", (f"BodyPartExamined (0018,0015) is {info.body_part!r}, not the chest; only chest "
                                   "radiographs are classified")
    view = _code(ds, "ViewPosition")
    if view is not None and view not in FRONTAL_VIEWS:
        return "dicom_view", (f"ViewPosition (0018,5101) is {info.view_position!r}: only frontal views (PA or AP) are "
                              "classified, not lateral, oblique or decubitus ones")
    if view is None and (coded := _coded_view(ds)) is not None:  # the view as a code, where ViewPosition is absent
        return "dicom_view", (f"the View Code Sequence (0054,0220) names {coded} view: only frontal views (PA or AP) "
                              "are classified, not lateral, oblique or decubitus ones")
    frames = _int(ds, "NumberOfFrames", "(0028,0008)", required=False, default=1)
    if frames is not None and frames > 1:
        return "dicom_multiframe", (f"the DICOM object has {frames} frames (a cine loop, a stack or a "
                                    "tomosynthesis series); send single-frame radiographs")
    return None


def _coded_view(ds: Any) -> str | None:
    """'a lateral', 'an oblique' or 'a decubitus' when the View Code Sequence's meaning names a view that is not
    frontal; None when frontal, absent or unreadable. Only the word is shown: the meaning is free text, and a
    'lateral view of Alice Leakcheck' was echoed (a helper's find)."""
    items = _multi(ds, "ViewCodeSequence")
    meaning = str(_value(items[0], "CodeMeaning", "") if items else "").upper()
    found = re.search(r"\b(LATERAL|OBLIQUE|DECUBITUS)\b", meaning)  # whole words: not "bilateral"
    if found is None:
        return None
    word = found.group(1).lower()
    return f"{'an' if word == 'oblique' else 'a'} {word}"


# ---------------------------------------------------------------------------------------------- decoding


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) stated by a JPEG 2000 codestream's SIZ segment; None if the frame does not start with one."""
    if frame[:4] != b"\xff\x4f\xff\x51":  # SOC, SIZ, then Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz
        return None
    try:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[8:24])
    except struct.error:
        return None
    return xsiz - xo, ysiz - yo


STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # JPEG's TEM, RST0-7, SOI: no length field


def _jpeg_header(frame: bytes) -> tuple[tuple[int, int] | None, int | None]:
    """A JPEG / JPEG-LS frame's (width, height) from its frame header (SOF), and where its first scan (SOS) starts;
    None for what is not found. Stray bytes between segments are skipped as libjpeg and CharLS skip them (and as
    the upload path does): refusing them refused frames that decode, and stopping at them let the decoders find a
    frame size this check never saw."""
    if frame[:2] != b"\xff\xd8":
        return None, None
    size, offset = None, 2
    try:
        while offset + 4 <= len(frame):
            if frame[offset] != 0xFF:
                offset = frame.find(b"\xff", offset)
                if offset < 0:
                    return size, None
                continue
            marker = frame[offset + 1]
            if marker == 0xFF:  # fill byte
                offset += 1
                continue
            if marker in STANDALONE_MARKERS or marker == 0x00:
                offset += 2
                continue
            if marker == 0xDA:
                return size, offset
            length = struct.unpack(">H", frame[offset + 2 : offset + 4])[0]
            # SOF0-SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) is JPEG-LS. The first one counts.
            if size is None and ((0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7):
                height, width = struct.unpack(">HH", frame[offset + 5 : offset + 9])
                size = (width, height)
            if length < 2:
                return size, None
            offset += 2 + length
    except struct.error:
        return size, None
    return size, None


def _check_decodable(ds: Any, syntax: UID, info: DicomInfo, width: int, height: int) -> None:
    from pydicom.encaps import generate_frames
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, RLELossless

    shown = info.transfer_syntax
    if not syntax.is_transfer_syntax:
        raise DicomError("dicom_unsupported_syntax", f"the transfer syntax {shown} is not one this service knows")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise DicomError(
            "dicom_unsupported_syntax",
            f"the transfer syntax {shown} ({info.transfer_syntax_uid}) cannot be decoded here; accepted: "
            "uncompressed, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE",
        )
    photometric = info.photometric_interpretation
    if photometric not in MONOCHROME | COLOUR:
        raise DicomError("unsupported_format", f"photometric interpretation {photometric} is not supported; "
                         "radiographs are MONOCHROME1 or MONOCHROME2")
    samples = _int(ds, "SamplesPerPixel", "(0028,0002)", required=False, default=1)
    if (photometric in MONOCHROME and samples != 1) or (photometric in COLOUR and samples != 3):
        raise DicomError("corrupt", f"SamplesPerPixel {samples} does not fit photometric interpretation {photometric}")
    allocated, stored = info.bits_allocated, info.bits_stored
    if photometric in COLOUR and allocated != 8:
        raise DicomError("unsupported_format", f"colour DICOM images ({photometric}) are accepted with 8 bits per "
                         f"sample only, not {allocated}; radiographs are MONOCHROME1 or MONOCHROME2")
    if allocated not in ((8, 16) if photometric in MONOCHROME else (8,)) or not 1 <= stored <= allocated:
        raise DicomError("unsupported_format", f"{stored} bits stored in {allocated} allocated is not supported "
                         "(radiographs: 8 to 16 bits in 8 or 16)")
    if syntax.is_encapsulated:
        try:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        except Exception:  # noqa: BLE001 - broken item tags or offsets
            raise DicomError("corrupt", f"the compressed ({shown}) pixel data items are damaged") from None
        if syntax != RLELossless:  # RLE states no size of its own: its decoder fills Rows x Columns
            _check_codestream(frame, shown, width, height)
        if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit) and allocated == 8:
            _check_jpeg_data(frame, shown)
    else:
        # YBR_FULL_422 shares each pair's chroma: two samples a pixel, not three (a review's find)
        per_pixel = 2 if photometric == "YBR_FULL_422" else samples
        needed = width * height * per_pixel * allocated // 8
        held = len(ds.PixelData)
        if held < needed:
            raise DicomError("corrupt", f"the DICOM pixel data holds {held:,} bytes, but {width}x{height} pixels of "
                             f"{allocated} bits need {needed:,}: the file is incomplete; export or send it again")


def _check_jpeg_data(frame: bytes, shown: str) -> None:
    """An 8-bit JPEG frame decoded once by libjpeg-turbo, strictly, at 1/8 scale (its entropy-coded data read whole,
    little else done): pydicom's decoders fill damaged data in without a word, and a frame with 2 KB zeroed was
    classified as if whole (a helper's find), where the same JPEG uploaded as a file was refused. JPEG-LS and
    lossless JPEG frames have no such strict decoder here: only a cut (the end marker) is caught for them."""
    import simplejpeg

    from core.preprocess import libjpeg_damage, without_header_junk

    try:
        simplejpeg.decode_jpeg(frame, strict=True, colorspace="GRAY", min_factor=8, min_width=1, min_height=1)
    except ValueError as exc:
        if "extraneous bytes" in str(exc) and (cleaned := without_header_junk(frame)) is not None:
            return _check_jpeg_data(cleaned, shown)  # stray bytes between header segments: no pixel depends on them
        if libjpeg_damage(str(exc)):
            raise DicomError("corrupt", f"the compressed ({shown}) pixel data is damaged ({exc}): part of the "
                             "picture would be noise; export or send the image again") from None


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _check_codestream(frame: bytes, shown: str, width: int, height: int) -> None:
    """A JPEG, JPEG-LS or JPEG 2000 frame must state its size in a header read here and agree with Rows x Columns,
    and a JPEG or JPEG-LS frame must end with its end marker (EOI), or it is refused before any decoder runs.

    Fail closed: the decoders read past what this check once stopped at (a stray byte after the start marker, a JP2
    file box around the codestream) and allocated the frame's own size, gigabytes from a 200 KB file; and they pad
    a frame cut short without a word, so a truncated NORMAL X-ray was answered PNEUMONIA 0.988 (a helper's finds)."""
    if frame.startswith(_JP2_SIGNATURE):
        raise DicomError("corrupt", f"the compressed ({shown}) frame is a JP2 file, not the bare JPEG 2000 "
                         "codestream DICOM requires (PS3.5 A.4.4); export the image again")
    jpeg = frame.startswith(b"\xff\xd8")
    size, scan = _jpeg_header(frame) if jpeg else (_j2k_size(frame), None)  # one walk of a JPEG header
    if size is None:
        raise DicomError("corrupt", f"the compressed ({shown}) frame has no frame header this service can read "
                         "(damaged, or not the format its transfer syntax names); export the image again")
    if size != (width, height):
        raise DicomError("corrupt", f"the compressed frame is {size[0]}x{size[1]} pixels but the DICOM header "
                         f"says {width}x{height}")
    # JPEG and JPEG-LS only: OpenJPEG refuses a cut JPEG 2000 codestream itself, and some writers leave its end out.
    # The end marker (EOI) anywhere after the first scan: entropy-coded data cannot hold FFD9 (a JPEG stuffs a zero
    # after FF; JPEG-LS a byte below 0x80), so bytes after it are padding or junk the decoders ignore.
    if jpeg and (scan is None or frame.find(b"\xff\xd9", scan) < 0):
        raise DicomError("corrupt", f"the compressed ({shown}) frame ends before its image data does (no end "
                         "marker): the file was cut short or damaged; export or send it again")


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _multi(ds: Any, keyword: str) -> list[Any]:
    value = _value(ds, keyword)
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _rescaled(arr: np.ndarray, ds: Any, notes: list[str]) -> tuple[np.ndarray, bool]:
    """Modality LUT: (values as float32, whether anything was applied)."""
    from pydicom.pixels import apply_modality_lut

    if _value(ds, "ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32), True
        except Exception:  # noqa: BLE001 - a damaged LUT: fall back to the stored values
            notes.append("the DICOM Modality LUT is unreadable; the stored values were used")
    slope = _float(_value(ds, "RescaleSlope", 1.0))
    intercept = _float(_value(ds, "RescaleIntercept", 0.0))
    if slope is None or intercept is None or slope == 0:
        notes.append("the DICOM Rescale Slope/Intercept are unreadable; the stored values were used")
        slope, intercept = 1.0, 0.0
    values = arr.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        values *= np.float32(slope)
        values += np.float32(intercept)
        return values, True
    return values, False


def _voi_lut(values: np.ndarray, ds: Any, item: Any) -> np.ndarray | None:
    """A VOI LUT Sequence item applied, scaled from the LUT's own output range to 0..255; None if unusable."""
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        entries, first = descriptor[0] or 65536, descriptor[1]
        element = item["LUTData"]
        raw = element.value
        if isinstance(raw, (bytes, bytearray)):
            little = ds.original_encoding[1] is not False
            dtype = np.dtype("<u2" if little else ">u2") if len(raw) >= 2 * entries else np.uint8
            lut = np.frombuffer(raw, dtype=dtype)[:entries].astype(np.float32)
        else:
            lut = np.asarray(list(raw) if hasattr(raw, "__iter__") else [raw], dtype=np.float32)[:entries]
    except Exception:  # noqa: BLE001 - a damaged LUT is skipped
        return None
    if lut.size < 2:
        return None
    if _int(ds, "PixelRepresentation", "(0028,0103)", required=False, default=0) and first >= 32768:
        first -= 65536  # the first mapped value of a signed image, stored as US
    low, high = float(lut.min()), float(lut.max())
    if not high > low:
        return None
    index = np.rint(values) - np.float32(first)
    np.clip(index, 0, lut.size - 1, out=index)
    out = lut[index.astype(np.intp)]
    out -= np.float32(low)
    out *= np.float32(255.0 / (high - low))
    return out


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """Window Center/Width to 0..255 (PS3.3 C.11.2.1.2 and C.11.2.1.3); None for an invalid width."""
    out = values.astype(np.float32, copy=True)
    if function == "SIGMOID":
        if width <= 0:
            return None
        out -= np.float32(center)
        out *= np.float32(-4.0 / width)
        np.clip(out, -80, 80, out=out)
        np.exp(out, out=out)
        out += 1
        np.divide(np.float32(255.0), out, out=out)
        return out
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        out -= np.float32(center)
        out *= np.float32(255.0 / width)
        out += np.float32(127.5)
    else:  # LINEAR
        if width < 1:
            return None
        if width == 1:  # a threshold at center - 0.5
            return np.where(values > center - 0.5, np.float32(255), np.float32(0))
        out -= np.float32(center - 0.5)
        out *= np.float32(255.0 / (width - 1))
        out += np.float32(127.5)
    np.clip(out, 0, 255, out=out)
    return out


def _pixels(ds: Any, info: DicomInfo, shape: tuple[int, int], window_index: int,
            notes: list[str]) -> tuple[Image.Image, DicomInfo]:
    """Decode the (single) frame and turn it into the 8-bit image the resize step takes."""
    # RLE through pydicom's own decoder: pylibjpeg-rle is 7x faster but panics (Rust) on damaged segments, and its
    # panic hook writes a stack trace to stderr for every such upload; pydicom's raises ordinary exceptions and
    # takes about 0.3 s for a 5-megapixel 12-bit radiograph.
    from pydicom.pixels import pixel_array
    from pydicom.uid import RLELossless

    plugin = "pydicom" if ds.file_meta.TransferSyntaxUID == RLELossless else ""
    try:
        arr = pixel_array(ds, index=0, decoding_plugin=plugin)
    except _INTERRUPTS:
        raise
    except BaseException as exc:  # noqa: BLE001 - the decoders raise many types on damaged data; pylibjpeg-rle's
        # Rust panics arrive as pyo3's PanicException, a BaseException
        raise DicomError("corrupt", f"the DICOM pixel data ({info.transfer_syntax}) could not be decoded "
                         f"({type(exc).__name__})") from None
    if arr.shape[:2] != shape:
        raise DicomError("corrupt", f"the decoded pixel data is {arr.shape[1]}x{arr.shape[0]}, not the "
                         "size the DICOM header states")
    if info.photometric_interpretation in COLOUR:  # pydicom returns RGB; the shared path makes it grayscale
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="RGB"), _with(info, voi="identity")
    values, rescaled = _rescaled(arr, ds, notes)
    signed = bool(_int(ds, "PixelRepresentation", "(0028,0103)", required=False, default=0))
    display: np.ndarray | None = None
    voi, center, width = "", None, None
    luts = _multi(ds, "VOILUTSequence")
    if luts:
        index = _choose(window_index, len(luts), "VOI LUT", notes)
        display = _voi_lut(values, ds, luts[index])
        if display is None:
            notes.append("the DICOM VOI LUT is unusable; the window or full range was used instead")
        else:
            voi = "voi_lut"
    centers, widths = _multi(ds, "WindowCenter"), _multi(ds, "WindowWidth")
    if display is None and centers and widths:
        index = _choose(window_index, min(len(centers), len(widths)), "window", notes)
        center, width = _float(centers[index]), _float(widths[index])
        sent = _sent(ds, "VOILUTFunction")  # read once: checked upper-cased, shown as sent ('Jane Doe' not 'JANE DOE')
        function = (sent or "LINEAR").upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            notes.append(f"unknown VOI LUT Function {_shown(sent)}; LINEAR was used")
            function = "LINEAR"
        if center is not None and width is not None:
            display = _window(values, center, width, function)
        if display is None:
            notes.append("the DICOM window centre/width is invalid; the full range was used instead")
            center = width = None
        else:
            voi = "window"
    if display is None:
        if info.bits_stored <= 8 and not rescaled and not signed:
            voi, display = "identity", values
        else:
            voi = "min_max"
            low, high = float(values.min()), float(values.max())
            display = values - np.float32(low)
            display *= np.float32(255.0 / (high - low) if high > low else 0.0)
    np.rint(display, out=display)
    np.clip(display, 0, 255, out=display)
    grid = display.astype(np.uint8)
    if info.photometric_interpretation == "MONOCHROME1" or _code(ds, "PresentationLUTShape") == "INVERSE":
        np.subtract(255, grid, out=grid)  # low values are shown white: invert so bone is bright
    return Image.fromarray(grid, mode="L"), _with(info, voi=voi, window_center=center, window_width=width)


def _choose(index: int, available: int, what: str, notes: list[str]) -> int:
    if index < available:
        return index
    notes.append(f"the model asks for DICOM {what} {index + 1} but the file has {available}; the first was used")
    return 0


def _with(info: DicomInfo, **changes: Any) -> DicomInfo:
    return replace(info, **changes)
