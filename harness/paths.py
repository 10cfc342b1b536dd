"""Where things are: the repository, the shared data set, results, and this environment's tools."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PNEUMONIA_DATA_DIR", ROOT.parent / "shared" / "datasets" / "chest_xray"))
RESULTS = ROOT / "results"
VENV_BIN = Path(sys.executable).parent  # bentoml, locust, uvicorn, torchrun of this environment


def numbered_runs(folder: Path, stem: str) -> list[Path]:
    """`folder`'s kept runs `<stem>-<k>.json`, by k: the pattern `<stem>-[0-9].json` left out runs 10 and up."""
    found = [(int(p.stem[len(stem) + 1:]), p) for p in folder.glob(f"{stem}-*.json")
             if p.stem[len(stem) + 1:].isdigit()]
    return [p for _, p in sorted(found)]
