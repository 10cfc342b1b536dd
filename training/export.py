"""Export a trained model as the repository's shipped default, with its provenance beside it.

    python -m training.export --run runs/default --out default_model

Writes `<out>/pneumonia-classifier.bentomodel` (a `bentoml models export`
archive) plus `provenance.json` and `PROVENANCE.md`: the exact training
command, data fingerprint, measured training time and validation metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

from training import one_line

MAX_BYTES = 10 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    """`python -m training.export`: exit 2 with one line on any failure, never a stack trace."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder written by training.train")
    parser.add_argument("--out", type=Path, default=Path("default_model"))
    parser.add_argument("--command", default=None, help="training command, if the run's config.json lacks it")
    args = parser.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    try:
        return _export(args)
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    from core.card import MODEL_NAME
    from models_registry import export_model, load_model

    tag = (args.run / "model_tag.txt").read_text().strip()
    model = load_model(tag)
    args.out.mkdir(parents=True, exist_ok=True)
    archive = args.out / f"{MODEL_NAME}.bentomodel"
    export_model(tag, archive)
    size = archive.stat().st_size
    if size > MAX_BYTES:
        print(f"error: {archive} is {size / 1e6:.1f} MB, over the 10 MB limit for the repository", file=sys.stderr)
        return 1
    config = json.loads((args.run / "config.json").read_text())
    metrics = json.loads((args.run / "metrics.json").read_text())
    card = model.card
    provenance = {
        "model_tag": tag,
        "archive": archive.name,
        "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
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
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (args.out / "PROVENANCE.md").write_text(_markdown(provenance))
    print(f"wrote {archive} ({size / 1e6:.1f} MB), provenance.json and PROVENANCE.md")
    return 0


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
| code version | `{p['code_version']}` |
| training time | {p['training_seconds'] / 60:.1f} min wall clock, measured by the training command itself on {p['machine']} |
| calibration | temperature {p['temperature']:.4f}, threshold {p['threshold']:.4f} (pneumonia sensitivity target {p['target_sensitivity']} on validation) |

Command (run from the repository root):

```
{p['command']}
python -m training.export --run runs/default --out default_model
```

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
"""


if __name__ == "__main__":
    sys.exit(main())
