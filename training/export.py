"""Export a trained model as the repository's shipped default, with its provenance beside it.

    python -m training.export --run runs/default --out default_model [--crossval runs/cv]
    python -m training.export --regate runs/gate/gate.json --out default_model   # the shipped weights, a new gate

Writes `<out>/pneumonia-classifier.bentomodel` (a `bentoml models export`
archive) plus `provenance.json` and `PROVENANCE.md`: the exact training
command, data fingerprint, code version, measured training time, validation
metrics, the stress table and the validity gate's figures (both written by the
training run), and the recipe's cross-validation summary when given.

A model trained from a tree with uncommitted changes cannot say which code made
it, so it is refused unless `--allow-dirty` is given (and then says so in bold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from core.card import ModelCard
from core.cli import unwritable_reason
from training import run_command

MAX_BYTES = 10 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    """`python -m training.export`: exit 2 with one line on any failure, never a stack trace."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run folder written by training.train")
    source.add_argument("--regate", type=Path, help="the --json of `training.gate` re-fitting the gate of the model "
                        "shipped in --out: ships that version, keeping the provenance of its (same) weights")
    parser.add_argument("--out", type=Path, default=Path("default_model"))
    parser.add_argument("--command", default=None, help="training command, if the run's config.json lacks it")
    parser.add_argument("--crossval", type=Path, default=None,
                        help="run folder of `training.crossval` for the same recipe: its summary goes in PROVENANCE.md")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="export a model trained from uncommitted code (PROVENANCE.md then says so)")
    parser.add_argument("--force", action="store_true",
                        help="ship a model without an input-validity gate, or one whose validation ROC-AUC is "
                        "clearly below the model shipped in --out (as `models_registry promote --force`)")
    return run_command(_export, parser.parse_args(argv))


def _export(args: argparse.Namespace) -> int:
    from models_registry import load_model

    if args.regate is not None:
        return _export_regated(args)
    if not (args.run / "model_tag.txt").is_file() and (args.run / "config.json").is_file():
        raise ValueError(f"{args.run} stored no model (trained with --no-register, or unfinished): nothing to export")
    tag = (args.run / "model_tag.txt").read_text().strip()
    model = load_model(tag)
    card = model.card
    if not args.force:
        check_shippable(tag, card, args.out)
    dirty = _is_dirty(card.code_version)
    if dirty and not args.allow_dirty:
        print(f"error: {tag} was trained from code version {card.code_version or 'unknown'!r} (uncommitted or unknown "
              "changes), so no commit reproduces it; commit, retrain and export again, or pass --allow-dirty",
              file=sys.stderr)
        return 2
    # Everything is read before anything is written (`_ship`).
    crossval = (args.crossval / "summary.md").read_text() if args.crossval is not None else None
    config = json.loads((args.run / "config.json").read_text())
    metrics = json.loads((args.run / "metrics.json").read_text())
    stress_table = (args.run / "stress.md").read_text().strip()
    validity = args.run / "validity.md"
    _make_folder(args.out)
    return _ship(tag, args.out, lambda archive, digest, size: {
            "model_tag": tag,
            "archive": archive.name,
            "archive_sha256": digest,
            "archive_bytes": size,
            "weights_sha256": card.weights_sha256,
            "command": config.get("command") or args.command,
            "data_dir": config["data_dir"],
            "data_fingerprint": card.data_fingerprint,
            "code_version": card.code_version,
            "training_seconds": metrics["training_seconds"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "architecture": card.spec.model_dump(),
            "preprocess": card.preprocess.model_dump(),
            "temperature": card.temperature,
            "threshold": card.threshold,
            "target_sensitivity": card.target_sensitivity,
            "validation": card.val_metrics,
            "run": str(args.run),
            "code_dirty": dirty,
            "stress_table": stress_table,
            "validity_report": validity.read_text().strip() if validity.exists() else None,
            "crossval_summary": crossval.strip() if crossval else None,
            "crossval_run": str(args.crossval) if args.crossval else None,
    })


def _ship(tag: str, out: Path, provenance: Callable[[Path, str, int], dict]) -> int:
    """Export `tag` and write its provenance (built from the archive's path, sha256 and size) into `out`.

    Everything is written into a scratch folder beside the target first; the files in `out` are replaced only once
    all are complete, so a failed export (a missing file, an archive over the limit) leaves the shipped model and
    its provenance as they were, matching each other."""
    from core.card import MODEL_NAME
    from models_registry import export_model

    archive = out / f"{MODEL_NAME}.bentomodel"
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        staged = Path(scratch) / archive.name
        if archive.is_file():  # export_model keeps an archive of the same files byte for byte (no churn in git)
            shutil.copy2(archive, staged)
        export_model(tag, staged, overwrite=True)
        size = staged.stat().st_size
        if size > MAX_BYTES:
            print(f"error: {archive} would be {size / 1e6:.1f} MB, over the 10 MB limit for the repository; "
                  "nothing in --out was changed", file=sys.stderr)
            return 1
        record = provenance(archive, hashlib.sha256(staged.read_bytes()).hexdigest(), size)
        (Path(scratch) / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
        (Path(scratch) / "PROVENANCE.md").write_text(_markdown(record))
        for name in (archive.name, "provenance.json", "PROVENANCE.md"):
            os.replace(Path(scratch) / name, out / name)
    print(f"wrote {archive} ({size / 1e6:.1f} MB), provenance.json and PROVENANCE.md")
    return 0


def check_shippable(tag: str, card: ModelCard, out: Path) -> None:
    """`promote`'s quality rules for the default every fresh store serves: a model with a validity gate, whose
    validation ROC-AUC is not clearly below the shipped one's (a helper shipped a one-epoch, 32 px run of ROC-AUC
    0.44 over the default without a word). Each on its own validation split, as `promote` compares them."""
    from models_registry.store import PROMOTE_MAX_ROC_AUC_DROP, validation_roc_auc

    if card.validity is None:
        raise ValueError(f"{tag} has no input-validity gate (trained with --no-gate): the default would answer "
                         "anything it is shown; fit one (python -m training.gate) or pass --force")
    try:
        shipped = json.loads((out / "provenance.json").read_text())
        shipped_tag, shipped_auc = shipped["model_tag"], float(shipped["validation"]["roc_auc"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing shipped there yet (or no figure to compare with)
    new = validation_roc_auc(card)  # as `promote` reads it: a number in [0, 1], else none (nan and 7.0 passed)
    if new is None:
        raise ValueError(f"{tag}'s card has no validation ROC-AUC to compare with the shipped {shipped_tag}'s "
                         f"{shipped_auc:.4f}; pass --force to ship it anyway")
    if new < shipped_auc - PROMOTE_MAX_ROC_AUC_DROP:
        raise ValueError(f"{tag}'s validation ROC-AUC {new:.4f} is {shipped_auc - new:.4f} below the shipped "
                         f"{shipped_tag}'s {shipped_auc:.4f} (each on its own validation split); pass --force to "
                         "ship it anyway")


def _is_dirty(code_version: str) -> bool:
    """Whether no commit reproduces what this code version made (uncommitted changes, or no git checkout)."""
    return code_version.endswith("-dirty") or code_version in ("", "unknown")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: {unwritable_reason(out / 'provenance.json', exc)}") from None


def _export_regated(args: argparse.Namespace) -> int:
    """Ship the version `training.gate` saved: the weights, calibration and training provenance of the model shipped
    in --out (refused unless the weights are the same, byte for byte), its new gate and how that was fitted."""
    from models_registry import load_model
    from training.gate import format_report

    try:
        fitted = json.loads(args.regate.read_text())
    except ValueError as exc:  # the message named no file (a helper's find)
        raise ValueError(f"{args.regate} is not JSON ({exc})") from None
    if not isinstance(fitted, dict):
        raise ValueError(f"{args.regate} is not a `training.gate --json` report (a JSON object)")
    if fitted.get("measure_only"):
        raise ValueError(f"{args.regate} is a `training.gate --measure-only` report: it fitted no gate to ship")
    missing = [key for key in ("model", "source", "command", "code_version") if key not in fitted]
    if missing:
        raise ValueError(f"{args.regate} lacks {', '.join(missing)}: write it with this version of "
                         "`python -m training.gate ... --json FILE`")
    previous = json.loads((args.out / "provenance.json").read_text())
    model = load_model(fitted["model"])
    card = model.card
    if card.weights_sha256 != previous["weights_sha256"] or card.threshold != previous["threshold"] \
            or card.temperature != previous["temperature"]:
        raise ValueError(f"{fitted['model']} is not the shipped model re-gated (its weights or calibration differ "
                         f"from {previous['model_tag']}'s): export a trained model with --run")
    gate_dirty = _is_dirty(fitted["code_version"])
    if card.validity is None or gate_dirty and not args.allow_dirty:
        raise ValueError(f"{fitted['model']} has no gate, or its gate was fitted from uncommitted code "
                         f"({fitted['code_version']}); commit, fit again and export, or pass --allow-dirty")
    return _ship(fitted["model"], args.out, lambda archive, digest, size: {
            **previous,
            "model_tag": fitted["model"],
            "archive_sha256": digest,
            "archive_bytes": size,
            "validity_report": format_report(card.validity.figures, card.validity),
            "regated_from": fitted["source"],
            "gate_command": fitted["command"],
            "gate_code_version": fitted["code_version"],
            "gate_code_dirty": gate_dirty,
            "regate_json": str(args.regate),
    })


def _markdown(p: dict) -> str:
    v = p["validation"]
    pc = v["per_class"]
    m = v["confusion_matrix"]
    return f"""# Default model provenance

| | |
| --- | --- |
| model tag | `{p['model_tag']}` |
| archive | `{p['archive']}` ({p['archive_bytes'] / 1e6:.1f} MB, sha256 `{p['archive_sha256'][:16]}...`) |
| architecture | {p['architecture']['arch']}, {p['architecture']['in_channels']} channel, mirror TTA {p['architecture']['tta_hflip']}, trained from scratch |
| input | {p['preprocess']['image_size']} px grayscale, {p['preprocess']['normalization']} normalisation |
| training data | `{p['data_dir']}` (train split, by-patient validation hold-out), fingerprint `{p['data_fingerprint'][:16]}...` |
| code version | `{p['code_version']}`{' **(uncommitted changes: no commit reproduces this model)**' if p.get('code_dirty') else ''} |
| training time | {p['training_seconds'] / 60:.1f} min wall clock, measured by the training command itself on {p['machine']} |
| calibration | temperature {p['temperature']:.4f}, threshold {p['threshold']:.4f} (pneumonia sensitivity target {p['target_sensitivity']}, policy `{v.get('threshold_policy', 'clean')}`: {_POLICY.get(v.get('threshold_policy', 'clean'))}) |

Command (run from the repository root):

```
{p['command']}
python -m training.export --run {p.get('run', 'runs/default')} --out default_model{' --crossval ' + p['crossval_run'] if p.get('crossval_run') else ''}
```
{_regated(p)}
## Validation metrics (patient-level hold-out of the training folder, n = {v['n']}, at the stored threshold)

These come from the training folder and are optimistic: the collection's official
test images were acquired differently. The held-out test split was not used.

| metric | value |
| --- | --- |
| ROC-AUC | {v['roc_auc']:.4f} |
| PR-AUC | {v['pr_auc']:.4f} |
| accuracy | {v['accuracy']:.4f} |
| pneumonia recall (sensitivity) | {pc['PNEUMONIA']['recall']:.4f} |
| normal recall (specificity) | {pc['NORMAL']['recall']:.4f} |
| pneumonia precision | {pc['PNEUMONIA']['precision']:.4f} |
| expected calibration error | {v['ece']:.4f} |
| Brier score | {v['brier']:.4f} |
| best epoch | {v.get('best_epoch')} |

Confusion matrix (rows true, columns predicted): NORMAL {m[0]}, PNEUMONIA {m[1]}.
{_sections(p)}"""


def _regated(p: dict) -> str:
    """How the shipped version's gate was fitted again on the same weights, when it was."""
    if not p.get("gate_command"):
        return ""
    return f"""
The shipped version `{p['model_tag']}` is `{p['regated_from']}` (the model the commands above made: same weights,
temperature and threshold) with its input-validity gate fitted again at commit `{p['gate_code_version']}`{' **(uncommitted changes: no commit reproduces this gate)**' if p.get('gate_code_dirty') else ''}:

```
{p['gate_command']}
python -m training.export --regate {p['regate_json']} --out default_model
```
"""


_POLICY = {
    "clean": "reached on the clean validation images",
    "stressed": "reached on the validation images under every acquisition stress at once",
}


def _sections(p: dict) -> str:
    """The stress table, the gate's figures and the cross-validation summary, as the commands wrote them."""
    parts = ["", "## Validation under acquisition stress (written by the training run, `stress.md`)", "",
             "Same validation patients, each image changed as a different hospital's acquisition might change it; "
             "specificity and sensitivity at the stored threshold.", "", p["stress_table"]]
    if p.get("validity_report"):
        source = "`training.gate`, above" if p.get("gate_command") else "the training run, `validity.md`"
        parts += ["", f"## Input-validity gate (written by {source})", "", p["validity_report"]]
    if p.get("crossval_summary"):
        parts += ["", f"## Cross-validation of the recipe (`{p['crossval_run']}/summary.md`)", "", p["crossval_summary"]]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
