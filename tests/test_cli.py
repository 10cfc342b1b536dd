"""Command lines as a new user meets them: relative paths work from any folder, failures are one clear line."""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import ROOT
from harness.servers import default_sigint, server_env
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
    one_clear_line(reversed_range, 2, "argument --aug-local-contrast-amount: low 1.0 is above high -0.5")
    one_clear_line(run("training.crossval", "--data-dir", str(tmp_path), "--out", str(tmp_path / "cv"),
                       "--aug-scale", "0", "1"), 2, "argument --aug-scale: low 0.0 must be above 0")
    one_clear_line(run("training.evaluate", "--model", "nope", "--data-dir", str(tmp_path)), 2, "not in the store")
    one_clear_line(run("training.export", "--run", "missing-run", cwd=tmp_path), 2, "missing-run")
    one_clear_line(run("training.framing_views", "--model", "nope", "--data-dir", str(tmp_path)), 2, "not in the store")
    one_clear_line(run("training.ensemble", "--models", production_tag, "nope", "--data-dir", str(tmp_path / "data"),
                       "--out", str(tmp_path / "ensemble")), 2, "not in the store")
    # The shipped model with itself: refused before any data is read, with the reason.
    one_clear_line(run("training.ensemble", "--models", production_tag, production_tag, "--data-dir", str(tmp_path / "data"),
                       "--out", str(tmp_path / "ensemble")), 2, "listed twice")
    # The shipped network under a second tag (a card change only, as a gate re-fit makes one): a helper's find.
    from models_registry.store import delete_model, derive_model

    twin = derive_model(production_tag, {"temperature": 0.7})
    try:
        one_clear_line(run("training.ensemble", "--models", production_tag, twin, "--data-dir", str(tmp_path / "data"),
                           "--out", str(tmp_path / "ensemble")), 2, "have the same weights: list each network once")
    finally:
        delete_model(twin, force=True)


def test_a_training_that_cannot_start_says_why_and_leaves_no_run_folder(production_tag: str, data_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Found by a helper: with --skip-bad-images, a class whose every image is unreadable trained and saved a model
    (ROC-AUC nan, exit 0); a refused run left an empty --out behind; --promote with --no-register was ignored."""
    root = few_patients(data_dir, tmp_path / "data", per_class=12)
    for path in (root / "train" / "NORMAL").iterdir():  # every NORMAL file unreadable
        path.unlink()
        path.write_bytes(b"")
    out = tmp_path / "runs" / "new"
    skipped = run("training.train", "--data-dir", str(root), "--out", str(out), "--skip-bad-images", "--epochs", "1",
                  "--no-register", "--no-progress")
    assert skipped.returncode == 2 and "no readable NORMAL image left" in skipped.stderr, skipped.stderr[-2000:]
    assert "Traceback" not in skipped.stderr and not out.exists()
    evaluated = run("training.evaluate", "--model", production_tag, "--data-dir", str(root), "--split", "train",
                    "--skip-bad-images")
    assert evaluated.returncode == 2 and "no readable NORMAL image left" in evaluated.stderr, evaluated.stderr[-2000:]
    refused = run("training.train", "--data-dir", str(root), "--out", str(out), "--no-register", "--promote")
    assert refused.returncode == 2 and "--promote needs the model saved" in refused.stderr and not out.exists()


def test_a_failed_export_leaves_the_previous_one_whole(production_tag: str, tmp_path: Path) -> None:
    """training.export wrote the new archive before reading the run's files: a run without metrics.json left a new
    archive beside the old provenance. Now --out is replaced only when the whole export is ready."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    (run_dir / "model_tag.txt").write_text(production_tag + "\n")
    (run_dir / "config.json").write_text(json.dumps({"data_dir": "somewhere"}))
    (run_dir / "stress.md").write_text("| stress |\n")
    out.mkdir()
    before = {name: f"the previous {name}" for name in ("pneumonia-classifier.bentomodel", "provenance.json",
                                                         "PROVENANCE.md")}
    for name, text in before.items():
        (out / name).write_text(text)
    one_clear_line(run("training.export", "--run", str(run_dir), "--out", str(out), "--allow-dirty"), 2, "metrics.json")
    assert {path.name: path.read_text() for path in out.iterdir()} == before  # and no scratch folder left behind


def test_export_holds_the_default_to_promote_s_quality_rules(production_tag: str, tmp_path: Path) -> None:
    """A helper shipped a one-epoch, 32 px run of validation ROC-AUC 0.44 over the default without a word: now a
    model clearly below the shipped one, or without a validity gate, needs --force (as `promote` does)."""
    from models_registry import read_card
    from training.export import check_shippable

    card = read_card(production_tag)
    auc = card.val_metrics["roc_auc"]
    (tmp_path / "provenance.json").write_text(json.dumps({"model_tag": "shipped:x", "validation": {"roc_auc": auc}}))
    check_shippable(production_tag, card, tmp_path)  # the same figure: shippable
    check_shippable(production_tag, card, tmp_path / "nothing-shipped-yet")
    worse = card.model_copy(update={"val_metrics": {**card.val_metrics, "roc_auc": auc - 0.05}})
    with pytest.raises(ValueError, match=f"ROC-AUC {auc - 0.05:.4f} is 0.0500 below the shipped shipped:x's "
                                         f"{auc:.4f} .*pass --force"):
        check_shippable(production_tag, worse, tmp_path)
    for unreadable in (float("nan"), 7.0, True):
        odd = card.model_copy(update={"val_metrics": {**card.val_metrics, "roc_auc": unreadable}})
        with pytest.raises(ValueError, match="has no validation ROC-AUC to compare"):
            check_shippable(production_tag, odd, tmp_path)
    with pytest.raises(ValueError, match="has no input-validity gate"):
        check_shippable(production_tag, card.model_copy(update={"validity": None}), tmp_path / "nothing-shipped-yet")


@pytest.mark.parametrize(("module", "argv", "words"), [
    ("training.train", ["--epochs", "0"], "argument --epochs: must be >= 1, not 0"),
    ("training.train", ["--batch-size", "1"], "argument --batch-size: must be >= 2, not 1"),  # BatchNorm failed late
    ("training.train", ["--target-sensitivity", "2"], "argument --target-sensitivity: must be in (0, 1], not 2"),
    ("training.train", ["--lr", "nan"], "argument --lr: must be in (0, 10], not nan"),
    ("training.train", ["--ema-decay", "1.5"], "argument --ema-decay: must be in [0, 1), not 1.5"),
    ("training.train", ["--max-per-class", "0"], "argument --max-per-class: must be >= 1, not 0"),
    ("training.train", ["--epochs", "x"], "argument --epochs: 'x' is not an integer"),
    ("training.train", ["--aug-scale", "0", "1"], "argument --aug-scale: low 0.0 must be above 0"),
    ("training.train", ["--aug-translate", "nan"], "argument --aug-translate: Input should be a finite number"),
    ("training.train", ["--seed", "-1"], "argument --seed: must be in [0, 2147483647], not -1"),
    ("training.train", ["--bn-images", "0"], "argument --bn-images: must be >= 2, not 0"),
    ("training.crossval", ["--folds", "1"], "argument --folds: must be >= 2, not 1"),
    ("training.crossval", ["--image-size", "7"], "argument --image-size: Input should be greater than or equal to 16"),
    ("training.crossval", ["--folds", "3", "--fold", "5"], "argument --fold: 5 is not a fold of --folds 3"),
    ("training.compare", ["--models", "a", "--target-sensitivity", "1.5"], "must be in (0, 1], not 1.5"),
    ("training.evaluate", ["--batch-size", "-3"], "argument --batch-size: must be >= 1, not -3"),
    ("training.gate", ["--max-refusals", "2"], "argument --max-refusals: must be in (0, 1), not 2"),
    # found by a helper: each failed only after the work (a huge rate: a traceback; --json: after a saved version)
    ("training.train", ["--lr", "1e300"], "argument --lr: must be in (0, 10], not 1e300"),
    ("training.crossval", ["--weight-decay", "1e300"], "argument --weight-decay: must be in [0, 10], not 1e300"),
    ("training.gate", ["--json", "/proc/gate.json"], "argument --json: /proc/gate.json: cannot write in /proc"),
    ("training.stress", ["--json", "README.md/rows.json"], "README.md is a file, not a folder"),
    ("loadtests.benchmark", ["--concurrency", "1,-8"], "argument --concurrency: every number must be >= 1"),
    ("loadtests.benchmark", ["--window-s", "0"], "argument --window-s: must be > 0, not 0"),
])
def test_out_of_range_options_are_refused_before_any_work(module: str, argv: list[str], words: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Checked by argparse: exit 2 naming the option, before an image is read (a bad --target-sensitivity used to
    fail with an IndexError after the whole training, its weights lost)."""
    command = importlib.import_module(module)
    required = [] if module.startswith("loadtests") else ["--data-dir", "d"]
    required += ["--out", "o"] if module in ("training.train", "training.crossval") else []
    with pytest.raises(SystemExit) as exit_:
        if module == "training.crossval":  # --fold against --folds is checked by its main, before the data is read
            command.main([*required, *argv])
        elif module == "training.train":  # the typed configurations the options make are checked by its cli
            command.cli([*required, *argv])
        else:
            command.get_args_parser().parse_args([*required, *argv])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_output_files_that_exist_are_written_in_place(tmp_path: Path) -> None:
    """A review's find: the parse-time probe (a new file beside the output) refused /dev/stdout for a user who may
    not create files in /dev, though the device itself is writable; an existing file is written in place too."""
    from core.cli import output_file

    existing = tmp_path / "figures.json"
    existing.write_text("{}")
    assert output_file("/dev/null") == Path("/dev/null") and output_file(str(existing)) == existing


def few_patients(data_dir: Path, root: Path, per_class: int) -> Path:
    """A training folder of the first `per_class` X-rays of each class, as symlinks (files sort by patient)."""
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "train" / name).mkdir(parents=True)
        for path in sorted((data_dir / "train" / name).iterdir())[:per_class]:
            (root / "train" / name / path.name).symlink_to(path)
    return root


def test_training_refuses_a_run_folder_it_would_overwrite_or_cannot_make(data_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A second run into the same --out replaced config.json at once and the weights at the end (an interrupted re-run
    left a mix); now it is refused before any image is read, unless --overwrite, which removes the earlier run's files
    once the new run starts writing. Cross-validation and ensembles wrote into a training run's folder without a word."""
    from training.train import cli

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert cli(["--data-dir", str(tmp_path / "no-data"), "--out", str(out)]) == 2
    assert "already holds a run (config.json)" in capsys.readouterr().err and (out / "config.json").read_text() == "{}"
    (tmp_path / "a-file").write_text("")
    assert cli(["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "cannot make the run folder" in capsys.readouterr().err
    # --overwrite gets past the check, to the next problem (the missing data folder), and the earlier run stays
    # whole; a folder that holds no run keeps files named as a run's (a docs/ folder given as --out)
    for name in ("model_tag.txt", "validity.md", "stress.md", "notes.txt"):
        (out / name).write_text("earlier\n")
    assert cli(["--data-dir", str(tmp_path / "no-data"), "--out", str(out), "--overwrite"]) == 2
    assert "no-data" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model_tag.txt", "notes.txt", "stress.md",
                                                     "validity.md"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "validity.md").write_text("the project's own page\n")
    assert cli(["--data-dir", str(tmp_path / "no-data"), "--out", str(docs)]) == 2 and "no-data" in capsys.readouterr().err
    assert (docs / "validity.md").read_text() == "the project's own page\n"
    # a run that replaces it removes the earlier run's files when it starts writing (its model tag and gate report
    # were left for `training.export` to mix with the new run); a file no run writes stays
    assert cli(["--data-dir", str(few_patients(data_dir, tmp_path / "data", per_class=20)), "--out", str(out),
                "--overwrite", "--epochs", "1", "--batch-size", "8", "--bn-images", "8", "--image-size", "64",
                "--no-progress", "--no-register", "--no-gate"]) == 0
    assert not (out / "model_tag.txt").exists() and not (out / "validity.md").exists()
    assert (out / "notes.txt").exists() and (out / "weights.pt").exists() and (out / "stress.md").read_text() != "earlier\n"
    # a cross-validation and an ensemble are refused a training run's folder; training a cross-validation's
    crossval = run("training.crossval", "--data-dir", str(tmp_path / "no-data"), "--out", str(out))
    assert crossval.returncode == 2 and "holds a training run" in crossval.stderr, crossval.stderr[-2000:]
    ensemble = run("training.ensemble", "--models", "a", "b", "--data-dir", str(tmp_path / "no-data"), "--out", str(out))
    one_clear_line(ensemble, 2, "already holds a run (config.json, weights.pt")
    folds = tmp_path / "cv"
    folds.mkdir()
    (folds / "fold0.json").write_text("{}")
    assert cli(["--data-dir", str(tmp_path / "no-data"), "--out", str(folds), "--overwrite"]) == 2
    assert "holds a cross-validation" in capsys.readouterr().err and (folds / "fold0.json").exists()


def test_an_output_folder_inside_the_data_folder_is_refused(production_tag: str, tmp_path: Path) -> None:
    """A helper's find: `--out DATA/train/NORMAL` finished, and the next run read its curves, ROC and confusion PNGs
    as NORMAL X-rays; a calibration report inside the site folder did the same."""
    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / "train" / label).mkdir(parents=True)
    inside = data / "train" / "NORMAL"
    one_clear_line(run("training.train", "--data-dir", str(data), "--out", str(inside), "--no-register"), 2,
                   f"--out {inside} is inside {inside}, a class folder of --data-dir {data}")
    assert not (inside / "config.json").exists()
    elsewhere = run("training.train", "--data-dir", str(data), "--out", str(data / "runs" / "r1"), "--no-register")
    assert elsewhere.returncode == 2 and "class folder" not in elsewhere.stderr, elsewhere.stderr  # never read: fine
    assert "no images" in elsewhere.stderr, elsewhere.stderr  # (the class folders are empty)
    site = data / "train"
    report = site / "PNEUMONIA" / "report"
    one_clear_line(run("models_registry", "calibrate", production_tag, "--data", str(site), "--out", str(report)), 1,
                   f"--out {report} is inside {site / 'PNEUMONIA'}, a class folder of --data {site}")
    assert not report.exists()


@pytest.mark.parametrize("module", ["training.gate", "training.stress", "training.evaluate", "training.compare",
                                    "training.framing_views"])
def test_a_json_folder_is_refused_before_any_work(module: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--json DIR` ended in IsADirectoryError's traceback after the work (`training.gate`: after the new version
    was saved, its tag never printed)."""
    command = importlib.import_module(module)
    models = ["--models", "a"] if module == "training.compare" else []
    with pytest.raises(SystemExit) as exit_:
        command.main(["--data-dir", str(tmp_path / "no-data"), *models, "--json", str(tmp_path)])
    assert exit_.value.code == 2 and f"argument --json: {tmp_path} is a folder" in capsys.readouterr().err


def test_a_data_folder_that_is_a_file_or_a_run_without_a_model_is_named(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--data-dir naming a file said '<file>/train does not exist'; exporting a run trained with --no-register said
    'No such file or directory: .../model_tag.txt'."""
    from training.train import cli

    (tmp_path / "a-file").write_text("")
    assert cli(["--data-dir", str(tmp_path / "a-file"), "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'a-file'} is a file; give the folder that holds train/NORMAL" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the run folder the failed command made is gone again
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    one_clear_line(run("training.export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")), 2,
                   "stored no model")


def test_a_batch_larger_than_the_training_images_is_refused(data_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With fewer training images than --batch-size every epoch was zero steps: 'train_loss 0.0000', and an
    untrained model was saved and registered."""
    from training.train import cli

    folder, out = few_patients(data_dir, tmp_path / "data", per_class=20), tmp_path / "run"
    assert cli(["--data-dir", str(folder), "--out", str(out), "--epochs", "1", "--batch-size", "64", "--no-progress",
                "--no-register", "--no-gate"]) == 2
    assert "--batch-size 64 is more than the" in capsys.readouterr().err
    assert not (out / "weights.pt").exists() and not (out / "config.json").exists()  # no unfinished run to refuse


def test_ctrl_c_during_training_ends_with_one_line_and_a_refused_rerun(data_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback and left a run folder with nothing saying it was unfinished.
    (--patience 500: early stopping would otherwise end the tiny run before the signal on a busy machine.)"""
    folder, out = few_patients(data_dir, tmp_path / "data", per_class=20), tmp_path / "run"
    command = [sys.executable, "-m", "training.train", "--data-dir", str(folder), "--out", str(out), "--epochs", "500",
               "--patience", "500", "--batch-size", "8", "--bn-images", "8", "--no-progress", "--no-register", "--no-gate"]
    proc = subprocess.Popen(command, cwd=ROOT, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first epoch's line: training is under way
            if line.startswith("epoch"):
                break
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: no model was saved") and "--overwrite" in stderr
    rerun = subprocess.run(command, cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=120)
    one_clear_line(rerun, 2, "already holds a run")


def test_scoring_a_model_on_other_data_or_with_too_many_folds_is_refused(production_tag: str, data_dir: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """training.stress (and gate, compare, framing_views) scored a model on any folder as if it were its run's
    held-out patients, and gate saved a model from it; crossval with more folds than patients raised sklearn's error,
    and with folds too small to cross-fit an operating point an IndexError after training."""
    folder = few_patients(data_dir, tmp_path / "few", per_class=4)
    one_clear_line(run("training.stress", "--model", production_tag, "--data-dir", str(folder)), 2,
                   "is not the data", production_tag)
    # compare scored every model on the first one's held-out patients, also a model trained on them (another seed)
    from models_registry import load_model, save_model

    shipped = load_model(production_tag)
    other_split = save_model(shipped.module, shipped.card.model_copy(update={
        "training_config": shipped.card.training_config | {"seed": 1}, "validity": None}), name="compare-test-model")
    one_clear_line(run("training.compare", "--models", production_tag, other_split, "--data-dir", str(data_dir)), 2,
                   f"{other_split} was trained on", "compare models trained on one split")
    from training.crossval import main as crossval

    assert crossval(["--data-dir", str(folder), "--out", str(tmp_path / "cv"), "--folds", "5"]) == 2
    assert "--folds 5 needs at least 5 patients of each class; the data has 3 in its smaller class" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()  # refused before anything is written
    # 3 folds of 3 patients: a held-out fold has one patient of that class, so one half of it has none and no
    # threshold can be fitted there (an IndexError after the fold's training, before)
    assert crossval(["--data-dir", str(folder), "--out", str(tmp_path / "cv"), "--folds", "3", "--no-progress"]) == 2
    assert "too small to fit an operating point" in capsys.readouterr().err
    assert not list((tmp_path / "cv").glob("fold*.json"))


@pytest.mark.parametrize("argv", [[], ["--aug-rotate-deg", "4", "--aug-scale", "0.9", "1.2", "--aug-erase-p", "0"]])
def test_augmentation_flags_default_to_the_augment_config(argv: list[str]) -> None:
    args = get_args_parser().parse_args(["--data-dir", "d", "--out", "o", *argv])
    expected = AugmentConfig() if not argv else AugmentConfig(rotate_deg=4, scale=(0.9, 1.2), erase_p=0)
    assert augment_config(args) == expected


def test_a_training_command_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """A helper's find: `python -m training.evaluate ... | head` ended with "error: Broken pipe" once head had read
    its lines. run_command, which every training command runs in, now ends quietly with 141 (128 + SIGPIPE)."""
    program = ("import argparse, sys\nfrom training import run_command\n"
               "sys.exit(run_command(lambda args: [print('row', i) for i in range(200000)] and 0, argparse.Namespace()))")
    script = tmp_path / "many_rows.py"
    script.write_text(program)
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" "{script}" | head -1; echo "status ${{PIPESTATUS[0]}}" >&2'],
                          cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout == "row 0\n" and done.stderr == "status 141\n", done.stderr


def test_training_without_registering_needs_no_bentoml(tmp_path: Path) -> None:
    """On a lent GPU machine without BentoML, `training.train --no-register` failed at once importing it (the run
    had to stub models_registry). With BentoML made unimportable, the command now gets as far as the data."""
    program = ("import sys\nsys.modules['bentoml'] = None  # import bentoml raises ImportError\n"
               "from training.train import cli\n"
               f"sys.exit(cli(['--data-dir', {str(tmp_path / 'absent')!r}, '--out', {str(tmp_path / 'run')!r}, "
               "'--no-register']))")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "absent" in done.stderr and "bentoml" not in done.stderr.lower(), done.stderr
