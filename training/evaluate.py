"""Evaluate a stored model on any `<split>/<CLASS>/<image>` folder, at its stored threshold.

    python -m training.evaluate --model production --data-dir /path/to/chest_xray --split test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from core.cli import bounded, output_file
from training import one_line
from training.data import CLASS_NAMES, DataFolderError, load_samples, scan_split
from core.metrics import classification_report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="production", help="'production', a version or a full tag from the model store")
    p.add_argument("--data-dir", type=Path, required=True, help="folder holding <split>/NORMAL and <split>/PNEUMONIA")
    p.add_argument("--split", default="test", help="sub-folder to evaluate")
    p.add_argument("--batch-size", type=bounded(int, 1), default=64)
    p.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images with a report instead of failing")
    p.add_argument("--json", type=output_file, default=None, help="also write metrics and per-image probabilities here")
    p.add_argument("--threads", type=bounded(int, 0), default=0, help="torch threads (0: all cores)")
    return p


def format_table(report: dict, tag: str) -> str:
    lines = [f"model {tag} on {report['n']} images, threshold {report['threshold']:.4f}", ""]
    lines.append(f"{'class':<10} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
    for name in CLASS_NAMES:
        c = report["per_class"][name]
        lines.append(f"{name:<10} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} {c['support']:>8d}")
    lines.append("")
    for key in ("accuracy", "roc_auc", "pr_auc", "ece", "brier"):
        lines.append(f"{key:<10} {report[key]:.4f}")
    m = report["confusion_matrix"]
    lines += ["", "confusion (rows true, columns predicted)", f"{'':<10} {'NORMAL':>9} {'PNEUMONIA':>9}",
              f"{'NORMAL':<10} {m[0][0]:>9d} {m[0][1]:>9d}", f"{'PNEUMONIA':<10} {m[1][0]:>9d} {m[1][1]:>9d}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.evaluate`: exit 2 with one line on any failure (the data folder's problems listed)."""
    args = get_args_parser().parse_args(argv)
    try:
        return _evaluate(args)
    except DataFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line, never a stack trace
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if args.threads:
        torch.set_num_threads(args.threads)
    from models_registry import load_model

    model = load_model(args.model)
    samples = scan_split(args.data_dir, args.split)
    split = load_samples(samples, model.card.preprocess, skip_bad=args.skip_bad_images, progress=sys.stderr.isatty())
    assessments = [a for i in range(0, len(split.labels), args.batch_size)
                   for a in model.assess(split.pixels[i:i + args.batch_size])]
    probs = np.array([a.probability for a in assessments])
    # What the service would refuse (the validity gate): scored above all the same, counted and scored apart here.
    refusals = [a.gate_refusal for a in assessments]
    labels = split.labels.numpy()
    report = classification_report(labels, probs, model.card.threshold)
    print(format_table(report, model.tag))
    refused = Counter(reason for reason in refusals if reason is not None)
    answered = np.array([reason is None for reason in refusals])
    if refused:
        reasons = ", ".join(f"{count} {reason}" for reason, count in refused.most_common())
        print(f"\nthe validity gate refuses {sum(refused.values())} of these {len(labels)} images ({reasons}); the "
              f"figures above score them all; a service in the default validity mode (refuse) answers "
              f"{int(answered.sum())}")
        if len(set(labels[answered])) == 2:
            served = classification_report(labels[answered], probs[answered], model.card.threshold)
            print(f"on the {int(answered.sum())} it answers: ROC-AUC {served['roc_auc']:.4f}, sensitivity "
                  f"{served['per_class']['PNEUMONIA']['recall']:.4f}, specificity "
                  f"{served['per_class']['NORMAL']['recall']:.4f}, accuracy {served['accuracy']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": model.tag, "data_dir": str(args.data_dir), "split": args.split, "metrics": report,
            "refused_by_validity_gate": dict(refused),
            "predictions": [{"file": str(s.path), "label": CLASS_NAMES[s.label], "probability": float(p),
                             "refusal": reason} for s, p, reason in zip(split.samples, probs, refusals)],
        }, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
