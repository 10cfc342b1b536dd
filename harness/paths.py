"""Where things are: the repository, the shared data set, results, and this environment's tools."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PNEUMONIA_DATA_DIR", ROOT.parent / "shared" / "datasets" / "chest_xray"))
RESULTS = ROOT / "results"
VENV_BIN = Path(sys.executable).parent  # bentoml, locust, uvicorn, torchrun of this environment
