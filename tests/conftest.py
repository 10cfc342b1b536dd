"""Test-wide set-up: an isolated BentoML home, the shipped model in it, one shared live server."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports bentoml: tests never touch a user's model store.
_HOME = Path(tempfile.mkdtemp(prefix="pneumonia-test-bentoml-"))
os.environ["BENTOML_HOME"] = str(_HOME)
os.environ["BENTOML_DO_NOT_TRACK"] = "true"

import pytest  # noqa: E402

from harness.paths import DATA_DIR  # noqa: E402
from harness.servers import ServerProcess, bentoml_serve, free_port  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    """Most tests read real X-rays: without the data set, stop with one line instead of a hundred FileNotFoundErrors."""
    if not (DATA_DIR / "train" / "NORMAL").is_dir():
        pytest.exit(f"the shared data set is missing at {DATA_DIR} (set PNEUMONIA_DATA_DIR to the chest_xray folder)",
                    returncode=4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR  # checked once in pytest_sessionstart


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def production_tag(bentoml_home: Path) -> str:
    """The shipped default model, imported into the test store and promoted."""
    from models_registry import production_tag as current
    from models_registry.default import ensure_default

    ensure_default()
    tag = current()
    assert tag is not None
    return tag


@pytest.fixture(scope="session")
def server(production_tag: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """One `bentoml serve` of the repository's service for the whole session, always stopped."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    # One worker: batching assertions (HTTP and gRPC calls sharing a forward pass) need one batch queue; with
    # two, the kernel spreads connections over the workers. Multi-worker serving (the default: one worker
    # per core) has its own tests: test_two_workers_share_the_grpc_port, the fault tests, the Bento test.
    proc = bentoml_serve("service:PneumoniaClassifier", free_port(), log, PNEUMONIA_BATCHING__MAX_BATCH_SIZE="32",
                         PNEUMONIA_WORKERS="1")
    proc.start()
    yield proc
    proc.stop()


API_KEY = "ui-and-explain-test-key-0123456789"  # test-only; at least 16 characters


@pytest.fixture(scope="session")
def keyed_server(production_tag: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """A second `bentoml serve` with API keys on (one worker), for the explain and web page tests; always stopped."""
    log = tmp_path_factory.mktemp("keyed-server") / "server.log"
    proc = bentoml_serve("service:PneumoniaClassifier", free_port(), log, PNEUMONIA_WORKERS="1",
                         PNEUMONIA_SECURITY__API_KEYS=API_KEY)
    proc.start()
    try:
        proc.wait_for_explainers()
    except BaseException:
        proc.stop()
        raise
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def secured_server(production_tag: str, tmp_path_factory: pytest.TempPathFactory):
    """The hospital-style server (tests/secured.py): HTTPS, gRPC over mutual TLS, API keys, rate limits; stopped after."""
    from tests.secured import start_secured

    server, pki = start_secured(tmp_path_factory.mktemp("secured"))
    yield server, pki
    server.stop()


@pytest.fixture(scope="session")
def bento_tag(production_tag: str) -> str:
    """`bentoml build` of this working tree into the test store (packs the production model); once per session."""
    import subprocess

    from harness.paths import ROOT, VENV_BIN
    from harness.servers import HANG_S, server_env

    result = subprocess.run([str(VENV_BIN / "bentoml"), "build", "--output", "tag"], cwd=ROOT, env=server_env(),
                            capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].replace("__tag__:", "").strip()
    assert tag.startswith("pneumonia-classifier-service:")
    return tag


# The longest files first: with two test processes taking whole files (pyproject's `-n 2 --dist loadfile
# --no-loadscope-reorder`), a long file collected last ran alone at the end while the other process idled.
# Measured per file (`PYTEST_ADDOPTS=--durations=0`, 2026-11-26): training 337 s, faults 321, registry 308,
# loadtests 268, cli 132, calibrate 108; every other file under 90 s.
LONGEST_FIRST = ("test_registry.py", "test_training.py", "test_loadtests.py", "test_faults.py", "test_cli.py",
                 "test_calibrate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
