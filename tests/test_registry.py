"""Registry round trip against the real BentoML store (a temporary BENTOML_HOME)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import models_registry as reg
from models_registry.default import DEFAULT_ARCHIVE
from models_registry.store import show
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import HANG_S, ServerProcess, bentoml_serve, free_port, server_env
from core.model import ModelSpec, build_model
from core.preprocess import PreprocessConfig, load_file

NAME = "registry-test-model"  # kept apart from the production model the servers use


def _card(threshold: float) -> reg.ModelCard:
    return reg.ModelCard(
        spec=ModelSpec(), preprocess=PreprocessConfig(), temperature=1.5, threshold=threshold,
        val_metrics={"roc_auc": 0.9, "accuracy": 0.8}, data_fingerprint="f" * 64, code_version="test",
        training_config={"max_per_class": None, "epochs": 2},  # argparse leaves unset options as None
    )


@pytest.fixture(scope="module")
def two_models() -> tuple[tuple[str, torch.nn.Module], tuple[str, torch.nn.Module]]:
    saved = []
    for seed, threshold in ((1, 0.4), (2, 0.6)):
        torch.manual_seed(seed)
        module = build_model(ModelSpec()).eval()
        saved.append((reg.save_model(module, _card(threshold), name=NAME), module))
    return saved[0], saved[1]


def _grids() -> np.ndarray:
    return np.stack([load_file(p, PreprocessConfig()).pixels for p in sample_xrays(2)])


def test_save_list_promote_load_gives_the_same_outputs_bit_for_bit(two_models) -> None:
    (first, module), (second, _) = two_models
    rows = {r["tag"]: r for r in reg.list_models(NAME)}
    assert {first, second} <= set(rows)
    assert rows[first]["roc_auc"] == 0.9 and rows[first]["arch"] == "mobilenet_v3_small"
    assert reg.production_tag(NAME) == first  # the only model when the second was stored: kept in production
    assert reg.promote(first, NAME) == first
    loaded = reg.load_model("production", NAME)
    assert loaded.tag == first and loaded.card.threshold == 0.4 and loaded.card.temperature == 1.5
    grids = _grids()
    from core.preprocess import to_tensor

    with torch.inference_mode():
        expected = module(to_tensor(grids, loaded.card.preprocess))
    assert torch.equal(loaded.logits(grids), expected)
    info = show("production", NAME)
    for key in ("spec", "preprocess", "class_names", "temperature", "threshold", "val_metrics",
                "training_config", "data_fingerprint", "code_version", "weights_sha256"):
        assert key in info


def test_promotion_history_and_rollback(two_models) -> None:
    (first, _), (second, _) = two_models
    reg.promote(first, NAME)
    reg.promote(second, NAME)
    assert reg.production_tag(NAME) == second
    assert reg.rollback(NAME) == first
    assert reg.production_tag(NAME) == first
    with pytest.raises(reg.RegistryError, match="production model"):
        reg.delete_model(first, NAME)


def test_export_delete_import_round_trip(two_models, tmp_path: Path) -> None:
    (_, _), (second, _) = two_models
    before = reg.load_model(second, NAME).probabilities(_grids())
    archive = reg.export_model(second, tmp_path, NAME)
    assert archive.is_file() and archive.stat().st_size > 1_000_000
    reg.delete_model(second, NAME, force=True)
    with pytest.raises(reg.RegistryError, match="not in the store"):
        reg.resolve_tag(second, NAME)
    assert reg.import_model(archive, name=NAME) == second
    assert np.array_equal(reg.load_model(second, NAME).probabilities(_grids()), before)


def test_export_leaves_an_identical_archive_alone_and_replaces_another(two_models, tmp_path: Path) -> None:
    """Re-exporting the same model keeps the archive's bytes (a committed default_model/ does not churn); an archive
    of another model at that path is kept unless `overwrite` (it was silently replaced); a zip is read as a zip."""
    (first, _), (second, _) = two_models
    target = tmp_path / "model.bentomodel"
    reg.export_model(first, target, NAME)
    kept = target.read_bytes()
    for path in reg.store.store_path_of(first).rglob("*"):  # as in a store that imported the model later: new times
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - 3600))
    assert reg.export_model(first, target, NAME) == target and target.read_bytes() == kept
    with pytest.raises(reg.RegistryError, match="it exists and holds something else"):  # silently replaced before
        reg.export_model(second, target, NAME)
    assert target.read_bytes() == kept
    reg.export_model(second, target, NAME, overwrite=True)
    assert target.read_bytes() != kept and reg.store._tag_in_archive(target) == second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # written beside, moved into place
    zipped = reg.export_model(first, tmp_path / "model.zip", NAME)  # a zip by its name: read back, also on re-import
    assert zipped.name == "model.zip" and reg.store._tag_in_archive(zipped) == first
    assert reg.import_model(zipped, name=NAME) == first
    (tmp_path / "a-file").write_text("")
    with pytest.raises(reg.RegistryError, match="cannot write .*a-file/x.bentomodel"):
        reg.export_model(first, tmp_path / "a-file" / "x.bentomodel", NAME)
    # A folder named with a trailing slash, not there yet (the module's own example, `export production out/`):
    # it wrote out.bentomodel beside it (a helper's find); an empty path wrote into the current folder.
    into = reg.export_model(first, f"{tmp_path / 'newdir'}/", NAME)
    assert into == tmp_path / "newdir" / f"{first.replace(':', '-')}.bentomodel" and into.is_file()
    for empty in ("", " "):
        with pytest.raises(reg.RegistryError, match="no path to export to"):
            reg.export_model(first, empty, NAME)


def _repacked(archive: Path, out: Path, version: str | None = None, flip_weights: bool = False,
              model_name: str | None = None, metadata: dict | None = None) -> Path:
    """A copy of a .bentomodel archive with another version, model name or card entries, or one flipped byte in its
    weights."""
    import tarfile

    import yaml

    unpacked = out.with_suffix(".d")
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    info = yaml.safe_load((unpacked / "model.yaml").read_text())
    info.update({"version": version or info["version"], "name": model_name or info["name"]})
    info["metadata"].update(metadata or {})
    (unpacked / "model.yaml").write_text(yaml.safe_dump(info))
    if flip_weights:
        data = bytearray((unpacked / "weights.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (unpacked / "weights.pt").write_bytes(bytes(data))
    with tarfile.open(out, "w:xz") as tar:  # the compression BentoML writes and expects
        for path in sorted(unpacked.iterdir()):
            tar.add(path, arcname=path.name)
    return out


def test_import_keeps_only_models_the_service_can_load(two_models, tmp_path: Path) -> None:
    (first, _), (_, _) = two_models
    archive = reg.export_model(first, tmp_path / "first.bentomodel", NAME)
    before = reg.store.stored_tags(NAME)
    assert reg.import_model(archive, name=NAME) == first  # the same files again: accepted, nothing changes

    other_files = _repacked(archive, tmp_path / "same-tag.bentomodel", flip_weights=True)
    with pytest.raises(reg.RegistryError, match="already in the store with other files"):
        reg.import_model(other_files, name=NAME)
    corrupt = _repacked(archive, tmp_path / "corrupt.bentomodel", version="tampered1", flip_weights=True)
    with pytest.raises(reg.RegistryError, match="could not import .*tampered1: .*corrupt.*the archive is damaged and nothing was imported"):
        reg.import_model(corrupt, name=NAME)
    foreign = _repacked(archive, tmp_path / "foreign.bentomodel", model_name="another-model")
    with pytest.raises(reg.RegistryError, match=f"another-model:.*: it is not a {NAME} model"):
        reg.import_model(foreign, name=NAME)
    assert reg.store.stored_tags("another-model") == []
    # a card whose class names are swapped: served, it called every pneumonia X-ray NORMAL
    swapped = _repacked(archive, tmp_path / "swapped.bentomodel", version="swapped1",
                        metadata={"class_names": ["PNEUMONIA", "NORMAL"]})
    with pytest.raises(reg.RegistryError, match="(?s)could not import .*swapped1: .*class_names must be"):
        reg.import_model(swapped, name=NAME)
    assert reg.store.stored_tags(NAME) == before and reg.load_model(first, NAME).tag == first


def test_an_import_interrupted_by_ctrl_c_leaves_no_half_copied_model(two_models, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """BentoML removes a half-copied import on errors only; after Ctrl-C one stayed, listed as an ordinary model,
    and importing the archive again was refused as 'other files'. Ctrl-C is raised where BentoML has created the
    version folder and copied its first file."""
    import bentoml

    (first, _), _ = two_models
    archive = reg.export_model(first, tmp_path / "first.bentomodel", NAME)
    renamed = _repacked(archive, tmp_path / "renamed.bentomodel", version="interrupted1")
    folder = reg.store._model_store_dir() / NAME / "interrupted1"

    def copied_one_file_then_ctrl_c(path: str, *args: object, **kwargs: object) -> None:
        folder.mkdir(parents=True)
        (folder / "model.yaml").write_text("name: x\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(bentoml.models, "import_model", copied_one_file_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        reg.import_model(renamed, name=NAME)
    assert not folder.exists()


@contextlib.contextmanager
def _truncated_weights(tag: str) -> Iterator[None]:
    """The stored weights of `tag` cut in half for the block (a damaged store), restored after it."""
    weights = Path(reg.store.store_path_of(tag)) / "weights.pt"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    try:
        yield
    finally:
        weights.write_bytes(intact)


def test_rollback_refuses_a_model_damaged_since_it_was_production(two_models) -> None:
    """rollback re-promoted the previous model without loading it: a corrupt one went into production."""
    (first, _), (second, _) = two_models
    reg.promote(first, NAME)
    reg.promote(second, NAME)
    with _truncated_weights(first):
        with pytest.raises(reg.RegistryError, match=f"cannot roll back to {first}: .*weights"):
            reg.rollback(NAME)
        assert reg.production_tag(NAME) == second
    assert reg.rollback(NAME) == first


def test_the_only_stored_model_stays_production_when_another_is_stored(capsys: pytest.CaptureFixture[str]) -> None:
    """A store with one model and no promotion serves that model (a Bento's store); storing a second one (import,
    calibrate, a training run) left no production model at all, and `delete` removed the served model without
    --force."""
    name = "registry-implicit-model"
    only = reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=name)
    assert reg.production_tag(name) == only
    with pytest.raises(reg.RegistryError, match="is the production model"):
        reg.delete_model(only, name)
    reg.save_model(build_model(ModelSpec()).eval(), _card(0.6), name=name)
    assert reg.production_tag(name) == only
    # a record that cannot be read never stops a model from being stored (after a training run): reported
    broken = "registry-broken-record-model"
    reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=broken)
    reg.store._record_path(broken).write_text(json.dumps({"production": None, "history": [], "log": {}}))
    assert reg.save_model(build_model(ModelSpec()).eval(), _card(0.6), name=broken)
    assert "warning: the promotion record could not be read or written" in capsys.readouterr().err


def test_a_tag_with_a_path_in_it_names_no_folder_and_deletes_nothing() -> None:
    """A helper's find: 'VERSION/' or 'VERSION/../OTHER' was normalised into a real folder, the healthy model was
    called damaged, and `delete --force` removed it, even a model of another name."""
    name, other = "registry-slash-model", "registry-other-family"
    kept = reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=name)
    second = reg.save_model(build_model(ModelSpec()).eval(), _card(0.6), name=name)
    foreign = reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=other)
    version, foreign_version = kept.split(":")[1], foreign.split(":")[1]
    for ref in (f"{version}/", f"{second.split(':')[1]}/../{version}", f"{name}:{version}/",
                f"{name}:{version}/../../{other}/{foreign_version}"):
        with pytest.raises(reg.RegistryError, match="is not a model tag") as refused:
            reg.delete_model(ref, name, force=True)
        assert not isinstance(refused.value, reg.store.DamagedModel), ref
    assert set(reg.store.stored_tags(name)) == {kept, second} and reg.store.stored_tags(other) == [foreign]


def test_once_a_model_was_promoted_only_a_promotion_makes_production() -> None:
    """After `delete production --force`, the one model left (one promote would refuse, a site calibration below
    its target) went into service unchecked, and ensure-default kept it (a helper's find)."""
    name = "registry-forced-delete-model"
    first = reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=name)
    left = reg.save_model(build_model(ModelSpec()).eval(), _card(0.6), name=name)
    reg.promote(first, name)
    assert reg.delete_model("production", name, force=True) == first
    assert reg.production_tag(name) is None
    with pytest.raises(reg.RegistryError, match="no production model; 1 model is stored but none is promoted"):
        reg.resolve_tag("production", name)
    reg.save_model(build_model(ModelSpec()).eval(), _card(0.7), name=name)  # storing another pins nothing
    assert reg.production_tag(name) is None and len(reg.store.stored_tags(name)) == 2
    reg.promote(left, name)
    assert reg.production_tag(name) == left


def test_a_store_that_cannot_be_read_is_not_called_damaged(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError reading the store (too many open files, a network file system) was reported as a damaged model
    with the advice to delete it with --force, which removes a healthy model's folder."""
    import bentoml

    tag = reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name="registry-oserror-model")

    def too_many_open_files(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(bentoml.models, "get", too_many_open_files)
    with pytest.raises(OSError, match="Too many open files"):
        reg.resolve_tag(tag, "registry-oserror-model")


def test_promotions_at_the_same_time_are_both_recorded() -> None:
    """Two promotes at once each read the record before the other wrote it: one promotion was lost from the
    history that rollback follows."""
    name = "registry-concurrent-model"
    tags = [reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=name) for _ in range(3)]
    reg.promote(tags[0], name)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda tag: reg.promote(tag, name), tags[1:]))
    record = reg.store._read_record(name)
    assert sorted([*record["history"], record["production"]]) == sorted(tags), record


def test_promote_refuses_a_model_that_does_not_load(two_models) -> None:
    (first, _), (second, _) = two_models
    reg.promote(first, NAME)
    with _truncated_weights(second):
        with pytest.raises(reg.RegistryError, match=f"cannot promote {second}: .*weights"):
            reg.promote(second, NAME)
        assert reg.production_tag(NAME) == first


def test_promote_refuses_a_clearly_worse_model_without_force(two_models) -> None:
    """A one-epoch smoke run (validation ROC-AUC 0.52) replaced a production model of 0.998 without a word."""
    (first, _), _ = two_models
    reg.promote(first, NAME)  # validation ROC-AUC 0.9
    torch.manual_seed(4)
    weak = reg.save_model(build_model(ModelSpec()), _card(0.5).model_copy(update={"val_metrics": {"roc_auc": 0.52}}),
                          name=NAME)
    steps: list[str] = []
    try:
        with pytest.raises(reg.RegistryError, match=f"cannot promote {weak}: its validation ROC-AUC 0.5200 is 0.3800 "
                                                     f"below {first}'s 0.9000, the best .*promote {weak} --force"):
            reg.promote(weak, NAME)
        assert reg.production_tag(NAME) == first
        assert reg.promote(weak, NAME, force=True) == weak
        assert reg.rollback(NAME) == first  # rollback restores without the check
        # steps each just inside the margin cannot walk production down: the best promoted so far is the reference
        steps += [reg.save_model(build_model(ModelSpec()), _card(0.5).model_copy(update={"val_metrics": {"roc_auc": auc}}),
                                 name=NAME) for auc in (0.8950, 0.8899)]
        assert reg.promote(steps[0], NAME) == steps[0]
        with pytest.raises(reg.RegistryError, match=f"below {first}'s 0.9000, the best"):
            reg.promote(steps[1], NAME)
        # a ROC-AUC that is not a number in [0, 1] is none: `true` counted as 1.0 and became the reference
        steps.append(reg.save_model(build_model(ModelSpec()), _card(0.5).model_copy(
            update={"val_metrics": {"roc_auc": True}}), name=NAME))
        with pytest.raises(reg.RegistryError, match="has no validation ROC-AUC"):
            reg.promote(steps[-1], NAME)
        # a production model that cannot be read is no reference: it can be replaced
        card_file = reg.store.store_path_of(steps[0]) / "model.yaml"
        intact = card_file.read_text()
        card_file.write_text("garbage: [")
        try:
            record = reg.store._read_record(NAME)
            record["history"] = []
            reg.store._write_record(NAME, record)
            assert reg.promote(steps[1], NAME) == steps[1]
        finally:
            card_file.write_text(intact)
        reg.promote(first, NAME)
    finally:
        for tag in (weak, *steps):
            reg.delete_model(tag, NAME, force=True)


def test_corrupt_weights_are_detected_on_load(tmp_path: Path) -> None:
    torch.manual_seed(3)
    tag = reg.save_model(build_model(ModelSpec()), _card(0.5), name=NAME)
    weights = Path(reg.store.store_path_of(tag)) / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(reg.ModelIntegrityError, match="corrupt"):
        reg.load_model(tag, NAME)
    weights.unlink()
    with pytest.raises(reg.ModelIntegrityError, match="cannot read weights"):
        reg.load_model(tag, NAME)


def test_unknown_refs_give_a_clear_error() -> None:
    with pytest.raises(reg.RegistryError, match="not in the store"):
        reg.resolve_tag("doesnotexist", NAME)
    for production in ("production", " PRODUCTION ", "Production"):  # capitals were read as a version
        with pytest.raises(reg.RegistryError, match="no production model"):
            reg.resolve_tag(production, "never-saved-model")
    for empty in ("", " ", f"{NAME}:"):
        with pytest.raises(reg.RegistryError, match="names no model"):
            reg.resolve_tag(empty, NAME)
    with pytest.raises(reg.RegistryError, match="is the model's name, not one of its versions"):
        reg.resolve_tag(NAME, NAME)  # read as the version NAME:NAME, "not in the store", before


def test_a_malformed_tag_or_promotion_record_gets_a_registry_error() -> None:
    """A promotion record of the wrong shape leaked AttributeError/TypeError; a malformed tag BentoMLException."""
    name = "malformed-record-model"  # a record only; nothing else reads this name
    for bad in ("a:b:c", "../../etc"):
        with pytest.raises(reg.RegistryError, match="is not a model tag"):
            reg.resolve_tag(bad, NAME)
    record = reg.store._record_path(name)
    record.parent.mkdir(parents=True, exist_ok=True)
    try:
        for content in ("[]", '{"production": 5, "history": "x"}', '{"production": null, "history": [1]}'):
            record.write_text(content)
            for call in (lambda: reg.production_tag(name), lambda: reg.rollback(name)):
                with pytest.raises(reg.RegistryError, match="promotion record .* is unreadable"):
                    call()
    finally:
        record.unlink(missing_ok=True)


def test_cli_lists_and_fails_cleanly(production_tag: str) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "models_registry", *a], cwd=ROOT, env=server_env(),  # noqa: E731
                                     capture_output=True, text=True, timeout=HANG_S)
    listed = run("list")
    assert listed.returncode == 0 and production_tag in listed.stdout and "roc_auc" in listed.stdout
    shown = run("show", "production")
    assert shown.returncode == 0 and '"weights_sha256"' in shown.stdout
    assert run("verify").returncode == 0
    bad = run("promote", "nope")
    assert bad.returncode == 1 and "not in the store" in bad.stderr and "Traceback" not in bad.stderr
    helped = run("--help")
    assert helped.returncode == 0 and "promote" in helped.stdout and "rollback" in helped.stdout
    # `show | head`: the reader leaves before the output is written; that said "error: BrokenPipeError", exit 1
    read_r, write_r = os.pipe()
    os.close(read_r)  # a reader that has already left
    left = subprocess.run([sys.executable, "-m", "models_registry", "show", "production"], cwd=ROOT, env=server_env(),
                          stdout=write_r, stderr=subprocess.PIPE, text=True, timeout=HANG_S)
    os.close(write_r)
    assert left.returncode == 141 and left.stderr == "", left.stderr


def test_a_store_folder_that_cannot_be_used_is_named_with_its_setting(tmp_path: Path) -> None:
    """BENTOML_HOME naming a file said "error: NotADirectoryError: [Errno 20] ... is not a directory", naming no
    setting to change."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = _cli(a_file, "list")
    assert done.returncode == 1 and done.stderr == (
        f"error: the BentoML store cannot be used (BENTOML_HOME={a_file}): {a_file} is not a directory; point "
        "BENTOML_HOME at a folder this user can write\n"), done.stderr


def test_ctrl_c_while_torch_loads_is_one_line_not_a_traceback(production_tag: str) -> None:
    """The package imported torch and BentoML before its `__main__` could catch Ctrl-C: an interrupt in the first
    1.7 s printed a traceback. The signal is sent once torch's library is mapped into the process."""
    import signal
    import time

    from harness.servers import child_stderr, default_sigint

    process = subprocess.Popen([sys.executable, "-m", "models_registry", "list"], cwd=ROOT, env=server_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + HANG_S
        while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        stderr = child_stderr(process.communicate(timeout=HANG_S)[1])
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and stderr.startswith("interrupted"), stderr[-2000:]


def test_bentoml_own_cli_lists_a_store_with_a_promotion(production_tag: str) -> None:
    """The promotion record lives outside the model store: BentoML reads every folder there as a model name."""
    listed = subprocess.run([str(Path(sys.executable).with_name("bentoml")), "models", "list"], cwd=ROOT,
                            env=server_env(), capture_output=True, text=True, timeout=HANG_S)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert production_tag.split(":")[1] in listed.stdout


def test_a_promotion_recorded_inside_the_store_by_earlier_versions_is_moved_out() -> None:
    name, tag = "legacy-record-model", "legacy-record-model:v1"  # a record only; nothing else reads this name
    legacy = reg.store._model_store_dir() / ".registry"
    legacy.mkdir()
    (legacy / f"{name}.json").write_text(json.dumps({"production": tag, "history": [tag]}))
    (legacy / "left-by-a-crash.tmp").write_text("{")
    assert reg.production_tag(name) == tag
    assert not legacy.exists() and (reg.store._registry_dir() / f"{name}.json").is_file()


# --------------------------------------------------------------------------- what the served service does


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m models_registry ARGS` on the model store of `home`."""
    return subprocess.run([sys.executable, "-m", "models_registry", *args], cwd=ROOT,
                          env=server_env(BENTOML_HOME=str(home)), capture_output=True, text=True, timeout=HANG_S)


def test_a_production_model_deleted_with_bentomls_cli_is_explained_and_the_default_restored(
        production_tag: str, tmp_path: Path) -> None:
    home, tag = tmp_path / "home", production_tag  # the shipped model, as in the session's store
    assert _cli(home, "ensure-default").stdout.strip() == f"imported {tag} and promoted it to production"
    deleted = subprocess.run([str(Path(sys.executable).with_name("bentoml")), "models", "delete", "-y", tag], cwd=ROOT,
                             env=server_env(BENTOML_HOME=str(home)), capture_output=True, text=True, timeout=HANG_S)
    assert deleted.returncode == 0, deleted.stderr
    shown = _cli(home, "show", "production")
    assert shown.returncode == 1 and "no longer in the store" in shown.stderr and "Traceback" not in shown.stderr
    restored = _cli(home, "ensure-default")  # what `./dev.sh serve` runs first: the store is empty again
    assert restored.returncode == 0 and f"imported {tag} and promoted it" in restored.stdout, restored.stderr
    again = _cli(home, "import", str(DEFAULT_ARCHIVE))
    assert again.returncode == 0 and again.stdout.strip() == f"{tag} is already in the store with the same files"

    subprocess.run(deleted.args, cwd=ROOT, env=server_env(BENTOML_HOME=str(home)), check=True, capture_output=True)
    reimported = _cli(home, "import-default")  # what the error above suggests; it loads the model before promoting
    assert reimported.returncode == 0 and f"imported {tag} and promoted it" in reimported.stdout, reimported.stderr
    # With another model stored, which to serve is the operator's choice: an error, so `./dev.sh serve` stops here
    # (it printed a warning on stdout with exit 0 and went on to a server that could not start: a helper's find).
    other = _repacked(DEFAULT_ARCHIVE, tmp_path / "other.bentomodel", version="anotherversion1")
    assert _cli(home, "import", str(other)).returncode == 0
    subprocess.run(deleted.args, cwd=ROOT, env=server_env(BENTOML_HOME=str(home)), check=True, capture_output=True)
    stale = _cli(home, "ensure-default")
    assert stale.returncode == 1 and stale.stdout == "", stale.stdout
    assert stale.stderr.strip() == (f"error: the production model {tag} is no longer in the store; promote one of the "
                                    "stored models (python -m models_registry list, then promote TAG)"), stale.stderr
    # The same after `delete production --force`: it imported and promoted the shipped model beside the others
    # without a word (a review's find).
    other_tag = f"{tag.split(':')[0]}:anotherversion1"
    assert _cli(home, "promote", other_tag).returncode == 0 and _cli(home, "import", str(DEFAULT_ARCHIVE)).returncode == 0
    assert _cli(home, "delete", "production", "--force").returncode == 0
    forced = _cli(home, "ensure-default")
    assert forced.returncode == 1 and "no production model: the promoted one was deleted" in forced.stderr, forced.stderr


def test_a_damaged_version_is_named_and_spares_the_rest(production_tag: str, tmp_path: Path) -> None:
    """One version folder BentoML cannot read failed every `list`, `show` and `verify` of the store; `export` packed
    a model without its weights, and `promote` of the production model said yes without loading it. On a store of
    its own: BentoML's own listing of a shared one would meet the damaged folder."""
    home, tag = tmp_path / "home", production_tag
    assert _cli(home, "ensure-default").returncode == 0
    stored = home / "models" / tag.replace(":", "/")
    shutil.copytree(stored, stored.with_name("damagedcopy"))
    (stored.with_name("damagedcopy") / "model.yaml").unlink()
    shutil.copytree(stored, stored.with_name("notyaml"))  # a model.yaml that is not YAML failed every command
    (stored.with_name("notyaml") / "model.yaml").write_text(": : garbage [")
    shutil.copytree(stored, stored.with_name("notamodel"))  # YAML, but not a model's (cattrs' ExceptionGroup)
    (stored.with_name("notamodel") / "model.yaml").write_text("name: x\nversion: y\n")
    listed = _cli(home, "list")
    assert listed.returncode == 0 and tag in listed.stdout, listed.stderr
    damaged = f"{tag.split(':')[0]}:damagedcopy"
    assert f"{damaged}: unreadable, cannot be served" in listed.stdout
    for version in ("notyaml", "notamodel"):
        assert f"{tag.split(':')[0]}:{version}: unreadable, cannot be served" in listed.stdout
        removed = _cli(home, "delete", f"{tag.split(':')[0]}:{version}", "--force")
        assert removed.returncode == 0, removed.stderr
    kept = _cli(home, "delete", damaged)  # BentoML cannot delete what it cannot read: --force removes the folder
    assert kept.returncode == 1 and f"model {damaged} is damaged" in kept.stderr and "--force" in kept.stderr
    removed = _cli(home, "delete", damaged, "--force")
    assert removed.returncode == 0 and not stored.with_name("damagedcopy").exists(), removed.stderr
    (stored / "weights.pt").unlink()
    for args, words in ((("export", "production", str(tmp_path / "out.bentomodel")), "cannot export"),
                        (("promote", "production"), "cannot promote")):
        refused = _cli(home, *args)
        assert refused.returncode == 1 and refused.stderr.startswith(f"error: {words} {tag}: "), refused.stderr
        assert "weights" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "out.bentomodel").exists()
    (stored / "model.yaml").write_text(": : garbage [")  # `./dev.sh serve` went on to a server that could not start
    checked = _cli(home, "ensure-default")
    assert checked.returncode == 1 and f"model {tag} is damaged" in checked.stderr, checked.stdout + checked.stderr


def test_importing_over_a_damaged_folder_of_the_same_tag_says_how_to_mend_it(production_tag: str,
                                                                            tmp_path: Path) -> None:
    """An empty folder named as the archive's version (what an old interrupted import left) made `import` end with
    BentoML's 'does not contain a model.yaml', while `list` advised importing again."""
    home, tag = tmp_path / "home", production_tag
    (home / "models" / tag.replace(":", "/")).mkdir(parents=True)
    refused = _cli(home, "import", str(DEFAULT_ARCHIVE))
    assert refused.returncode == 1 and f"{tag} is in the store but damaged" in refused.stderr, refused.stderr
    assert f"delete {tag} --force`, then import again" in refused.stderr
    assert _cli(home, "delete", tag, "--force").returncode == 0
    imported = _cli(home, "import", str(DEFAULT_ARCHIVE))
    assert imported.returncode == 0 and imported.stdout.strip() == f"imported {tag}", imported.stderr


def test_list_marks_a_version_whose_card_the_service_cannot_read() -> None:
    """A version whose metadata no longer validates as a model card was listed with its figures, like a model the
    service could load, which refuses it."""
    import yaml

    name = "registry-unusable-card-model"
    tag = reg.save_model(build_model(ModelSpec()).eval(), _card(0.5), name=name)
    try:
        model_yaml = reg.store.store_path_of(tag) / "model.yaml"
        info = yaml.safe_load(model_yaml.read_text())
        info["metadata"]["threshold"] = "high"
        model_yaml.write_text(yaml.safe_dump(info))
        (row,) = reg.list_models(name)
        assert row["tag"] == tag and row["broken"].startswith("unusable metadata: ") and "threshold" in row["broken"]
        assert "roc_auc" not in row
    finally:
        reg.delete_model(tag, name, force=True)


def test_list_of_a_store_whose_every_version_is_damaged_names_them() -> None:
    """`list` ended in "TypeError: 'int' object is not iterable" when no version was readable."""
    from models_registry.__main__ import _table

    table = _table([{"tag": "pneumonia-classifier:x", "production": False, "broken": "no model.yaml"}])
    assert "pneumonia-classifier:x: unreadable, cannot be served (no model.yaml)" in table


def _served(target: str, home: Path, log: Path, **env: str) -> ServerProcess:
    return bentoml_serve(target, free_port(), log, stores=home, PNEUMONIA_WORKERS="1", **env)


def _answers(servers: dict[str, ServerProcess]) -> dict[str, tuple[str, float]]:
    """Start the servers side by side, ask each to classify a real X-ray, stop them: which model, which threshold."""
    xray = sample_xrays(1, offset=31)[0]
    try:
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            list(pool.map(lambda server: server.start(ready_timeout=HANG_S), servers.values()))
        answers = {}
        for name, server in servers.items():
            response = httpx.post(server.url + "/classify", files=[("images", (xray.name, xray.read_bytes()))],
                                  timeout=HANG_S)
            assert response.status_code == 200, response.text
            answers[name] = (response.json()[0]["model"], response.json()[0]["threshold"])
        return answers
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.slow
def test_served_model_follows_promotion_rollback_and_pinning(production_tag: str, bentoml_home: Path,
                                                               bento_tag: str, tmp_path: Path) -> None:
    """On a fresh store: rollback without history fails cleanly; a restarted service serves the newly promoted
    model; a Bento serves the model it was built with whatever is promoted; PNEUMONIA_MODEL pins a model
    whatever is promoted; `rollback` makes the previous model production again."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "bentos").symlink_to(bentoml_home / "bentos", target_is_directory=True)  # the session's built Bento
    imported = _cli(home, "ensure-default")  # the shipped model, promoted once: no history
    assert imported.returncode == 0 and production_tag in imported.stdout, imported.stderr
    first = production_tag
    threshold_a = reg.read_card(first).threshold
    threshold_b = 0.9 if threshold_a < 0.5 else 0.1
    derived = subprocess.run(
        [sys.executable, "-c", "import sys, models_registry.store as s; "
         f"print(s.derive_model('production', {{'threshold': {threshold_b}}}))"],
        cwd=ROOT, env=server_env(BENTOML_HOME=str(home)), capture_output=True, text=True, timeout=HANG_S)
    assert derived.returncode == 0, derived.stderr
    second = derived.stdout.strip().splitlines()[-1]
    assert second.startswith("pneumonia-classifier:") and second != first

    nothing = _cli(home, "rollback")
    assert nothing.returncode == 1 and "nothing to roll back to" in nothing.stderr, nothing.stderr
    assert "Traceback" not in nothing.stderr

    promoted = _cli(home, "promote", second)
    assert promoted.returncode == 0 and f"production is now {second}" in promoted.stdout, promoted.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    # One round of servers (each start costs ~40 s of CPU): the restarted service follows the promotion, the
    # Bento keeps the model it was built with, and a pin to the former model beats the promoted one.
    after = _answers({"restarted": _served("service:PneumoniaClassifier", home, logs / "restarted.log"),
                      "bento": _served(bento_tag, home, logs / "bento.log"),
                      "pinned": _served("service:PneumoniaClassifier", home, logs / "pinned.log", PNEUMONIA_MODEL=first)})
    assert after == {"restarted": (second, threshold_b), "bento": (first, threshold_a),
                     "pinned": (first, threshold_a)}, after

    # The service resolves `production` with the same resolve_tag that `show` uses (models_registry.store), and
    # "restarted" above shows a start follows that alias: `show` is enough to see the rollback reach the next start.
    rolled = _cli(home, "rollback")
    assert rolled.returncode == 0 and f"production is now {first}" in rolled.stdout, rolled.stderr
    shown = _cli(home, "show", "production")
    assert shown.returncode == 0 and json.loads(shown.stdout)["tag"] == first
    again = _cli(home, "rollback")  # the history is used up
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr and "Traceback" not in again.stderr
