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


def unseen_patients(data_dir: Path, root: Path, per_class: int = 60) -> Path:
    """A labeled folder of the LAST files of each class: none of them among the first ones a
    `--max-per-class` run trains and validates on (file names sort by patient)."""
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "test" / name).mkdir(parents=True)
        for path in sorted((data_dir / "train" / name).iterdir())[-per_class:]:
            (root / "test" / name / path.name).symlink_to(path)
    return root


def test_short_training_run_learns_and_saves_a_gated_calibrated_model(tmp_path: Path, data_dir: Path) -> None:
    home = tmp_path / "bentoml"  # its own store: the session's production model stays alone
    out = tmp_path / "run"
    env = server_env(BENTOML_HOME=str(home))
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--data-dir", str(data_dir), "--out", str(out),
         "--max-per-class", "150", "--epochs", "3", "--batch-size", "32", "--bn-images", "128", "--no-progress", "--promote"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch   1/3" in result.stdout and "epoch   3/3" in result.stdout
    for name in ("config.json", "metrics.json", "metrics.csv", "curves.png", "roc.png", "confusion.png", "model_tag.txt",
                 "stress.md", "validity.md"):
        assert (out / name).is_file(), name
    assert "partial-view probability >" in (out / "validity.md").read_text()  # the gate's newest check was fitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and metrics["temperature"] > 0 and 0 <= metrics["threshold"] <= 1
    assert set(metrics["validation"]["stress"]) >= {"clean", "gamma 1.4", "random acquisition mix"}
    tag = (out / "model_tag.txt").read_text().strip()
    verify = subprocess.run([sys.executable, "-m", "models_registry", "verify", "production"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and tag in verify.stdout
    # The commit is the one read when the run started (config.json), not whatever HEAD is when it saves.
    shown = subprocess.run([sys.executable, "-m", "models_registry", "show", tag], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    started_at = json.loads((out / "config.json").read_text())["code_version"]
    assert started_at and json.loads(shown.stdout)["code_version"] == started_at
    # A real floor on patients the run never saw (nor chose its threshold on): a loop that does not learn
    # scores about 0.5 here.
    report = tmp_path / "unseen.json"
    evaluate = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", tag, "--data-dir", str(unseen_patients(data_dir, tmp_path / "unseen")),
         "--split", "test", "--json", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert json.loads(report.read_text())["metrics"]["roc_auc"] >= 0.75
    rescoring_reproduces_the_run(tmp_path, data_dir, out, tag, env)
    ships_a_regated_model(tmp_path, data_dir, exports_only_committed_code(tmp_path, out, tag, env), env)


def rescoring_reproduces_the_run(tmp_path: Path, data_dir: Path, run: Path, tag: str, env: dict[str, str]) -> None:
    """training.stress and training.compare score a stored model again from its files on the patients its run held
    out: every stress row and the refitted operating point must equal what the run measured on its in-memory split,
    or the documented recipe comparisons would not compare what training saw."""
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    stress_json, compare_json = tmp_path / "stress.json", tmp_path / "compare.json"
    for module, *args in (("training.stress", "--model", tag, "--json", str(stress_json)),
                          ("training.compare", "--models", tag, tag, "--ensemble", "--json", str(compare_json))):
        done = subprocess.run([sys.executable, "-m", module, *args, "--data-dir", str(data_dir)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    stressed = json.loads(stress_json.read_text())
    assert stressed["n"] == validation["n"] and stressed["threshold"] == pytest.approx(validation["threshold"])
    rows = {row.pop("stress"): row for row in stressed["rows"]}
    assert rows.keys() == validation["stress"].keys()
    for name, row in validation["stress"].items():
        assert rows[name] == pytest.approx(row), name
    compared = json.loads(compare_json.read_text())
    single, again, ensemble = compared["results"]
    assert compared["n"] == validation["n"] and ensemble["name"].startswith("ensemble")
    assert single["threshold"] == pytest.approx(validation["threshold"])
    for name, row in validation["stress"].items():
        assert {k: single["rows"][name][k] for k in row} == pytest.approx(row), name
    # An ensemble of one model with itself is that model: averaging logits must not move a figure.
    assert again["rows"] == single["rows"] and ensemble["rows"].keys() == single["rows"].keys()
    for name, row in single["rows"].items():
        assert ensemble["rows"][name] == pytest.approx(row), name


def test_crossval_trains_each_fold_once_and_tables_them(tmp_path: Path, data_dir: Path) -> None:
    """The cross-validation command on a small subset: one fold, then the rest reusing it, then the table."""
    out = tmp_path / "cv"
    command = [sys.executable, "-m", "training.crossval", "--folds", "2", "--data-dir", str(data_dir), "--out", str(out),
               "--max-per-class", "40", "--epochs", "1", "--batch-size", "16", "--bn-images", "32", "--no-progress"]
    env = server_env(BENTOML_HOME=str(tmp_path / "bentoml"))
    first = subprocess.run([*command, "--fold", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "fold 1/2" in first.stdout and "fold 2/2" not in first.stdout and "1 of 2 folds done" in first.stdout
    assert "1 of 2 patient-level folds (the others not run)" in first.stdout
    rest = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert "fold 1/2" not in rest.stdout and "fold 2/2" in rest.stdout  # fold 0 was kept, not trained again
    folds = [json.loads((out / f"fold{k}.json").read_text()) for k in (0, 1)]
    # --max-per-class holds: 40 + 40 images, each held out by exactly one fold
    assert [f["train_images"] + f["held_out_images"] for f in folds] == [80, 80]
    assert folds[0]["held_out_images"] + folds[1]["held_out_images"] == 80
    summary = json.loads((out / "summary.json").read_text())
    for metric in ("roc_auc", "specificity", "ece"):
        values = [f[metric] for f in folds]
        assert summary["clean"][metric]["mean"] == pytest.approx(sum(values) / 2)
        assert summary["clean"][metric]["min"] == min(values) and summary["clean"][metric]["max"] == max(values)
    assert set(summary["stress"]) == set(folds[0]["stress"]) >= {"clean", "random acquisition mix"}
    table = (out / "summary.md").read_text()
    assert table.startswith("2 patient-level folds") and "| random acquisition mix |" in table and table in rest.stdout
    # Another split or recipe into the same --out would be tabled with these folds: refused, nothing changed.
    other = subprocess.run([*command, "--seed", "1", "--epochs", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: {out} holds folds of another cross-validation (it was run with other --epochs, --seed); they cannot "
        "be tabled with these: give another --out, or remove that folder to start again"], other.stderr[-2000:]
    assert (out / "summary.md").read_text() == table


def test_an_ensemble_of_stored_runs_is_saved_as_one_calibrated_gated_model(tmp_path: Path, data_dir: Path) -> None:
    """training.ensemble: two runs on one patient split become one stored model (temperature, stressed threshold,
    stress table and gate fitted anew, on the members' validation patients) that training.stress scores again from
    its files; fewer than two members is refused with one line."""
    env = server_env(BENTOML_HOME=str(tmp_path / "bentoml"))

    def train(name: str, *extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "training.train", "--data-dir", str(data_dir), "--out", str(tmp_path / name),
             "--max-per-class", "40", "--epochs", "1", "--batch-size", "16", "--bn-images", "32", "--no-progress",
             "--no-gate", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return (tmp_path / name / "model_tag.txt").read_text().strip()

    def ensemble(*tags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.ensemble", "--models", *tags, "--data-dir", str(data_dir),
                               "--out", str(tmp_path / "ensemble"), "--no-tta", "--no-progress"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first, second = train("a"), train("b", "--lr", "1e-3")
    refused = ensemble(first)
    assert refused.returncode == 2 and refused.stderr.strip() == "error: an ensemble needs two or more models"
    done = ensemble(first, second)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "ensemble"
    for name in ("config.json", "metrics.json", "stress.md", "validity.md", "roc.png", "model_tag.txt"):
        assert (run / name).is_file(), name
    tag = (run / "model_tag.txt").read_text().strip()
    card = json.loads(subprocess.run([sys.executable, "-m", "models_registry", "show", tag], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=120, check=True).stdout)
    members = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b")]
    assert card["spec"]["members"] == 2 and card["spec"]["tta_hflip"] is False and card["validity"] is not None
    assert card["training_seconds"] >= sum(m["training_seconds"] for m in members)
    assert [m["tag"] for m in card["training_config"]["members"]] == [first, second]
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    assert validation["n"] == members[0]["validation"]["n"]  # the members' held-out patients, no others
    stressed = subprocess.run([sys.executable, "-m", "training.stress", "--model", tag, "--data-dir", str(data_dir),
                               "--json", str(tmp_path / "stress.json")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert stressed.returncode == 0, stressed.stderr[-2000:]
    again = json.loads((tmp_path / "stress.json").read_text())
    assert again["n"] == validation["n"] and again["threshold"] == pytest.approx(validation["threshold"])
    assert {row["stress"] for row in again["rows"]} == set(validation["stress"])


def test_ensemble_members_must_share_the_patient_split_and_the_grid() -> None:
    """training.ensemble's check of its members, on real model cards: what decides the held-out patients or the
    input grid must be equal, or the ensemble's validation would hold images a member trained on."""
    from types import SimpleNamespace

    from core.card import ModelCard
    from core.model import ModelSpec
    from core.preprocess import PreprocessConfig
    from training.ensemble import SHARED_OPTIONS, _members_agree

    config = {key: None for key in SHARED_OPTIONS if key != "max_per_class"} | {"split": "train", "val_fraction": 0.15,
                                                                              "seed": 0, "image_size": 224}

    def member(tag: str, spec: ModelSpec = ModelSpec(), fingerprint: str = "f1", weights: str | None = None,
               **changes) -> SimpleNamespace:
        card = ModelCard(spec=spec, preprocess=PreprocessConfig(), training_config=config | changes,
                         data_fingerprint=fingerprint, weights_sha256=weights or f"weights of {tag}")
        return SimpleNamespace(tag=tag, card=card)

    assert _members_agree([member("m:1"), member("m:2", epochs=28)])["seed"] == 0  # a recipe may differ
    for members, reason in (
        ([member("m:1"), member("m:2", seed=1)], "'seed'"),
        ([member("m:1"), member("m:2", val_fraction=0.2)], "'val_fraction'"),
        ([member("m:1"), member("m:2", image_size=256)], "'image_size'"),
        ([member("m:1"), member("m:2", max_per_class=40)], "'max_per_class'"),  # absent (older cards) means None
        ([member("m:1"), member("m:2", fingerprint="f2")], "different data"),
        ([member("m:1"), member("m:1")], "listed twice"),
        ([member("m:1"), member("m:2", weights="weights of m:1")], "same weights"),  # a re-gated copy (a helper's)
        ([member("m:1"), member("m:2", spec=ModelSpec(members=2))], "an ensemble already"),
        ([member("m:1")], "two or more"),
    ):
        with pytest.raises(ValueError, match=reason):
            _members_agree(members)


def exports_only_committed_code(tmp_path: Path, run: Path, tag: str, env: dict[str, str]) -> Path:
    """training.export ships a model only when a commit reproduces it, with the run's stress and gate tables."""

    versions = ("0123abc-dirty", "0123abd", "0123abe-dirty")
    # One process derives the three versions (each Python start with torch costs seconds of CPU).
    derived_tags = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom models_registry.store import derive_model\n"
         "for version in sys.argv[2:]:\n    print(derive_model(sys.argv[1], {'code_version': version}))", tag, *versions],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    derived_as = dict(zip(versions, derived_tags, strict=True))

    def export_as(code_version: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
        derived = derived_as[code_version]
        copy = tmp_path / f"run-{code_version}"
        copy.mkdir()
        for name in ("config.json", "metrics.json", "stress.md", "validity.md"):
            (copy / name).write_bytes((run / name).read_bytes())
        (copy / "model_tag.txt").write_text(derived + "\n")
        target = tmp_path / f"export-{code_version}"
        done = subprocess.run([sys.executable, "-m", "training.export", "--run", str(copy), "--out", str(target), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return done, target

    refused, target = export_as("0123abc-dirty")
    assert refused.returncode == 2 and "uncommitted" in refused.stderr and "Traceback" not in refused.stderr
    assert not (target / "PROVENANCE.md").exists()
    shipped, shipped_target = export_as("0123abd")
    assert shipped.returncode == 0, shipped.stderr
    target = shipped_target
    provenance = (target / "PROVENANCE.md").read_text()
    assert "`0123abd`" in provenance and "uncommitted" not in provenance
    assert "random acquisition mix" in provenance and "offline negatives" in provenance.lower()
    forced, target = export_as("0123abe-dirty", "--allow-dirty")
    assert forced.returncode == 0 and "no commit reproduces this model" in (target / "PROVENANCE.md").read_text()
    return shipped_target


def ships_a_regated_model(tmp_path: Path, data_dir: Path, shipped: Path, env: dict[str, str]) -> None:
    """`training.export --regate` ships the version `training.gate` saved from the shipped model: the same weights
    and training provenance, the new gate's table and the two commands that made it; a version whose calibration
    differs is refused, and the shipped files stay as they were."""
    before = json.loads((shipped / "provenance.json").read_text())
    gate_json = tmp_path / "gate" / "gate.json"
    fitted = subprocess.run([sys.executable, "-m", "training.gate", "--model", before["model_tag"], "--data-dir",
                             str(data_dir), "--json", str(gate_json)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    measured = subprocess.run([sys.executable, "-m", "training.gate", "--model", before["model_tag"], "--data-dir",
                               str(data_dir), "--measure-only"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)  # the old gate on today's negatives: figures only, no version saved
    assert measured.returncode == 0 and "| X-rays tiled 2 x 2 |" in measured.stdout, measured.stderr[-2000:]
    assert "saved" not in measured.stdout and "validation X-rays" not in measured.stdout
    regate = [sys.executable, "-m", "training.export", "--out", str(shipped), "--allow-dirty", "--regate"]
    recalibrated = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom models_registry.store import derive_model\n"
         "print(derive_model(sys.argv[1], {'threshold': 0.123}))", json.loads(gate_json.read_text())["model"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    other_json = tmp_path / "gate" / "other.json"
    other_json.write_text(json.dumps({**json.loads(gate_json.read_text()), "model": recalibrated}))
    refused = subprocess.run([*regate, str(other_json)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not the shipped model re-gated" in refused.stderr, refused.stderr
    assert json.loads((shipped / "provenance.json").read_text()) == before
    done = subprocess.run([*regate, str(gate_json)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = json.loads((shipped / "provenance.json").read_text())
    assert after["model_tag"] == json.loads(gate_json.read_text())["model"] != before["model_tag"]
    assert after["regated_from"] == before["model_tag"] and after["weights_sha256"] == before["weights_sha256"]
    text = (shipped / "PROVENANCE.md").read_text()
    assert "python -m training.gate --model " in text and "--regate " in text and "partial-view probability" in text


def test_two_process_ddp_run(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "training.train",
         "--data-dir", str(data_dir), "--out", str(out), "--max-per-class", "32", "--epochs", "1",
         "--batch-size", "8", "--bn-images", "32", "--no-progress", "--no-register",
         # batch mixing on every batch, so that its path through the loop runs here too
         "--aug-mixup-alpha", "0.2", "--aug-cutmix-alpha", "1.0", "--aug-mix-p", "1.0"],
        cwd=ROOT, env=server_env(BENTOML_HOME=str(tmp_path / "bentoml"), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["augment"]["mixup_alpha"] == 0.2 and config["augment"]["mix_p"] == 1.0
    assert "2 process(es)" in result.stdout
    assert (out / "weights.pt").is_file() and (out / "metrics.json").is_file()
