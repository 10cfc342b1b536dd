"""Reading a `<split>/<CLASS>/<image>` folder, patient-level splitting, and in-memory datasets.

The folder layout is the one of the original Kermany et al. download. File names
carry the patient, and one patient can have several (even identical) images, so
validation splits are made by patient: splitting by image leaks.

A site's folder of DICOM files works the same way: `.dcm`/`.dicom` files, and
files without an extension that are DICOM Part 10 (what PACS exports write), are
read through the same `core.preprocess.load_file`. Their patient is the file's
Patient ID (a one-way hash of it, which never leaves the process), not its name.
A DICOM object refused by its tags (a lateral view, a CT, ...) is an unusable
image here, listed like an unreadable one.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.card import CLASS_NAMES
from core.dicom import patient_key
from core.folder import DICOM_SUFFIXES, DataFolderError, labeled_images  # noqa: F401 - DataFolderError re-exported for training
from core.preprocess import ImageRejected, InputLimits, PreprocessConfig, load_file


_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASS_NAMES
    patient: str


def patient_id(path: Path, label: int) -> str:
    """The patient a file belongs to: a DICOM file's Patient ID, else the naming scheme of the collection.

    Unknown names fall back to the file stem, i.e. each such file is its own
    patient, which is the conservative choice (it never merges two patients).
    The class is part of the key because the NORMAL and PNEUMONIA folders use
    independent numbering schemes. A DICOM file's key is a hash of its Patient ID
    (the ID itself is never kept).
    """
    if path.suffix.lower() in DICOM_SUFFIXES or not path.suffix:
        try:
            key = patient_key(path.read_bytes())
        except OSError:
            key = None
        if key is not None:
            return f"{CLASS_NAMES[label]}/dicom-{key}"
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(path.name)
        if match:
            return f"{CLASS_NAMES[label]}/{match.group(1).lower()}"
    return f"{CLASS_NAMES[label]}/{path.stem.lower()}"


def scan_split(data_dir: Path, split: str) -> list[Sample]:
    """List the images of one split (core.folder's layout), each with its patient."""
    if Path(data_dir).is_file():
        raise DataFolderError(f"{data_dir} is a file; give the folder that holds {split}/NORMAL and {split}/PNEUMONIA")
    return [Sample(path=p, label=label, patient=patient_id(p, label)) for p, label in labeled_images(Path(data_dir) / split)]


def training_split(data_dir: Path, split: str, val_fraction: float, seed: int,
                   max_per_class: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """The (train, validation) samples of a training run: the same arguments give the same patients, so a stored
    model can be scored again on exactly the validation patients its run held out (`training.stress`)."""
    return split_by_patient(first_per_class(scan_split(data_dir, split), max_per_class), val_fraction, seed)


def first_per_class(samples: list[Sample], max_per_class: int | None) -> list[Sample]:
    """At most this many samples of each class, the first ones (by patient, as files sort): smoke runs."""
    if not max_per_class:
        return samples
    return [s for label in range(len(CLASS_NAMES)) for s in [x for x in samples if x.label == label][:max_per_class]]


def run_split(data_dir: Path, training_config: dict, tag: str, data_fingerprint: str = "") -> tuple[list[Sample], list[Sample]]:
    """The training and validation patients of a stored model's run (its card's training config), refused when
    `data_dir` is not the data it was trained on: figures on other images would pass for its validation figures.

    `data_fingerprint` is the card's; the check is skipped without one, or when the run dropped unreadable images
    (`--skip-bad-images`: its fingerprint covers only the images it kept)."""
    if not {"split", "val_fraction", "seed"} <= set(training_config):
        raise ValueError(f"model {tag} does not record its training split (no training config in its card)")
    train, val = training_split(data_dir, training_config["split"], training_config["val_fraction"],
                                training_config["seed"], training_config.get("max_per_class"))
    if data_fingerprint and not training_config.get("skip_bad_images"):
        found = fingerprint(train + val)
        if found != data_fingerprint:
            raise DataFolderError(f"{data_dir} is not the data {tag} was trained on (data fingerprint {found[:12]}, "
                                  f"its card's {data_fingerprint[:12]}); give the folder its run used")
    return train, val


def held_out_samples(data_dir: Path, training_config: dict, tag: str, data_fingerprint: str = "") -> list[Sample]:
    """The validation patients a stored model's run held out, for scoring it again (see `run_split`)."""
    return run_split(data_dir, training_config, tag, data_fingerprint)[1]


def split_by_patient(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded, class-stratified split in which every patient lands on exactly one side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_patient[sample.patient].append(sample)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in range(len(CLASS_NAMES)):
        patients = sorted(p for p, items in by_patient.items() if items[0].label == label)
        rng.shuffle(patients)
        target = val_fraction * sum(len(by_patient[p]) for p in patients)
        taken = 0
        for patient in patients:
            if taken >= target:
                break
            val_patients.add(patient)
            taken += len(by_patient[patient])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    short = [f"{name} has {len({s.patient for s in samples if s.label == label})} patient(s)"
             for label, name in enumerate(CLASS_NAMES)
             if not any(s.label == label for s in train) or not any(s.label == label for s in val)]
    if short:  # else the training or the validation side lacks a class, and fails later with a vaguer message
        raise DataFolderError(f"{' and '.join(short)}: a patient-level split needs patients of each class on both "
                              f"sides (--val-fraction {val_fraction}); add images of more patients, or raise "
                              "--max-per-class")
    return train, val


def fingerprint(samples: list[Sample]) -> str:
    """sha256 over (class, file name, size) of every sample: identifies the training data cheaply."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: (s.label, s.path.name)):
        digest.update(f"{CLASS_NAMES[sample.label]}/{sample.path.name}:{sample.path.stat().st_size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclass
class LoadedSplit:
    """A split decoded once into memory: uint8 grids (N, H, W) and labels (N,)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    samples: list[Sample]


def load_samples(
    samples: list[Sample],
    config: PreprocessConfig,
    *,
    skip_bad: bool = False,
    progress: bool = True,
    description: str = "decoding",
) -> LoadedSplit:
    """Decode every image up front, so a bad file fails here and not mid-epoch.

    With `skip_bad`, unreadable files are dropped and reported; otherwise the
    error lists all of them at once.
    """
    return load_splits([samples], config, skip_bad=skip_bad, progress=progress, descriptions=[description])[0]


def load_splits(splits: list[list[Sample]], config: PreprocessConfig, *, skip_bad: bool = False, progress: bool = True,
                descriptions: list[str] | None = None) -> list[LoadedSplit]:
    """`load_samples` for several splits at once (training and validation): every unreadable file of all of them is
    listed in one error, not only those of the first split to fail."""
    limits = InputLimits(max_bytes=2**40, max_pixels=2**40, min_side=1)
    decoded: list[tuple[list[np.ndarray], list[Sample]]] = []
    bad: list[str] = []
    for samples, description in zip(splits, descriptions or ["decoding"] * len(splits), strict=True):
        grids: list[np.ndarray] = []
        kept: list[Sample] = []
        for sample in tqdm(samples, desc=description, disable=not progress, unit="img", leave=False):
            try:
                prepared = load_file(sample.path, config, limits)
            except (ImageRejected, OSError) as exc:
                bad.append(f"{sample.path}: {exc}")
                continue
            if prepared.refusal is not None:  # a DICOM object that is not a frontal chest radiograph: never decoded
                bad.append(f"{sample.path}: refused ({prepared.refusal[0]}): {prepared.refusal[1]}")
                continue
            grids.append(prepared.pixels)
            kept.append(sample)
        decoded.append((grids, kept))
    if bad and not skip_bad:
        listing = "\n  - ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
        raise DataFolderError(
            f"{len(bad)} unreadable image(s); fix or remove them, or pass --skip-bad-images:\n  - {listing}"
        )
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):\n  - " + "\n  - ".join(bad))
    if any(not kept for _, kept in decoded):
        raise DataFolderError("no readable images left to use")
    for samples, (_, kept), description in zip(splits, decoded, descriptions or ["decoding"] * len(splits)):
        # Skipping can empty a class: a model was trained and saved with ROC-AUC nan and exit 0 (a helper's find).
        lost = sorted({s.label for s in samples} - {s.label for s in kept})
        if lost:
            names = " and ".join(CLASS_NAMES[label] for label in lost)
            raise DataFolderError(f"no readable {names} image left ({description}) once the unreadable ones were "
                                  "skipped: both classes are needed")
    return [LoadedSplit(pixels=torch.from_numpy(np.stack(grids)),
                        labels=torch.tensor([s.label for s in kept], dtype=torch.long), samples=kept)
            for grids, kept in decoded]
