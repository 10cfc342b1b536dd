"""Data folder reading, patient-level splitting and up-front errors (real data where it matters)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import ROOT
from harness.servers import server_env
from training.data import (
    CLASS_NAMES,
    DataFolderError,
    fingerprint,
    load_samples,
    load_splits,
    patient_id,
    scan_split,
    split_by_patient,
)
from core.preprocess import PreprocessConfig


def test_patient_ids_follow_the_collection_naming() -> None:
    assert patient_id(Path("person1_bacteria_1.jpeg"), 1) == patient_id(Path("person1_virus_7.jpeg"), 1)
    assert patient_id(Path("person1_bacteria_1.jpeg"), 1) != patient_id(Path("person10_bacteria_1.jpeg"), 1)
    assert patient_id(Path("IM-0115-0001.jpeg"), 0) == "NORMAL/im-0115"
    assert patient_id(Path("NORMAL2-IM-0115-0001.jpeg"), 0) == "NORMAL/normal2-im-0115"
    assert patient_id(Path("IM-0115-0001.jpeg"), 0) != patient_id(Path("NORMAL2-IM-0115-0001.jpeg"), 0)


def test_real_split_keeps_every_patient_on_one_side(data_dir: Path) -> None:
    samples = scan_split(data_dir, "train")
    assert len(samples) == 5216
    train, val = split_by_patient(samples, 0.15, seed=0)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    assert len(train) + len(val) == len(samples)
    for label in range(len(CLASS_NAMES)):
        share = sum(s.label == label for s in val) / sum(s.label == label for s in samples)
        assert 0.13 < share < 0.18, f"class {CLASS_NAMES[label]} validation share {share:.3f}"
    again, _ = split_by_patient(samples, 0.15, seed=0)
    other, _ = split_by_patient(samples, 0.15, seed=1)
    assert [s.path for s in again] == [s.path for s in train]
    assert [s.path for s in other] != [s.path for s in train]


def _folder(tmp_path: Path, data_dir: Path, per_class: int = 3) -> Path:
    root = tmp_path / "data"
    for name in CLASS_NAMES:
        (root / "train" / name).mkdir(parents=True)
        for src in sorted((data_dir / "train" / name).iterdir())[:per_class]:
            shutil.copy(src, root / "train" / name / src.name)
    return root


def test_missing_class_and_empty_class_are_listed_together(tmp_path: Path, data_dir: Path) -> None:
    root = _folder(tmp_path, data_dir)
    shutil.rmtree(root / "train" / "PNEUMONIA")
    (root / "train" / "COVID").mkdir()
    with pytest.raises(DataFolderError) as info:
        scan_split(root, "train")
    message = str(info.value)
    assert "missing class folder" in message and "PNEUMONIA" in message
    assert "unknown class folder(s) COVID" in message
    for f in (root / "train" / "NORMAL").iterdir():
        f.unlink()
    with pytest.raises(DataFolderError, match="no images"):
        scan_split(root, "train")
    with pytest.raises(DataFolderError, match="does not exist"):
        scan_split(root, "test")


def test_unreadable_images_fail_up_front_with_every_name(tmp_path: Path, data_dir: Path, capsys) -> None:
    root = _folder(tmp_path, data_dir)
    (root / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = next((root / "train" / "PNEUMONIA").iterdir()).read_bytes()
    (root / "train" / "PNEUMONIA" / "truncated.jpeg").write_bytes(good[: len(good) // 3])
    samples = scan_split(root, "train")
    with pytest.raises(DataFolderError) as info:
        load_samples(samples, PreprocessConfig(), progress=False)
    assert "2 unreadable image(s)" in str(info.value)
    assert "broken.jpeg" in str(info.value) and "truncated.jpeg" in str(info.value)
    loaded = load_samples(samples, PreprocessConfig(), progress=False, skip_bad=True)
    assert len(loaded.labels) == 6 and loaded.pixels.shape == (6, 224, 224)
    assert "skipped 2 unreadable" in capsys.readouterr().out


def test_bad_images_of_both_sides_of_the_split_are_listed_in_one_error(tmp_path: Path, data_dir: Path) -> None:
    """Training decoded its training side, failed at its first bad file and never named the validation side's."""
    root = _folder(tmp_path, data_dir, per_class=12)
    train, val = split_by_patient(scan_split(root, "train"), 0.3, seed=0)
    for sample in (train[0], val[0]):
        sample.path.write_bytes(b"not an image")
    with pytest.raises(DataFolderError) as info:
        load_splits([train, val], PreprocessConfig(), progress=False)
    assert "2 unreadable image(s)" in str(info.value)
    assert train[0].path.name in str(info.value) and val[0].path.name in str(info.value)


def test_broken_links_nested_images_and_a_one_patient_class_are_refused(tmp_path: Path, data_dir: Path) -> None:
    """Dropped without a word before (broken links, images one folder down); a class of one patient failed later
    with 'no readable images left to use'."""
    root = _folder(tmp_path, data_dir, per_class=2)
    normal = root / "train" / "NORMAL"
    (normal / "old").mkdir()
    shutil.copy(sorted(normal.glob("*.jpeg"))[0], normal / "old" / "kept.jpeg")
    (normal / "gone.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    (normal / "loop.jpeg").symlink_to(normal / "loop.jpeg")
    with pytest.raises(DataFolderError) as info:
        scan_split(root, "train")
    assert "2 broken link(s)" in str(info.value) and "gone.jpeg" in str(info.value) and "loop.jpeg" in str(info.value)
    assert "sub-folder(s) of" in str(info.value) and "old" in str(info.value)
    for extra in ("gone.jpeg", "loop.jpeg"):
        (normal / extra).unlink()
    shutil.rmtree(normal / "old")
    samples = scan_split(root, "train")  # the first two PNEUMONIA files are one patient's (person1000)
    with pytest.raises(DataFolderError, match=r"^PNEUMONIA has 1 patient\(s\): .*both sides"):
        split_by_patient(samples, 0.15, seed=0)


def test_fingerprint_changes_with_the_data(tmp_path: Path, data_dir: Path) -> None:
    root = _folder(tmp_path, data_dir)
    before = fingerprint(scan_split(root, "train"))
    assert before == fingerprint(scan_split(root, "train"))
    next((root / "train" / "NORMAL").iterdir()).unlink()
    assert fingerprint(scan_split(root, "train")) != before


def test_training_cli_reports_a_bad_folder_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "missing class folder" in result.stderr and "no images" in result.stderr
    assert "Traceback" not in result.stderr
