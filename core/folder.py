"""Labeled image folders (`<root>/NORMAL/*`, `<root>/PNEUMONIA/*`): training data, evaluation sets, site data.

Training (with its patient splits), evaluation and site calibration all read the
same layout through this one function, so a folder that works for one works for all.
"""

from __future__ import annotations

from pathlib import Path

from core.card import CLASS_NAMES
from core.dicom import PART10_MAGIC

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}) | DICOM_SUFFIXES


class DataFolderError(Exception):
    """The data folder cannot be used; the message lists every problem found."""


def _is_part10(path: Path) -> bool:
    """An extension-less file that is DICOM Part 10 (`DICM` after the preamble); DICOMDIR indexes are not images."""
    if path.suffix or path.name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == PART10_MAGIC
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or an extension-less DICOM file as PACS exports write them."""
    return path.suffix.lower() in IMAGE_SUFFIXES or _is_part10(path)


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def labeled_images(root: Path, class_names: tuple[str, ...] = CLASS_NAMES) -> list[tuple[Path, int]]:
    """(file, label index) for every image under `root/<class name>/`, failing with every layout problem at once."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataFolderError(f"{root} {what}: expected {' and '.join(str(root / n) for n in class_names)}")
    problems: list[str] = []
    found: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            problems.append(f"missing class folder {class_dir}")
            continue
        entries = sorted(class_dir.iterdir())
        files = [p for p in entries if p.is_file() and is_image_file(p)]
        if not files:
            problems.append(f"no images (*.jpeg, *.png, *.dcm, ...) in {class_dir}")
        # Skipped without a word before: a broken link or a loop named like an image, images one folder down.
        broken = [p.name for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.exists()]
        if broken:
            problems.append(f"{len(broken)} broken link(s) in {class_dir}: {_some(broken)}")
        nested = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")
                  and any(q.is_file() and is_image_file(q) for q in p.rglob("*"))]
        if nested:
            problems.append(f"images in sub-folder(s) of {class_dir}, which are not read: {_some(nested)}; "
                            f"move them into {class_dir} or out of the data folder")
        found.extend((path, label) for path in files)
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in class_names)
    if extra:
        problems.append(f"unknown class folder(s) {', '.join(extra)} in {root}; expected {', '.join(class_names)}")
    if problems:
        raise DataFolderError(f"data folder {root} cannot be used:\n  - " + "\n  - ".join(problems))
    return found
