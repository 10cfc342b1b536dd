"""Patient-level k-fold cross-validation of a training recipe, clean and under the stress suite.

    python -m training.crossval --folds 5 --data-dir ../shared/datasets/chest_xray --out runs/cv [training.train options]

Every option of `training.train` sets the recipe. Each fold trains from scratch on the
other folds' patients with `--select last` (the held-out fold chooses nothing), then
scores its held-out patients clean and under every stress of training/stress.py.
Temperature and threshold are cross-fitted inside the held-out fold (fitted on one half
of its patients, applied to the other, and back), so the thresholded figures are not
scored on the data that set them. The table gives mean +- standard deviation over
folds; `--fold` runs some folds only (results are kept per fold and reused by the same
command; a run with another split or recipe into the same `--out` is refused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from core.calibration import fit_temperature
from core.metrics import expected_calibration_error, specificity_at
from core.preprocess import to_tensor
from core.cli import bounded
from training import one_line
from training.data import DataFolderError, LoadedSplit, first_per_class, load_samples, scan_split
from training.stress import stressed_logits
from training.train import (check_options, choose_operating_point, get_args_parser, preprocess_config,
                            single_process_device, train_model)

METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy", "ece", "specificity_at_98_sensitivity")


def first_half(seed: int, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Which images belong to the first half of a held-out fold's patients (the halves `cross_fitted` fits on);
    ValueError when a half has no X-ray of a class, where no threshold can be fitted (a tiny data folder)."""
    patients = np.unique(groups)
    half = set(np.random.default_rng(seed).permutation(patients)[: len(patients) // 2])
    first = np.array([g in half for g in groups])
    if any(len(set(labels[part].tolist())) < 2 for part in (first, ~first)):
        raise ValueError("a held-out fold is too small to fit an operating point on each half of its patients "
                         "(a half has no X-ray of a class): use more images, or fewer --folds")
    return first


def cross_fitted(args: argparse.Namespace, clean: np.ndarray, stressed: dict[str, np.ndarray], labels: np.ndarray,
                 groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the temperature and threshold fitted (with the recipe's policy) on the other half of the
    fold's patients, so no image is scored against an operating point it helped choose."""
    first = first_half(args.seed, labels, groups)
    temperatures, thresholds = np.empty(len(labels)), np.empty(len(labels))
    for fit in (first, ~first):
        temperature = fit_temperature(clean[fit], labels[fit])
        threshold = choose_operating_point(args, clean[fit], {k: v[fit] for k, v in stressed.items()}, labels[fit],
                                           temperature)
        temperatures[~fit], thresholds[~fit] = temperature, threshold
    return temperatures, thresholds


def score_fold(args: argparse.Namespace, stressed: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray) -> dict:
    """A fold's figures, clean (`stressed["clean"]`) and per stress, at cross-fitted operating points."""
    clean = stressed["clean"]
    temperatures, thresholds = cross_fitted(args, clean, stressed, labels, groups)
    probs = 1 / (1 + np.exp(-clean / temperatures))
    predicted = probs >= thresholds
    figures = {
        "n": int(len(labels)),
        "roc_auc": float(roc_auc_score(labels, clean)),
        "sensitivity": float(predicted[labels == 1].mean()),
        "specificity": float((~predicted[labels == 0]).mean()),
        "accuracy": float((predicted == labels).mean()),
        "ece": expected_calibration_error(labels, probs),
        "specificity_at_98_sensitivity": specificity_at(labels, clean, 0.98),
        "stress": {},
    }
    for name, z in stressed.items():
        d = 1 / (1 + np.exp(-z / temperatures)) >= thresholds
        figures["stress"][name] = {"roc_auc": float(roc_auc_score(labels, z)),
                                   "sensitivity": float(d[labels == 1].mean()), "specificity": float((~d[labels == 0]).mean())}
    return figures


def run_fold(args: argparse.Namespace, k: int, train: LoadedSplit, held: LoadedSplit) -> dict:
    started = time.monotonic()
    device = single_process_device()
    module, _, history = train_model(args, train, held, device=device)
    module.to(device)
    preprocess = preprocess_config(args)

    def logits_of(grids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(to_tensor(grids, preprocess).to(device)).float().cpu().numpy()

    labels = held.labels.numpy()
    stressed = stressed_logits(logits_of, [s.path for s in held.samples], preprocess)
    figures = score_fold(args, stressed, labels, np.array([s.patient for s in held.samples]))
    figures.update(fold=k, train_images=len(train.labels), held_out_images=len(held.labels),
                   minutes=round((time.monotonic() - started) / 60, 1), last_epoch=history[-1])
    return figures


def summarise(folds: list[dict]) -> dict:
    def stats(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)), "max": float(np.max(values))}

    return {
        "folds": len(folds),
        "clean": {m: stats([f[m] for f in folds]) for m in METRICS},
        "stress": {name: {m: stats([f["stress"][name][m] for f in folds]) for m in ("roc_auc", "sensitivity", "specificity")}
                   for name in folds[0]["stress"]},
    }


def format_summary(summary: dict) -> str:
    c = summary["clean"]
    cell = lambda s: f"{s['mean']:.4f} +- {s['sd']:.4f} ({s['min']:.4f}-{s['max']:.4f})"  # noqa: E731
    of = summary.get("of_folds", summary["folds"])
    done = f"{summary['folds']} patient-level folds" if of == summary["folds"] else f"{summary['folds']} of {of} patient-level folds (the others not run)"
    lines = [f"{done}, mean +- sd (min-max); thresholds cross-fitted within each fold", "",
             "| metric (held-out patients, clean) | value |", "| --- | ---: |"]
    names = {"roc_auc": "ROC-AUC", "sensitivity": "sensitivity at the policy's threshold",
             "specificity": "specificity at the policy's threshold", "accuracy": "accuracy at the policy's threshold",
             "ece": "expected calibration error (10 bins)", "specificity_at_98_sensitivity": "specificity at 98 % sensitivity"}
    lines += [f"| {names[m]} | {cell(c[m])} |" for m in METRICS]
    lines += ["", "| stress (held-out patients) | ROC-AUC | sensitivity | specificity |", "| --- | ---: | ---: | ---: |"]
    short = lambda s: f"{s['mean']:.4f} +- {s['sd']:.4f}"  # noqa: E731
    for name, s in summary["stress"].items():
        lines.append(f"| {name} | {short(s['roc_auc'])} | {short(s['sensitivity'])} | {short(s['specificity'])} |")
    return "\n".join(lines)


# Options that do not change which patients a fold holds out or what is trained on them.
NOT_RECIPE = frozenset({"fold", "threads", "progress", "command", "out", "register", "promote"})


def other_recipe(out: Path, config: dict) -> str | None:
    """How the folds already in `out` were made differently from `config`, or None (same options, or no folds).

    Folds are reused by file name, so without this a second run with another --folds, --seed or recipe into the
    same --out would table its new folds together with the old ones as if they were one cross-validation.
    """
    saved = out / "config.json"
    if not any(out.glob("fold*.json")):
        return None
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        return "its config.json is missing or unreadable"
    now = json.loads(json.dumps(config))  # tuples as lists, as they were saved
    same_path = lambda a, b: Path(a).resolve() == Path(b).resolve()  # noqa: E731 - ../data and /abs/data alike
    changed = sorted(key for key in (now.keys() & before.keys()) - NOT_RECIPE
                     if before[key] != now[key] and not (key == "data_dir" and same_path(before[key], now[key])))
    return f"it was run with other {', '.join('--' + key.replace('_', '-') for key in changed)}" if changed else None


def get_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    parser.description = __doc__.split("\n\n")[0]
    g = parser.add_argument_group("cross-validation")
    g.add_argument("--folds", type=bounded(int, 2), default=5, help="number of patient-level folds")
    g.add_argument("--fold", type=bounded(int, 0), action="append", default=None, help="run only this fold, counted from 0 (repeatable); the table covers the folds done so far")
    parser.set_defaults(select="last", register=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m training.crossval`: exit 2 with one line on a bad option, data folder or fold, 130 on Ctrl-C."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.promote:  # its folds' models are measured, never saved: the option did nothing
        parser.error("a cross-validation saves no model: --promote does not apply")
    check_options(args)
    try:
        return _crossval(parser, args, argv)
    except DataFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the folds already done stay in --out; the same command goes on from them", file=sys.stderr)
        return 130


def _crossval(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.fold and max(args.fold) >= args.folds:
        parser.error(f"argument --fold: {max(args.fold)} is not a fold of --folds {args.folds} (0 to {args.folds - 1})")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} is a file, not a folder")
    if (args.out / "weights.pt").exists() or (args.out / "model_tag.txt").exists():
        parser.error(f"argument --out: {args.out} holds a training run; give a cross-validation its own folder")
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    samples = first_per_class(scan_split(args.data_dir, args.split), args.max_per_class)
    labels = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    fewest = min(len(set(groups[labels == label])) for label in (0, 1))
    if args.folds > fewest:  # a fold would hold out no patient of a class (or sklearn would raise)
        print(f"error: --folds {args.folds} needs at least {args.folds} patients of each class; "
              f"the data has {fewest} in its smaller class", file=sys.stderr)
        return 2
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "command": "python -m training.crossval " + " ".join(sys.argv[1:] if argv is None else argv)}
    if difference := other_recipe(args.out, config):
        print(f"error: {args.out} holds folds of another cross-validation ({difference}); they cannot be tabled "
              "with these: give another --out, or remove that folder to start again", file=sys.stderr)
        return 2
    splitter = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    preprocess = preprocess_config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for k, (fit, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        result = args.out / f"fold{k}.json"
        if (args.fold and k not in args.fold) or result.exists():
            continue
        first_half(args.seed, labels[held], groups[held])  # refused now, not after the fold's training
        print(f"fold {k + 1}/{args.folds}: {len(fit)} training images, {len(held)} held out "
              f"({len(set(groups[held]))} patients, none of them in training)", flush=True)
        train = load_samples([samples[i] for i in fit], preprocess, skip_bad=args.skip_bad_images,
                             progress=args.progress, description="decoding train")
        held_split = load_samples([samples[i] for i in held], preprocess, skip_bad=args.skip_bad_images,
                                  progress=args.progress, description="decoding held out")
        result.write_text(json.dumps(run_fold(args, k, train, held_split), indent=2))
    done = sorted(args.out.glob("fold*.json"))
    if not done:
        print("no fold done yet")
        return 0
    if len(done) < args.folds:
        print(f"{len(done)} of {args.folds} folds done; run the others (--fold) to complete the table")
    summary = summarise([json.loads(p.read_text()) for p in done])
    summary["of_folds"] = args.folds
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_summary(summary)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
