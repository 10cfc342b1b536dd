"""Real (short) training runs on a small real subset: single process and 2-process DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import ROOT, VENV_BIN
from harness.servers import server_env

pytestmark = pytest.mark.slow


def test_short_training_run_produces_a_loadable_calibrated_model(tmp_path: Path, data_dir: Path) -> None:
    home = tmp_path / "bentoml"  # its own store: the session's production model stays alone
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--data-dir", str(data_dir), "--out", str(out),
         "--max-per-class", "48", "--epochs", "2", "--batch-size", "16", "--bn-images", "64", "--no-progress", "--promote"],
        cwd=ROOT, env=server_env(BENTOML_HOME=str(home)), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch   1/2" in result.stdout and "epoch   2/2" in result.stdout
    for name in ("config.json", "metrics.json", "metrics.csv", "curves.png", "roc.png", "confusion.png", "model_tag.txt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["temperature"] > 0 and 0 <= metrics["threshold"] <= 1
    assert metrics["validation"]["per_class"]["PNEUMONIA"]["recall"] >= 0.98  # the operating point's target
    tag = (out / "model_tag.txt").read_text().strip()
    verify = subprocess.run([sys.executable, "-m", "models_registry", "verify", "production"], cwd=ROOT,
                            env=server_env(BENTOML_HOME=str(home)), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and tag in verify.stdout


def test_two_process_ddp_run(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "training.train",
         "--data-dir", str(data_dir), "--out", str(out), "--max-per-class", "32", "--epochs", "1",
         "--batch-size", "8", "--bn-images", "32", "--no-progress", "--no-register"],
        cwd=ROOT, env=server_env(BENTOML_HOME=str(tmp_path / "bentoml"), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert "2 process(es)" in result.stdout
    assert (out / "weights.pt").is_file() and (out / "metrics.json").is_file()
