"""Site calibration: fit temperature and threshold on a site's own labeled X-rays; save them as a new version.

    python -m models_registry calibrate production --data /path/to/site_xrays --out reports/site-a

Clinical AI is deployed this way: a model trained elsewhere meets a site's scanners,
population and export settings, and its probabilities and operating point move. A
small labeled set from the site (`NORMAL/`, `PNEUMONIA/`, any supported format)
re-fits the two numbers that set them; the weights and the validity gate stay as they
are. The original model is untouched, so promote and rollback work as usual.

Figures "after" are cross-validated within the site set (each image scored by a
temperature and threshold fitted without it) with bootstrap intervals, so a small set
cannot flatter itself; refusals say what is wrong instead of fitting a bad threshold.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from core.calibration import choose_threshold, fit_temperature
from core.card import CLASS_NAMES
from core.cli import check_outside
from core.folder import DataFolderError, labeled_images
from sklearn.metrics import roc_auc_score

from core.metrics import bootstrap_intervals, expected_calibration_error
from core.preprocess import ImageRejected, InputLimits, load_file
from models_registry.loader import load_model
from models_registry.store import RegistryError, derive_model, read_card, stored_tags

MIN_PER_CLASS = 30
FOLDS = 5
FLOOR_PER_CLASS = 2 * FOLDS  # two images of each class in each of the held-out parts, at the very least


class CalibrationRefused(RegistryError):
    """The site data cannot give a trustworthy calibration; the message says what to fix."""


@dataclass
class SiteCalibration:
    tag: str
    source: str
    report: dict[str, Any]
    report_dir: Path | None
    reused: bool = False  # the same calibration was stored before: its version is returned, none is added


def _same_calibration(source: str, fingerprint: str, target: float, temperature: float, threshold: float) -> str | None:
    """A stored version that is this very calibration (same source, site data, target and fit), else None:
    running the command again, for its report, must not add an identical version each time."""
    for tag in stored_tags():
        try:
            card = read_card(tag)
        except RegistryError:
            continue
        site = card.site_calibration or {}
        if (site.get("source_model") == source and site.get("data_fingerprint") == fingerprint
                and card.target_sensitivity == target and card.temperature == temperature
                and card.threshold == threshold):
            return tag
    return None


def _fingerprint(files: list[tuple[Path, int]], digests: dict[Path, str]) -> str:
    """sha256 over (class, file name, content digest): identifies the site data the calibration saw."""
    digest = hashlib.sha256()
    for path, label in sorted(files, key=lambda f: (f[1], f[0].name)):
        digest.update(f"{label}/{path.name}:{digests[path]}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _cross_validated(logits: np.ndarray, labels: np.ndarray, target: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's probability and threshold from a temperature and threshold fitted on the other folds."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=int)
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == c))
        folds[members] = np.arange(len(members)) % FOLDS
    probs, thresholds = np.empty(len(labels)), np.empty(len(labels))
    for k in range(FOLDS):
        fit, held = folds != k, folds == k
        t = fit_temperature(logits[fit], labels[fit])
        threshold = choose_threshold(labels[fit], 1 / (1 + np.exp(-logits[fit] / t)), target)
        probs[held] = 1 / (1 + np.exp(-logits[held] / t))
        thresholds[held] = threshold
    return probs, thresholds


def _summary(labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray, seed: int) -> dict[str, Any]:
    """Headline metrics of these decisions with 95 % bootstrap intervals."""
    predicted = np.asarray(predicted, dtype=bool)
    return {
        "n": int(len(labels)),
        "roc_auc": float(roc_auc_score(labels, probs)),
        "sensitivity": float(predicted[labels == 1].mean()),
        "specificity": float((~predicted[labels == 0]).mean()),
        "accuracy": float((predicted == labels).mean()),
        "ece": expected_calibration_error(labels, probs),
        "intervals_95": bootstrap_intervals(labels, probs, predicted, seed=seed),
    }


def calibrate(ref: str, data_dir: Path, report_dir: Path | None = None, target_sensitivity: float | None = None,
              min_per_class: int = MIN_PER_CLASS, seed: int = 0) -> SiteCalibration:
    """Fit the site's temperature and threshold, save a new version recording them, write the report.

    Everything that can be refused is refused before the new version is saved: a failed run leaves no version.
    """
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise CalibrationRefused(f"the target sensitivity must be in (0, 1], not {target_sensitivity}")
    if min_per_class < FLOOR_PER_CLASS:
        raise CalibrationRefused(f"at least {FLOOR_PER_CLASS} images of each class are needed for a {FOLDS}-fold "
                                 f"cross-validated check (asked for {min_per_class})")
    if report_dir is not None:
        try:
            check_outside(Path(report_dir), [Path(data_dir) / name for name in CLASS_NAMES], "--out", "--data",
                          Path(data_dir))
        except ValueError as exc:
            raise CalibrationRefused(str(exc)) from None
        _writable_folder(Path(report_dir))
    model = load_model(ref)
    card = model.card
    target = card.target_sensitivity if target_sensitivity is None else target_sensitivity
    try:
        files = labeled_images(Path(data_dir), card.class_names)
    except DataFolderError as exc:
        raise CalibrationRefused(str(exc)) from None
    limits = InputLimits(max_bytes=2**40, max_pixels=2**40, min_side=1)
    grids, kept, bad, by_tags = [], [], [], {}
    for path, label in files:
        try:
            prepared = load_file(path, card.preprocess, limits)
            grids.append(prepared.pixels)
            kept.append((path, label))
            # A DICOM its own tags refuse (a CT, a lateral view) is never decoded: its blank grid went into the fit
            # with its label, and the refusal was counted as the validity gate's (a helper's find).
            by_tags[path] = prepared.refusal is not None
        except (ImageRejected, OSError) as exc:
            bad.append(f"{path}: {exc}")
    if bad:  # before the copies: two empty downloads, one per class, are unreadable, not a labelling error
        listing = "\n  - ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CalibrationRefused(f"{len(bad)} unreadable image(s) in {data_dir}; fix or remove them:\n  - {listing}")
    distinct, copies, digests = _without_copies(kept)
    chosen = set(distinct)
    grids = [grid for grid, file in zip(grids, kept) if file in chosen]
    kept = distinct
    assessments = [a for i in range(0, len(grids), 64) for a in model.assess(np.stack(grids[i:i + 64]))]
    logits = np.array([a.logit for a in assessments], dtype=np.float64)
    refused_by_tags = np.array([by_tags[path] for path, _ in kept], dtype=bool)
    refused_by_gate = np.array([a.gate_refusal is not None for a in assessments], dtype=bool)
    refused_by_gate &= ~refused_by_tags
    labels = np.array([label for _, label in kept])
    answered = ~(refused_by_tags | refused_by_gate)
    counts = [int(((labels == c) & answered).sum()) for c in (0, 1)]
    if min(counts) < min_per_class:
        have = ", ".join(f"{n} {name}" for n, name in zip(counts, card.class_names))
        raise CalibrationRefused(
            f"too few usable images to calibrate on: {have} (images the validity gate or their DICOM tags refuse "
            f"and copies of other files do not count{f'; {len(copies)} copies left out' if copies else ''}); "
            f"at least {min_per_class} of each class are needed for a threshold that holds"
        )
    logits, labels = logits[answered], labels[answered]
    before_probs = 1 / (1 + np.exp(-logits / card.temperature))
    before = _summary(labels, before_probs, before_probs >= card.threshold, seed)
    temperature = fit_temperature(logits, labels)
    probs = 1 / (1 + np.exp(-logits / temperature))
    threshold = choose_threshold(labels, probs, target)
    cv_probs, cv_thresholds = _cross_validated(logits, labels, target, seed)
    after = _summary(labels, cv_probs, cv_probs >= cv_thresholds, seed)
    record = {
        "source_model": model.tag,
        "data_dir": str(Path(data_dir).resolve()),
        "data_fingerprint": _fingerprint(kept, digests),
        "images": {name: int((labels == c).sum()) for c, name in enumerate(card.class_names)},
        "refused_by_validity_gate": int(refused_by_gate.sum()),
        "refused_by_dicom_tags": int(refused_by_tags.sum()),
        "copies_ignored": len(copies),
        "target_sensitivity": target,
        "before": {**before, "temperature": card.temperature, "threshold": card.threshold},
        "after_cross_validated": {**after, "temperature": temperature, "threshold": threshold,
                                  "note": f"{FOLDS}-fold within the site set: each image scored by a fit without it"},
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if after["sensitivity"] < target:
        record["warning"] = shortfall_warning(after["sensitivity"], target)
    existing = _same_calibration(model.tag, record["data_fingerprint"], target, temperature, threshold)
    tag = existing or derive_model(model.tag, {"temperature": temperature, "threshold": threshold,
                                               "target_sensitivity": target, "site_calibration": record})
    if report_dir is not None:
        write_report(Path(report_dir), record, tag, labels, before_probs, cv_probs)
    return SiteCalibration(tag=tag, source=model.tag, report=record, report_dir=report_dir, reused=existing is not None)


def _without_copies(files: list[tuple[Path, int]]) -> tuple[list[tuple[Path, int]], list[str], dict[Path, str]]:
    """The files with byte-identical copies left out (the first of each kept), the copies as 'B is a copy of A', and
    each kept file's sha256 (hex), which the data fingerprint reuses.

    A copy counted as another image: 30 copies of one X-ray per class passed the minimum and gave a threshold with
    cross-validated sensitivity and specificity of 1.000 (a helper's find). The training collection itself holds
    such pairs. A copy filed under the other class is a labelling error, refused."""
    first: dict[str, tuple[Path, int]] = {}
    kept: list[tuple[Path, int]] = []
    copies: list[str] = []
    digests: dict[Path, str] = {}
    for path, label in files:  # all decoded already
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:  # gone since it was decoded
            raise CalibrationRefused(f"cannot read {path}: {exc.strerror or exc}") from None
        if digest not in first:
            first[digest] = (path, label)
            kept.append((path, label))
            digests[path] = digest
        elif first[digest][1] != label:
            raise CalibrationRefused(f"{path} and {first[digest][0]} are the same file under both classes: fix the "
                                     "labels")
        else:
            copies.append(f"{path} is a copy of {first[digest][0]}")
    return kept, copies, digests


def shortfall_warning(sensitivity: float, target: float) -> str:
    return (f"cross-validated on the site data, this threshold reaches sensitivity {sensitivity:.3f}, below the "
            f"target {target}: it may not hold at this site; add site images before serving it")


def _writable_folder(folder: Path) -> None:
    """Refuse a report folder that cannot be written before any work; one this check had to make is removed
    again (the report makes it at the end), so a refused or interrupted calibration leaves no empty folder."""
    missing = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        from core.cli import unwritable_reason

        raise CalibrationRefused(f"cannot write the report to {folder}: {unwritable_reason(folder / 'report.md', exc)}") from None
    finally:
        if missing is not None and missing.is_dir():
            shutil.rmtree(missing, ignore_errors=True)


def write_report(out: Path, record: dict[str, Any], tag: str, labels: np.ndarray, before_probs: np.ndarray,
                 after_probs: np.ndarray) -> None:
    """calibration.json, report.md, a reliability diagram and ROC curves (before / after) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"model": tag, **record}, indent=2))
    fig, (reliability, roc) = plt.subplots(1, 2, figsize=(10, 4.5))
    reliability.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    for name, probs in (("before", before_probs), ("after (cross-validated)", after_probs)):
        observed, predicted = calibration_curve(labels, probs, n_bins=10, strategy="quantile")
        reliability.plot(predicted, observed, "o-", label=name)
        fpr, tpr, _ = roc_curve(labels, probs)
        roc.plot(fpr, tpr, label=name)
    reliability.set(xlabel="predicted probability of pneumonia", ylabel="observed share with pneumonia",
                    title="reliability (site data)")
    roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (site data)")
    reliability.legend()
    roc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)

    def row(name: str, s: dict[str, Any]) -> str:
        ci = s["intervals_95"]
        cell = lambda k: f"{s[k]:.3f} ({ci[k][0]:.3f}-{ci[k][1]:.3f})"  # noqa: E731
        return (f"| {name} | {s['threshold']:.4f} | {s['temperature']:.3f} | {cell('sensitivity')} | {cell('specificity')} "
                f"| {cell('accuracy')} | {cell('roc_auc')} | {cell('ece')} |")

    lines = [
        f"# Site calibration of {record['source_model']}", "",
        f"New version: `{tag}` (same weights and validity gate; temperature and threshold fitted on the site data).",
        f"Site data: `{record['data_dir']}`, {record['images']}, fingerprint `{record['data_fingerprint'][:16]}...`; "
        f"{record['refused_by_validity_gate']} image(s) refused by the validity gate and "
        f"{record.get('refused_by_dicom_tags', 0)} by their DICOM tags were left out.", "",
        "| | threshold | temperature | sensitivity | specificity | accuracy | ROC-AUC | ECE (10 bins) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row("before (as shipped)", record["before"]),
        row("after (5-fold cross-validated on the site data)", record["after_cross_validated"]), "",
        "Figures are point estimates with 95 % bootstrap intervals (images resampled within each class).",
        f"Threshold policy: the highest threshold reaching sensitivity {record['target_sensitivity']} on the site data.", "",
        *([f"**Warning:** {record['warning']}", ""] if "warning" in record else []),
        "![reliability and ROC](calibration.png)", "",
        ("Not promoted: `python -m models_registry promote` refuses this version because of the warning above "
         f"(`promote {tag} --force` serves it anyway)." if "warning" in record else
         f"Serve it: `python -m models_registry promote {tag}`; undo with `python -m models_registry rollback`."),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
