"""Command-line helpers shared by the project's commands (training, registry, load tests)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def bounded(kind: type[int] | type[float], low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse `type=` that parses `kind` and refuses values outside [low, high] (an end `*_open`: excluded) and
    non-finite numbers at parse time: exit 2 naming the option, before any image is read or any step trained."""
    if high is None:
        span = f"{'>' if low_open else '>='} {low}"
    elif low is None:
        span = f"{'<' if high_open else '<='} {high}"
    else:
        span = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        inside = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and (
            high is None or (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {span}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def unwritable_reason(path: Path, exc: OSError) -> str:
    """Why `path` could not be written, naming the file that stands where a folder of its path must be: mkdir said
    only "File exists" (a helper's find)."""
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None and blocker != path:
        return f"{blocker} is a file, not a folder"
    return exc.strerror or str(exc)


def _check_writable_place(path: Path, text: str) -> None:
    """Refuse, at parse time, a path whose nearest existing parent is a file or cannot be written: the commands
    that write it found out only after their work (a gate saved a new version, then failed on `--json /proc/x`;
    a file among the parents read as "File exists")."""
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
    if parent is not None:
        try:  # a real probe: as root every permission check passes, and /proc refuses new files all the same
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{text}: cannot write in {parent} ({exc.strerror or exc})") from None


def check_outside(out: Path, class_folders: list[Path], out_option: str, data_option: str, data: Path) -> None:
    """Refuse an output folder that is, or lies inside, a class folder the data is read from: the curves, ROC and
    calibration PNGs a run wrote there were read by the next run as X-rays of that class (a helper's find).
    Elsewhere under the data folder is fine (`data/runs/r1`: never read). ValueError naming both options."""
    resolved_out = out.resolve()
    for folder in class_folders:
        resolved = folder.resolve()
        if resolved_out == resolved or resolved in resolved_out.parents:
            raise ValueError(f"{out_option} {out} is inside {folder}, a class folder of {data_option} {data}: what it "
                             "writes (PNG figures) would be read as images of that class; choose a folder outside it")


def output_file(text: str) -> Path:
    """An argparse `type=` for a file a command writes its figures to: a folder is refused at parse time (it failed
    with IsADirectoryError after the work, even after a new model version was saved), and so is a place that
    cannot be written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if path.exists():  # written in place: a file (its folder may be read-only) or a device, /dev/stdout
        if path.is_file() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} cannot be written")
        return path
    _check_writable_place(path, text)
    return path


def output_folder(text: str) -> Path:
    """An argparse `type=` for a folder a command writes its results into: an existing file is refused at parse time
    (the soak failed on it only after its whole run, with the results unwritten), and so is a place that cannot
    be written."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    _check_writable_place(path / "x", text)  # the folder itself when it exists, else its nearest parent
    return path


def file_stem(text: str) -> str:
    """An argparse `type=` for the start of file names a command writes (`--name`): one name, no folder in it (a
    benchmark with `--name sub/x` failed only after all its runs, copying nothing)."""
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (no folders, not empty)")
    return text


def positive_ints(text: str) -> list[int]:
    """An argparse `type=` for a comma-separated list of whole numbers >= 1, e.g. client counts '1,8,32'."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every number must be >= 1, not {text!r}")
    return values


def key_value(text: str) -> tuple[str, str]:
    """An argparse `type=` for KEY=VALUE (an environment variable for a started server): text without '=' or without
    a key is refused at parse time (it crashed with a ValueError traceback, after the model store was prepared)."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value
