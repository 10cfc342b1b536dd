"""The shift-stress suite's images: the same with one thread or several, and from the pixels training decodes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from core.preprocess import PreprocessConfig, load_file
from harness import dicom_files
from harness.payloads import sample_xrays
from tests.images import encode
from training.stress import STRESSES, stressed_grids, stressed_logits


def test_stressed_images_are_the_same_with_one_thread_or_several() -> None:
    paths = sample_xrays(3, offset=11)  # three of each class
    names = ["clean", "noise (sigma 8)", "random acquisition mix", "rotate +7 deg"]  # three of them draw randomness

    def fingerprint(grids: np.ndarray) -> np.ndarray:  # one number per image that any changed pixel moves
        return (grids.astype(np.float64) * np.arange(1, grids[0].size + 1).reshape(grids[0].shape)).sum(axis=(1, 2))

    one = stressed_logits(fingerprint, paths, PreprocessConfig(), names, batch_size=4, workers=1)
    several = stressed_logits(fingerprint, paths, PreprocessConfig(), names, batch_size=4, workers=4)
    assert list(several) == names == list(one)
    for name in names:
        assert one[name].shape == (6,) and np.array_equal(one[name], several[name]), name
    assert not np.array_equal(one["clean"], one["noise (sigma 8)"])  # the stresses did change the images


def test_stresses_start_from_the_pixels_training_decodes_for_every_kind_of_file(tmp_path: Path) -> None:
    """A 16-bit PNG, a PNG with alpha and a 12-bit DICOM file of a real X-ray: the clean stress gives the grid that
    training and serving decode (`load_file`), and the other stresses start from that picture. PIL's own
    `convert("L")` saturated the 16-bit file to white, ignored alpha and could not open the DICOM file, so a
    data folder of such files got a wrong stress table and threshold, or failed after training."""
    config = PreprocessConfig()
    with Image.open(sample_xrays(1, offset=7)[0]) as opened:
        grey = np.asarray(opened.convert("L"))
    files = {
        "16-bit PNG": Image.fromarray(grey.astype(np.uint16) * 257),
        "PNG with alpha": Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 128)]), mode="RGBA"),
    }
    for name, image in files.items():
        (tmp_path / f"{name}.png").write_bytes(encode(image, "PNG"))
    stored = dicom_files.stored_values(grey, 12)
    (tmp_path / "12-bit DICOM.dcm").write_bytes(
        dicom_files.part10(stored.values, bits_stored=12, window=(stored.center, stored.width)))
    for path in sorted(tmp_path.iterdir()):
        served = load_file(path, config).pixels
        assert 40 < served.mean() < 215, (path.name, served.mean())  # a real picture, not saturated
        assert np.array_equal(stressed_grids([path], STRESSES["clean"], config)[0], served), path.name
        darker = stressed_grids([path], STRESSES["darker (x0.75)"], config)[0]
        assert abs(darker.mean() - 0.75 * served.mean()) < 3, (path.name, darker.mean(), served.mean())


def test_served_side_rows_score_the_images_sent_small_with_the_gate(production_tag: str) -> None:
    """`training.stress --served-side`, which set the service's smallest accepted side: an image is sent at that
    shorter side (aspect kept, never enlarged) and scored with the model's gate."""
    from models_registry import load_model
    from training.stress import _smaller, served_side_rows

    paths = sample_xrays(4, offset=21)  # four of each class
    config = PreprocessConfig()
    with Image.open(paths[0]) as opened:
        width, height = opened.size
    small = stressed_grids([paths[0]], _smaller(48), config)
    assert small.shape == (1, config.image_size, config.image_size)
    with Image.open(paths[0]) as opened, Image.open(io.BytesIO(_smaller(48)(opened.convert("L"), None))) as sent:
        assert min(sent.size) == 48 and abs(sent.size[0] / sent.size[1] - width / height) < 0.05
    assert np.array_equal(stressed_grids([paths[0]], _smaller(100_000), config), stressed_grids([paths[0]], STRESSES["clean"], config))

    model = load_model(production_tag)
    labels = np.array([1 if "PNEUMONIA" in str(p) else 0 for p in paths])
    rows = served_side_rows(model, paths, labels, [32, 100_000])
    assert [r["side"] for r in rows] == [32, 100_000]
    full = model.assess(stressed_grids(paths, STRESSES["clean"], config))
    answered = np.array([a.validity.valid for a in full])
    assert rows[1]["refused"] == 1 - answered.mean()
    called = np.array([a.probability >= model.card.threshold for a in full])
    assert rows[1]["all"]["sensitivity"] == called[labels == 1].mean()
    assert rows[1]["all"]["specificity"] == (~called[labels == 0]).mean()
    assert rows[0]["refused"] >= rows[1]["refused"]  # the gate refuses thumbnails more often than the X-rays
