"""The shared preprocessing path: shapes, ranges, odd inputs, limits, and one path for every flow."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.images import encode, gradient, png_bomb
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import HANG_S
from training.data import Sample, load_samples
from core.preprocess import ImageRejected, InputLimits, PreprocessConfig, load_file, prepare, to_tensor

CONFIG = PreprocessConfig()


def test_real_xray_becomes_a_normalised_grid() -> None:
    path = sample_xrays(1)[0]
    prepared = load_file(path, CONFIG)
    assert prepared.pixels.shape == (224, 224) and prepared.pixels.dtype == np.uint8
    assert (prepared.width, prepared.height, prepared.format) == (224, 224, "JPEG")
    tensor = to_tensor(prepared.pixels, CONFIG)
    assert tensor.shape == (1, 1, 224, 224) and tensor.dtype == torch.float32
    assert abs(float(tensor.mean())) < 1e-4 and abs(float(tensor.std()) - 1) < 1e-3
    fixed = to_tensor(prepared.pixels, PreprocessConfig(normalization="fixed", mean=0.5, std=0.25))
    assert torch.allclose(fixed, (torch.from_numpy(prepared.pixels).float() / 255 - 0.5) / 0.25)


def test_equalize_ignores_monotonic_grey_level_changes_that_per_image_scaling_does_not() -> None:
    """Gamma and a tighter window are monotonic maps: equalised inputs barely move, per-image ones do."""
    pixels = load_file(sample_xrays(1)[0], CONFIG).pixels
    x = torch.from_numpy(pixels).float().div(255)
    changed = torch.stack([x.pow(1.8), ((x - 0.2) / 0.6).clamp(0, 1)])  # darker midtones; a window
    equalize = PreprocessConfig(normalization="equalize")
    base = to_tensor(x, equalize)
    assert abs(float(base.mean())) < 0.02 and abs(float(base.std()) - 1) < 0.02
    for variant in to_tensor(changed, equalize):
        # only pixels merged into one grey level by 8-bit rounding or the window's clipping can move
        assert float((variant - base[0]).abs().median()) < 0.02
    moved = (to_tensor(changed, CONFIG) - to_tensor(x, CONFIG)).abs().flatten(1).median(1).values
    assert bool((moved > 0.1).all())
    assert torch.equal(to_tensor(pixels, equalize), base)  # uint8 and [0, 1] floats agree


def test_uint8_grids_normalise_like_float_grids() -> None:
    """Serving feeds uint8 grids (a numpy route of their own), training feeds augmented floats: the same numbers,
    within float32 rounding of a float64 reference, for real X-rays, a low-contrast one and a flat one."""
    xrays = np.stack([load_file(p, CONFIG).pixels for p in sample_xrays(1)])  # one per class
    low_contrast = (xrays[0] // 32 + 100).astype(np.uint8)
    grids = np.concatenate([xrays, low_contrast[None], np.full((1, 224, 224), 77, np.uint8)])
    from_uint8 = to_tensor(grids, CONFIG)
    from_float = to_tensor(torch.from_numpy(grids).float() / 255, CONFIG)
    flat64 = grids.reshape(len(grids), -1).astype(np.float64) / 255
    reference = (flat64 - flat64.mean(1, keepdims=True)) / np.maximum(flat64.std(1, ddof=1, keepdims=True), 1e-3)
    assert from_uint8.shape == from_float.shape == (4, 1, 224, 224) and from_uint8.dtype == torch.float32
    assert np.abs(from_uint8.numpy().reshape(len(grids), -1) - reference).max() < 1e-5
    assert float((from_uint8[:-1] - from_float[:-1]).abs().max()) < 1e-5
    # flat: no division by a zero spread; the exact integer mean leaves 0, the float path's rounding 3e-5
    assert float(from_uint8[-1].abs().max()) == 0.0 and float(from_float[-1].abs().max()) < 1e-4
    assert torch.equal(to_tensor(grids[0], CONFIG), from_uint8[:1])  # one grid, batch of one
    assert torch.equal(to_tensor(torch.from_numpy(grids), CONFIG), from_uint8)  # torch uint8 takes the same route


def test_training_and_serving_paths_give_identical_tensors() -> None:
    paths = sample_xrays(3)
    training = load_samples([Sample(p, 0, p.stem) for p in paths], CONFIG, progress=False)
    serving = np.stack([prepare(p.read_bytes(), CONFIG).pixels for p in paths])
    assert torch.equal(to_tensor(training.pixels, CONFIG), to_tensor(serving, CONFIG))


@pytest.mark.parametrize(
    "name,data",
    [
        ("16-bit grayscale PNG", encode(Image.fromarray((np.arange(300 * 260).reshape(260, 300) % 65535).astype(np.uint16)), "PNG")),
        ("RGBA PNG", encode(gradient(mode="RGBA"), "PNG")),
        ("palette PNG", encode(gradient(mode="P"), "PNG")),
        ("LA PNG", encode(gradient(mode="LA"), "PNG")),
        ("CMYK JPEG", encode(gradient(mode="CMYK"), "JPEG")),
        ("RGB JPEG", encode(gradient(mode="RGB"), "JPEG")),
        ("TIFF", encode(gradient(), "TIFF")),
        ("BMP", encode(gradient(), "BMP")),
        ("WebP", encode(gradient(mode="RGB"), "WEBP")),
    ],
)
def test_odd_but_valid_inputs_are_accepted(name: str, data: bytes) -> None:
    prepared = prepare(data, CONFIG)
    assert prepared.pixels.shape == (224, 224) and prepared.pixels.dtype == np.uint8
    assert prepared.pixels.std() > 5, f"{name} lost its content"


def test_sixteen_bit_keeps_its_dynamic_range() -> None:
    ramp = np.tile(np.linspace(1000, 3000, 300, dtype=np.uint16), (260, 1))
    pixels = prepare(encode(Image.fromarray(ramp), "PNG"), CONFIG).pixels
    assert pixels.min() <= 2 and pixels.max() >= 253


def test_exif_orientation_is_honoured() -> None:
    upright = gradient((320, 240))
    rotated = upright.rotate(90, expand=True)  # stored sideways (PIL rotates counter-clockwise) ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag saying "rotate 90 degrees clockwise to display"
    a = prepare(encode(upright, "PNG"), CONFIG).pixels.astype(int)
    turned = prepare(encode(rotated, "PNG", exif=exif), CONFIG)
    b = turned.pixels.astype(int)
    assert np.abs(a - b).mean() < 2.0
    assert (turned.width, turned.height) == (320, 240)  # the upright size, as the heatmap's (was 240x320)
    for fmt in ("TIFF", "WEBP", "JPEG"):  # PIL reports a TIFF's upright size already: it was swapped back (a helper)
        other = prepare(encode(rotated, fmt, exif=exif), CONFIG)
        assert (other.width, other.height) == (320, 240), fmt
        assert np.abs(a - other.pixels.astype(int)).mean() < 4.0, fmt
    assert np.abs(a - prepare(encode(rotated, "PNG"), CONFIG).pixels.astype(int)).mean() > 20


def test_large_jpeg_draft_decoding_matches_full_decoding() -> None:
    original = Image.open(sample_xrays(1, offset=5)[-1]).convert("L")
    big = original.resize((2000, 2000), Image.Resampling.BICUBIC)
    fast = prepare(encode(big, "JPEG", quality=92), CONFIG)
    full = np.asarray(big.resize((224, 224), Image.Resampling.BILINEAR, reducing_gap=None), dtype=int)
    assert (fast.width, fast.height) == (2000, 2000)
    assert np.abs(fast.pixels.astype(int) - full).mean() < 3.0


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not_an_image"),
        (b"<html><body>x.jpeg</body></html>", "not_an_image"),
        (encode(gradient((16, 16)), "PNG"), "too_small"),
        (encode(gradient((1, 1)), "PNG"), "too_small"),
    ],
)
def test_unusable_inputs_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as info:
        prepare(data, CONFIG)
    assert info.value.reason == reason and info.value.message


def test_the_smallest_accepted_side_is_64_px() -> None:
    """`training.stress --served-side` measured the shipped model's verdicts failing below 64 px (specificity 0.52
    at 32 px with the gate's refusals counted as answers): a thumbnail is refused, not answered."""
    with pytest.raises(ImageRejected) as info:
        prepare(encode(gradient((400, 63)), "PNG"), CONFIG)
    assert info.value.reason == "too_small" and "at least 64" in info.value.message
    assert prepare(encode(gradient((400, 64)), "PNG"), CONFIG).width == 400


def test_truncated_jpeg_is_corrupt() -> None:
    data = sample_xrays(1)[0].read_bytes()
    with pytest.raises(ImageRejected) as info:
        prepare(data[: len(data) // 2], CONFIG)
    assert info.value.reason == "corrupt"


def test_a_jpeg_with_damaged_data_is_corrupt_and_stray_bytes_are_not() -> None:
    """PIL decoded a JPEG with 2 KB of its compressed data zeroed without a word (the picture is noise from
    there on); libjpeg's strict decode refuses it. Bytes between the data and the end marker, which some
    writers leave, change no pixel and are accepted."""
    from tests.hostile_matrix import jpeg_with_damaged_data, xray_jpeg

    Image.open(io.BytesIO(jpeg_with_damaged_data())).load()  # PIL alone accepts it
    with pytest.raises(ImageRejected) as info:
        prepare(jpeg_with_damaged_data(), CONFIG)
    assert info.value.reason == "corrupt" and "premature end of data segment" in info.value.message
    intact = xray_jpeg()
    stray = intact[:-2] + b"\x12\x34\x56" + intact[-2:]  # libjpeg: "2 extraneous bytes before marker 0xd9"
    assert np.array_equal(prepare(stray, CONFIG).pixels, prepare(intact, CONFIG).pixels)
    # Progressive and restart-marker files report damage as "extraneous bytes" before a later marker: the first
    # version of this check let that through (a review found 61 % of such a grid off by over 40 grey levels).
    picture = Image.open(io.BytesIO(intact))
    for options in ({"progressive": True}, {"restart_marker_blocks": 4}):
        damaged = bytearray(encode(picture.resize((1600, 1600)), "JPEG", quality=95, **options))
        damaged[len(damaged) // 2 : len(damaged) // 2 + 256] = bytes(256)
        with pytest.raises(ImageRejected, match="the JPEG data is damaged"):
            prepare(bytes(damaged), CONFIG)


def test_stray_bytes_pass_only_where_no_pixel_depends_on_them(data_dir: Path) -> None:
    """A review found both sides of "extraneous bytes": bytes between header segments (some writers pad EXIF so)
    were refused though no pixel depends on them; 8 bytes before the end marker, left by damaged data that lost
    its sync (a quarter of the grid wrong), were let through."""
    picture = Image.open(sorted((data_dir / "train" / "NORMAL").glob("*.jpeg"))[0]).convert("L").resize((1600, 1600))
    exif = Image.Exif()
    exif[0x0112] = 1
    clean = encode(picture, "JPEG", quality=95, exif=exif.tobytes())
    dqt, sos = clean.index(b"\xff\xdb"), clean.index(b"\xff\xda")
    for padded in (clean[:dqt] + b"\x00" + clean[dqt:], clean[:sos] + b"\x12\x34" + clean[sos:]):
        assert np.array_equal(prepare(padded, CONFIG).pixels, prepare(clean, CONFIG).pixels)
    damaged = bytearray(encode(picture, "JPEG", quality=95))
    damaged[175891:175895] = bytes.fromhex("b638a3c7")  # libjpeg: "8 extraneous bytes before marker 0xd9"
    with pytest.raises(ImageRejected, match="8 extraneous bytes before marker 0xd9"):
        prepare(bytes(damaged), CONFIG)


def test_jpeg_pixels_are_pils_own_at_every_draft_scale() -> None:
    """JPEGs are decoded by libjpeg-turbo through simplejpeg (strict) at the scale PIL's draft mode picks: the grid
    and the preview must stay PIL's, bit for bit, or served inputs drift from what the model was trained on."""
    import core.preprocess as preprocess

    picture = Image.open(sample_xrays(1)[0]).convert("L")
    variants = [(picture.resize(size).convert(mode), options) for size in ((64, 72), (224, 224), (450, 300), (999, 1201), (2000, 1800))
                for mode in ("L", "RGB") for options in ({}, {"progressive": True}, {"subsampling": 2, "quality": 70},
                                                          {"restart_marker_blocks": 4})]
    pil_only = lambda *args: None  # noqa: E731 - the PIL decode, as before simplejpeg
    for image, options in variants:
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated: turned upright either way
        data = encode(image, "JPEG", exif=exif.tobytes(), **options)
        ours = prepare(data, CONFIG, preview_side=512)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(preprocess, "_decode_jpeg", pil_only)
            pils = prepare(data, CONFIG, preview_side=512)
        assert np.array_equal(ours.pixels, pils.pixels) and np.array_equal(ours.preview, pils.preview), (image, options)


def test_a_large_jpeg_s_preview_is_as_sharp_as_the_same_pixels_sent_as_png() -> None:
    """Found by a helper: /explain's 512 px picture of a 2048x2560 JPEG was enlarged from the decode scaled for the
    model's 224 px grid (1/8), and a burned-in marker was barely legible (36.7 dB against the PNG's picture here;
    46.0 with the preview decoded at its own scale). The model's pixels are the same with or without a preview."""
    from PIL import ImageDraw

    picture = Image.open(sample_xrays(1, offset=3)[0]).convert("L").resize((2048, 2560))
    draw = ImageDraw.Draw(picture)
    for y in range(100, 2500, 300):
        draw.text((100, y), "L R PORTABLE AP 0123456789", fill=255, font_size=40)
    jpeg, png = encode(picture, "JPEG", quality=95), encode(picture, "PNG")
    shown, reference = prepare(jpeg, CONFIG, preview_side=512), prepare(png, CONFIG, preview_side=512)
    assert shown.preview.shape == reference.preview.shape == (512, 410)
    error = np.mean((shown.preview.astype(float) - reference.preview.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / error) > 42
    assert np.array_equal(shown.pixels, prepare(jpeg, CONFIG).pixels)


def test_a_16_bit_image_whose_range_a_few_bright_pixels_set_gets_a_warning() -> None:
    """12-bit data in a 16-bit PNG with a burned-in label at 65535: scaled min to max, the anatomy fell into 12
    grey levels and the gate refused it as 'not a chest X-ray' with nothing saying why. The same data without the
    label: no warning."""
    from tests.hostile_matrix import xray

    twelve_bit = np.asarray(xray(), dtype=np.uint16) * 16
    labelled = twelve_bit.copy()
    labelled[10:20, 10:20] = 65535
    plain, marked = (prepare(encode(Image.fromarray(a), "PNG"), CONFIG) for a in (twelve_bit, labelled))
    assert plain.mode == marked.mode == "I;16" and plain.warnings == ()
    assert any("a few extreme pixels" in w for w in marked.warnings), marked.warnings


PEAK_MEMORY = """
import resource, sys
from core.preprocess import ImageRejected, PreprocessConfig, prepare
small, bomb = sys.argv[1], sys.argv[2]
prepare(open(small, "rb").read(), PreprocessConfig())  # decoders and buffers in place before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident KiB so far
try:
    prepare(open(bomb, "rb").read(), PreprocessConfig())
    print("accepted", 0)
except ImageRejected as exc:
    print(exc.reason, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_pixel_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    """Refused from the header: in a fresh process, refusing the 900-megapixel bomb raises the peak memory by
    far less than its decoded pixels (900 MB) would; a time limit would say the same less reliably."""
    bomb = png_bomb(30000)
    assert len(bomb) < 200_000
    with pytest.raises(ImageRejected) as info:
        prepare(bomb, CONFIG)
    assert info.value.reason == "too_many_pixels" and "900,000,000" in info.value.message
    (tmp_path / "bomb.png").write_bytes(bomb)
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(sample_xrays(1)[0]), str(tmp_path / "bomb.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-3000:]
    reason, grown_kib = run.stdout.split()
    assert reason == "too_many_pixels" and int(grown_kib) < 50 * 1024, run.stdout  # under 50 MiB, not 900 MB


def test_byte_limit_is_configurable() -> None:
    data = sample_xrays(1)[0].read_bytes()
    with pytest.raises(ImageRejected) as info:
        prepare(data, CONFIG, InputLimits(max_bytes=len(data) - 1))
    assert info.value.reason == "too_many_bytes"
    assert prepare(data, CONFIG, InputLimits(max_bytes=len(data))).pixels.shape == (224, 224)


def test_warnings_for_colour_and_low_resolution() -> None:
    colourful = Image.fromarray(np.dstack([np.full((300, 300), v, np.uint8) for v in (200, 30, 90)]), "RGB")
    assert any("colour" in w for w in prepare(encode(colourful, "PNG"), CONFIG).warnings)
    assert not prepare(sample_xrays(1)[0].read_bytes(), CONFIG).warnings
    assert any("low resolution" in w for w in prepare(encode(gradient((100, 100)), "PNG"), CONFIG).warnings)


@pytest.mark.parametrize(("size", "warned"), [((5000, 200), True), ((200, 5000), True), ((2000, 801), False),
                                              ((1000, 1250), False)])
def test_a_shape_no_chest_xray_has_is_warned_about(size: tuple[int, int], warned: bool) -> None:
    """A strip or panorama is squeezed to the model's square grid: answered, but with a warning that says so."""
    notes = prepare(encode(gradient(size), "PNG"), CONFIG).warnings
    assert any(w.startswith(f"unusual shape ({size[0]}x{size[1]}") for w in notes) is warned, notes


def test_multi_frame_images_use_the_first_frame_and_say_so() -> None:
    frames = [gradient((120, 120)), gradient((120, 120)).rotate(180)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    prepared = prepare(data, CONFIG)
    assert any("2 frames" in w for w in prepared.warnings)
    single = prepare(encode(frames[0], "GIF"), CONFIG)
    assert np.array_equal(prepared.pixels, single.pixels)


def test_real_files_on_disk_match_bytes(tmp_path: Path) -> None:
    path = sample_xrays(1)[0]
    assert np.array_equal(load_file(path, CONFIG).pixels, prepare(path.read_bytes(), CONFIG).pixels)


def test_a_float_image_with_a_nan_or_infinite_pixel_is_corrupt() -> None:
    """A helper's find: one NaN or inf pixel in a float TIFF made every pixel NaN (min-max scaling), refused as
    `blank` with a warning that blamed 'a few extreme pixels (a marker)', and numpy warned on the server's stderr."""
    import warnings

    values = np.asarray(gradient((64, 64)), dtype=np.float32)
    assert prepare(encode(Image.fromarray(values, mode="F"), "TIFF"), CONFIG).pixels.std() > 10  # finite: served
    for bad in (np.nan, np.inf):
        values[10, 10] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no RuntimeWarning on the way
            with pytest.raises(ImageRejected) as refused:
                prepare(encode(Image.fromarray(values, mode="F"), "TIFF"), CONFIG)
        assert refused.value.reason == "corrupt" and "not numbers" in str(refused.value)
