"""Command lines as a new user meets them: relative paths work from any folder, failures are one clear line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import ROOT
from harness.servers import server_env
from training.augment import AugmentConfig
from training.train import augment_config, get_args_parser

ARCHIVE = ROOT / "default_model" / "pneumonia-classifier.bentomodel"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` in `cwd`, in this test session's model store."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=server_env(), capture_output=True, text=True,
                          timeout=300)


def one_clear_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and all(word in lines[0] for word in words), lines


def test_registry_imports_an_archive_by_a_relative_path(production_tag: str, tmp_path: Path) -> None:
    """The README's command, from the repository root, and a relative path from another folder."""
    from_root = run("models_registry", "import", "default_model/pneumonia-classifier.bentomodel")
    assert from_root.returncode == 0 and production_tag in from_root.stdout, from_root.stderr[-2000:]
    (tmp_path / "models").mkdir()
    shutil.copy(ARCHIVE, tmp_path / "models" / "copy.bentomodel")
    elsewhere = run("models_registry", "import", "models/copy.bentomodel", cwd=tmp_path)
    assert elsewhere.returncode == 0 and production_tag in elsewhere.stdout, elsewhere.stderr[-2000:]
    (tmp_path / "out").mkdir()
    exported = run("models_registry", "export", "production", "out", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("*.bentomodel"))) == 1


def test_registry_failures_are_one_line(production_tag: str, tmp_path: Path) -> None:
    one_clear_line(run("models_registry", "import", "no/such.bentomodel", cwd=tmp_path), 1, "no/such.bentomodel",
                   "does not exist")
    (tmp_path / "notes.bentomodel").write_text("not an archive")
    one_clear_line(run("models_registry", "import", "notes.bentomodel", cwd=tmp_path), 1, "notes.bentomodel")
    one_clear_line(run("models_registry", "show", "pneumonia-classifier:nope"), 1, "not in the store")


def test_training_commands_fail_with_one_line(production_tag: str, tmp_path: Path) -> None:
    bad_augment = run("training.train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                      "--aug-hflip", "2")
    one_clear_line(bad_augment, 2, "hflip")
    reversed_range = run("training.train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                         "--aug-local-contrast-amount", "1", "-0.5")
    one_clear_line(reversed_range, 2, "local_contrast_amount: low 1.0 is above high -0.5")
    one_clear_line(run("training.evaluate", "--model", "nope", "--data-dir", str(tmp_path)), 2, "not in the store")
    one_clear_line(run("training.export", "--run", "missing-run", cwd=tmp_path), 2, "missing-run")
    one_clear_line(run("training.framing_views", "--model", "nope", "--data-dir", str(tmp_path)), 2, "not in the store")
    one_clear_line(run("training.ensemble", "--models", production_tag, "nope", "--data-dir", str(tmp_path),
                       "--out", str(tmp_path / "ensemble")), 2, "not in the store")
    # The shipped model with itself: refused before any data is read, with the reason.
    one_clear_line(run("training.ensemble", "--models", production_tag, production_tag, "--data-dir", str(tmp_path),
                       "--out", str(tmp_path / "ensemble")), 2, "listed twice")


@pytest.mark.parametrize("argv", [[], ["--aug-rotate-deg", "4", "--aug-scale", "0.9", "1.2", "--aug-erase-p", "0"]])
def test_augmentation_flags_default_to_the_augment_config(argv: list[str]) -> None:
    args = get_args_parser().parse_args(["--data-dir", "d", "--out", "o", *argv])
    expected = AugmentConfig() if not argv else AugmentConfig(rotate_deg=4, scale=(0.9, 1.2), erase_p=0)
    assert augment_config(args) == expected
