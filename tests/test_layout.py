"""The rooms of the repository and who may import whom (README "Architecture"), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from harness.paths import ROOT

PROJECT = {"core", "api", "training", "models_registry", "serving", "client", "harness", "loadtests", "tests",
           "service", "settings", "scripts"}
# room -> the project packages its code may import (besides its own). Libraries are always allowed.
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "api": set(),
    "settings": {"core"},
    "models_registry": {"core"},
    "training": {"core", "models_registry"},
    "serving": {"core", "api", "settings"},
    "service": {"core", "api", "models_registry", "serving", "settings"},
    "client": {"api"},
    "harness": PROJECT - {"tests", "harness"},
    "loadtests": PROJECT - {"tests", "loadtests", "scripts"},
    "scripts": PROJECT - {"tests", "scripts"},
}
SKIPPED = {".venv", ".git", "_proto", "results", "runs", "build", "__pycache__"}


def sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if not SKIPPED & set(p.relative_to(ROOT).parts))


def room(path: Path) -> str:
    first = path.relative_to(ROOT).parts[0]
    return first.removesuffix(".py")


def imported(path: Path) -> set[str]:
    """The top-level project packages a file imports (absolute imports; relative ones stay in their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & PROJECT


@pytest.mark.parametrize("owner", sorted(MAY_IMPORT))
def test_each_room_imports_only_what_it_may(owner: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported(path) - MAY_IMPORT[owner] - {owner})
        for path in sources() if room(path) == owner
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_nothing_outside_tests_imports_tests_and_no_file_edits_sys_path() -> None:
    outside = [str(p.relative_to(ROOT)) for p in sources() if room(p) != "tests" and "tests" in imported(p)]
    assert not outside
    edits = [str(p.relative_to(ROOT)) for p in sources()
             if any(f"sys.path.{verb}" in p.read_text() for verb in ("insert", "append", "extend"))]
    assert not edits


def test_deploy_holds_no_code() -> None:
    """deploy/ (manifests, rules, dashboards) imports nothing: tests/test_deploy.py validates it from outside."""
    deploy = ROOT / "deploy"
    assert deploy.is_dir()
    assert not [str(p.relative_to(ROOT)) for p in deploy.rglob("*") if p.suffix in (".py", ".sh") or
                (p.is_file() and p.stat().st_mode & 0o111)]


def test_the_bento_ships_no_trainer_client_or_harness() -> None:
    bentofile = (ROOT / "bentofile.yaml").read_text()
    include = bentofile.split("include:")[1].split("exclude:")[0]
    assert not any(room in include for room in ("training/", "client/", "harness/", "tests/", "loadtests/"))


def test_image_reason_codes_of_the_contract_are_the_preprocessing_s() -> None:
    from api.reasons import IMAGE_REASONS
    from core.preprocess import RejectReason

    assert set(IMAGE_REASONS) == set(get_args(RejectReason))


def test_dev_sh_usage_from_another_folder_and_run_without_a_command(tmp_path) -> None:
    """A helper's finds: `../dev.sh help` from another folder failed in sed (it read "$0" after its cd), and
    `./dev.sh run` with no command exited 0 having done nothing. Neither sets anything up."""
    import subprocess

    def dev(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "dev.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    helped = dev("help")
    assert helped.returncode == 0 and "./dev.sh serve" in helped.stdout, helped.stderr
    unknown = dev("bogus")
    assert unknown.returncode == 2 and "./dev.sh test" in unknown.stdout
    nothing = dev("run")
    assert nothing.returncode == 2 and "usage: ./dev.sh run CMD" in nothing.stderr
