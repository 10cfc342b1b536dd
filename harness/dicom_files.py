"""DICOM Part 10 files built from pixel arrays, for the tests, the hostile-input matrix and the decoder fuzzing.

Nothing is committed: each file is made from a real X-ray (or a synthetic grid) at
run time with pydicom, with proper File Meta Information. Compressed syntaxes:
RLE and JPEG 2000 through pydicom's own encoders (pylibjpeg-rle, pylibjpeg-openjpeg);
JPEG baseline through Pillow; JPEG lossless (process 14, first-order prediction) and
JPEG-LS through imagecodecs (a dev dependency), encapsulated with pydicom.

`stored_values` turns an 8-bit grid into stored values at 8, 12 or 16 bits together
with the window that maps them back onto exactly the same 8-bit grid, so a test can
compare the classification of a DICOM file with that of a PNG of the same pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
STORAGE = {"CR": CR_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE, "DR": DX_IMAGE_STORAGE, "CT": CT_IMAGE_STORAGE,
           "MR": MR_IMAGE_STORAGE, "US": US_IMAGE_STORAGE}
SYNTAXES = {
    "native": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
}
PHI_MARKER = "ZQXPHIMARKER"  # a string that appears nowhere else: patient tags of test files carry it


@dataclass(frozen=True)
class Stored:
    """Stored values and the window (centre, width) under which they display as the 8-bit grid they came from."""

    values: np.ndarray
    bits: int
    signed: bool
    center: float
    width: float


def stored_values(gray: np.ndarray, bits: int, *, signed: bool = False, monochrome1: bool = False) -> Stored:
    """An 8-bit grid as `bits`-bit stored values v = a*x + b; the LINEAR window (c, w) maps v back onto x exactly.

    With w = 255*a + 1 and c = b + 0.5 + 127.5*a, the DICOM linear window
    ((v - (c - 0.5)) / (w - 1) + 0.5) * 255 equals x. MONOCHROME1 stores 255 - x.
    """
    x = gray.astype(np.int64)
    if monochrome1:
        x = 255 - x
    a = {8: 1, 12: 16, 16: 257}[bits]
    b = -(2 ** (bits - 1)) if signed else 0
    values = a * x + b
    dtype = (np.int8 if signed else np.uint8) if bits == 8 else (np.int16 if signed else np.uint16)
    return Stored(values.astype(dtype), bits, signed, center=b + 0.5 + 127.5 * a, width=255 * a + 1)


def dataset(
    values: np.ndarray,
    *,
    bits_stored: int,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    syntax: UID = ExplicitVRLittleEndian,
    window: tuple[float, float] | list[tuple[float, float]] | None = None,
    voi_lut: tuple[int, int, np.ndarray] | None = None,
    rescale: tuple[float, float] | None = None,
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    frames: int = 1,
    patient: str = PHI_MARKER,
    spacing: tuple[float, float] | None = (0.139, 0.139),
    voi_function: str | None = None,
) -> Dataset:
    """A single-frame (or `frames`-frame, repeated) image data set with file meta; pixels native until `encode`."""
    ds = Dataset()
    meta = FileMetaDataset()
    sop_class = STORAGE.get(modality, DX_IMAGE_STORAGE)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(prefix="1.2.826.0.1.3680043.10.1081.")
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    # Patient data that must never leave the server: a marker in every patient and institution tag.
    ds.PatientName = f"{patient}^Jane^Q"
    ds.PatientID = f"{patient}-ID-0042"
    ds.PatientBirthDate = "19230405"
    ds.PatientSex = "F"
    ds.AccessionNumber = f"{patient[:8]}A1"
    ds.InstitutionName = f"{patient} General Hospital"
    ds.ReferringPhysicianName = f"{patient}^Doctor"
    ds.StudyDescription = f"chest for {patient}"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    if spacing is not None:
        ds.ImagerPixelSpacing = list(spacing)
    rows, columns = values.shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        pairs = window if isinstance(window, list) else [window]
        ds.WindowCenter = [_ds(c) for c, _ in pairs] if len(pairs) > 1 else _ds(pairs[0][0])
        ds.WindowWidth = [_ds(w) for _, w in pairs] if len(pairs) > 1 else _ds(pairs[0][1])
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first, lut_bits, table = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(table) if len(table) < 65536 else 0, first, lut_bits]
        item.LUTData = [int(v) for v in table]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = Sequence([item])
    if frames > 1:
        ds.NumberOfFrames = frames
        values = np.stack([values] * frames)
    ds.PixelData = np.ascontiguousarray(values).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    return encode(ds, values, syntax)


def _ds(value: float) -> str:
    return f"{value:.6g}"


def encode(ds: Dataset, values: np.ndarray, syntax: UID) -> Dataset:
    """The data set's pixel data in `syntax` (lossless, except JPEG baseline's usual quality-95 loss)."""
    if syntax == ExplicitVRLittleEndian:
        return ds
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax, values, encoding_plugin="pylibjpeg" if syntax == RLELossless else "")
        return ds
    frames = values if values.ndim == 3 else values[None]
    if syntax == JPEGBaseline8Bit:
        streams = [_pil_jpeg(frame) for frame in frames]
    else:
        import imagecodecs

        bits = int(ds.BitsStored)
        if syntax == JPEGLosslessSV1:
            streams = [imagecodecs.jpeg8_encode(_unsigned(f, ds), lossless=True, predictor=1,
                                                bitspersample=max(bits, 2)) for f in frames]
        elif syntax == JPEGLSLossless:
            streams = [imagecodecs.jpegls_encode(_unsigned(f, ds)) for f in frames]
        else:
            raise ValueError(f"no encoder for {syntax.name}")
    ds.PixelData = encapsulate(streams)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == JPEGBaseline8Bit:
        ds.LossyImageCompression = "01"
    return ds


def _unsigned(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Signed stored values as the encoders take them: the same bits, unsigned (DICOM's rule for JPEG)."""
    if frame.dtype.kind == "i":
        return (frame.astype(np.int64) & ((1 << int(ds.BitsStored)) - 1)).astype(np.uint16)
    return frame


def _pil_jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def to_bytes(ds: Dataset, *, preamble: bool = True) -> bytes:
    """The Part 10 file: 128-byte preamble, DICM, File Meta Information, data set."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[128:]


def part10(values: np.ndarray, **kwargs: object) -> bytes:
    """`dataset(...)` as file bytes."""
    return to_bytes(dataset(values, **kwargs))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.dicom_files xray.jpeg study.dcm`: a DICOM test file from any image (dev only)."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a DICOM Part 10 file (DX, PA, chest) of an image's "
                                     "grey levels, with the window that shows them as they are.")
    parser.add_argument("image", help="any image Pillow reads")
    parser.add_argument("out", help="the .dcm file to write")
    parser.add_argument("--bits", type=int, choices=(8, 12, 16), default=12)
    parser.add_argument("--syntax", choices=sorted(SYNTAXES), default="native")
    parser.add_argument("--monochrome1", action="store_true", help="store inverted (MONOCHROME1)")
    parser.add_argument("--modality", default="DX")
    parser.add_argument("--view", default="PA")
    args = parser.parse_args(argv)
    if args.syntax == "jpeg-baseline" and args.bits != 8:  # else a 16-bit header around an 8-bit codestream
        parser.error("--syntax jpeg-baseline holds 8-bit pixels only: add --bits 8")
    with Image.open(args.image) as image:
        gray = np.asarray(image.convert("L"))
    stored = stored_values(gray, args.bits, monochrome1=args.monochrome1)
    data = part10(stored.values, bits_stored=args.bits, photometric="MONOCHROME1" if args.monochrome1 else "MONOCHROME2",
                  window=(stored.center, stored.width), syntax=SYNTAXES[args.syntax], modality=args.modality,
                  view=args.view, patient="TEST")
    with open(args.out, "wb") as handle:
        handle.write(data)
    print(f"wrote {args.out}: {gray.shape[1]}x{gray.shape[0]}, {args.bits}-bit, {SYNTAXES[args.syntax].name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
