"""Fit the input-validity gate (core/validity.py) on training X-rays; calibrate and measure it on validation.

    python -m training.gate --model production --data-dir ../shared/datasets/chest_xray

Training runs this for every model it saves; the command above adds (or re-fits)
the gate of a stored model and saves the result as a new version with the same
weights. Nothing here fits on a negative example: the Gaussians model chest X-ray
features, the orientation head learns from training X-rays and their own inverted,
rotated and cropped versions, the partial-view check from training X-rays and their own
bands (a half, a strip) and collages (side by side, tiled). Offline negatives
(training/negatives.py) and validation X-rays (other patients) only measure the result.
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression

from core.model import PneumoniaNet, WithFeatures
from core.preprocess import InputLimits, PreprocessConfig, prepare, to_tensor
from core.validity import ORIENTATION_CLASSES, ValidityConfig, ValidityGate, level_share
from core.cli import bounded, output_file
from training import one_line
from training.augment import AugmentConfig, augment_batch
from training.data import DataFolderError, LoadedSplit
from training.stress import STRESSES, stressed_grids

# Acquisition-like changes a real chest X-ray may show; the gate must accept them (no mirror, no occluders).
ACQUISITION = AugmentConfig(rotate_deg=8.0, scale=(0.8, 1.25), translate=0.06, shear_deg=3.0, hflip=0.0, erase_p=0.0)


@dataclass
class GateFit:
    """A fitted gate: its card entry, its arrays (validity.npz) and the figures measured on held-out images."""

    config: ValidityConfig
    arrays: bytes
    report: dict = field(default_factory=dict)


def feature_runner(module: PneumoniaNet) -> WithFeatures:
    """A CPU copy of `module` that also returns the gate's pooled features (the caller's module is left as it is)."""
    return WithFeatures(copy.deepcopy(module).cpu().eval()).eval()


def pooled_features(runner: WithFeatures, preprocess: PreprocessConfig, grids: np.ndarray | torch.Tensor,
                    batch_size: int = 128) -> torch.Tensor:
    """The gate's features (N, D) of uint8 grids, from the classifier's own forward pass."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(grids), batch_size):
            out.append(runner(to_tensor(grids[i:i + batch_size], preprocess))[1].float())
    return torch.cat(out)


def _crops(grids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random part (30-55 % of each side) of every grid, resized back: 'part of a chest X-ray'."""
    n, h, w = grids.shape
    out = np.empty_like(grids)
    for k in range(n):
        ch = int(h * rng.uniform(0.3, 0.55))
        cw = min(w, int(w * rng.uniform(0.3, 0.55)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out[k] = _squashed(grids[k, y:y + ch, x:x + cw], h, w, antialias=False)  # as the shipped gates were fitted
    return out


def _squashed(part: np.ndarray, h: int, w: int, antialias: bool = True) -> np.ndarray:
    """`part` resized to h x w, as the service resizes any upload to its square grid (bilinear, antialiased as PIL)."""
    tensor = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))[None, None]
    return (F.interpolate(tensor, size=(h, w), mode="bilinear", antialias=antialias)
            .clamp(0, 255).round().byte().numpy()[0, 0])


def _partial_views(grids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Views that are not one whole frontal chest X-ray though every pixel comes from one: a band of 35-65 % of the
    height or the width (a half, a middle strip), or two X-rays side by side or stacked, or four tiled. A helper
    found these answered with a confident PNEUMONIA (a normal X-ray's bottom half: 39 of 40)."""
    n, h, w = grids.shape
    out = np.empty_like(grids)
    for k in range(n):
        kind = k % 4
        if kind == 0:
            rows = int(h * rng.uniform(0.35, 0.65))
            top = rng.integers(0, h - rows + 1)
            part = grids[k, top:top + rows]
        elif kind == 1:
            cols = int(w * rng.uniform(0.35, 0.65))
            left = rng.integers(0, w - cols + 1)
            part = grids[k, :, left:left + cols]
        elif kind == 2:
            other = grids[rng.integers(0, n)]
            part = np.hstack([grids[k], other]) if rng.random() < 0.5 else np.vstack([grids[k], other])
        else:
            a, b, c = (grids[i] for i in rng.integers(0, n, 3))
            part = np.block([[grids[k], a], [b, c]])
        out[k] = _squashed(part, h, w)
    return out


def _acquired(grids: torch.Tensor, seed: int) -> np.ndarray:
    return (augment_batch(grids, ACQUISITION, torch.Generator().manual_seed(seed)) * 255).round().byte().squeeze(1).numpy()


def _stressed_validation(paths: list[Path], preprocess: PreprocessConfig) -> np.ndarray:
    """Every validation file under one stress of the suite in turn, plus each under a random acquisition mix."""
    names = [name for name in STRESSES if name != "clean"]
    grids = [stressed_grids([path], STRESSES[names[i % len(names)]], preprocess, seed=i)[0] for i, path in enumerate(paths)]
    return np.concatenate([np.stack(grids), stressed_grids(paths, STRESSES["random acquisition mix"], preprocess, seed=1)])


def fit_gate(module: PneumoniaNet, preprocess: PreprocessConfig, train: LoadedSplit, val: LoadedSplit,
             max_refusals: float = 0.01, seed: int = 0, measure_negatives: bool = True) -> GateFit:
    """Fit on `train`; set the limits so that the outlier and orientation checks refuse about `max_refusals` of
    stressed validation X-rays, and the partial-view check up to a quarter of that more."""
    rng = np.random.default_rng(seed)
    runner = feature_runner(module)
    pick = torch.from_numpy(rng.choice(len(train.labels), min(2500, len(train.labels)), replace=False))
    clean = train.pixels[pick]
    acquired = _acquired(clean, seed)
    layers = runner.layers
    features = torch.cat([pooled_features(runner, preprocess, clean), pooled_features(runner, preprocess, acquired)])
    dims = runner.layer_dims()
    means, precisions, start = [], [], 0
    for dim in dims:
        fitted = LedoitWolf().fit(features[:, start:start + dim].double().numpy())
        means.append(torch.from_numpy(fitted.location_).float())
        precisions.append(torch.from_numpy(fitted.precision_).float())
        start += dim
    d = features.shape[1]
    gate = ValidityGate(
        ValidityConfig(layers=layers, layer_dims=dims, blank_std_limit=0.0, outlier_limit=0.0, orientation_limit=0.0),
        means, precisions, torch.zeros(len(dims)), torch.ones(len(dims)), torch.zeros(d), torch.ones(d),
        torch.zeros(len(ORIENTATION_CLASSES), d), torch.zeros(len(ORIENTATION_CLASSES)),
    )
    raw = gate.layer_scores(features)
    gate.score_mean, gate.score_std = raw.mean(0), raw.std(0)

    # Orientation head: upright (clean and acquisition-changed) against its own transformed versions.
    head_n = min(1200, len(clean))
    base = clean[:head_n].numpy()
    variants = [np.concatenate([base, acquired[:head_n]]), 255 - base, np.rot90(base, 1, (1, 2)).copy(),
                np.rot90(base, 2, (1, 2)).copy(), np.rot90(base, 3, (1, 2)).copy(), _crops(base, rng)]
    x = torch.cat([pooled_features(runner, preprocess, v) for v in variants]).double().numpy()
    y = np.concatenate([np.full(len(v), k) for k, v in enumerate(variants)])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    head = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit((x - mean) / scale, y)
    gate.head_mean, gate.head_scale = torch.from_numpy(mean).float(), torch.from_numpy(scale).float()
    gate.head_weight, gate.head_bias = torch.from_numpy(head.coef_).float(), torch.from_numpy(head.intercept_).float()

    # Partial-view check: whole upright X-rays (clean and acquisition-changed) against bands of them and collages.
    # Its own generator, so the checks above fit exactly as they did before it existed.
    whole = x[y == 0]
    parts = pooled_features(runner, preprocess, _partial_views(base, np.random.default_rng(seed + 1))).double().numpy()
    views = np.concatenate([whole, parts])
    is_part = np.concatenate([np.zeros(len(whole)), np.ones(len(parts))])
    check = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit((views - mean) / scale, is_part)
    gate.partial_weight = torch.from_numpy(check.coef_[0]).float()
    gate.partial_bias = torch.from_numpy(check.intercept_).float()

    # Limits from validation X-rays (other patients), clean and stressed.
    paths = [s.path for s in val.samples]
    stressed = _stressed_validation(paths, preprocess)
    val_grids = val.pixels.numpy()
    clean_f, stressed_f = pooled_features(runner, preprocess, val_grids), pooled_features(runner, preprocess, stressed)
    budget = max_refusals / 2  # half for each learned check; the clean split gets a fifth of that
    outlier_c, outlier_s = gate.layer_scores(clean_f).amax(1).numpy(), gate.layer_scores(stressed_f).amax(1).numpy()
    upright_c, upright_s = gate.orientation(clean_f)[:, 0].numpy(), gate.orientation(stressed_f)[:, 0].numpy()
    partial_c, partial_s = gate.partial(clean_f).numpy(), gate.partial(stressed_f).numpy()
    partial_budget = budget / 2  # on top of the others' (a quarter of max_refusals), which stay as they were
    spread = train.pixels.flatten(1).float().std(dim=1).numpy()
    config = gate.config.model_copy(update={
        "blank_std_limit": float(min(8.0, np.quantile(spread, 0.001) / 3)),
        "outlier_limit": float(max(np.quantile(outlier_s, 1 - budget), np.quantile(outlier_c, 1 - budget / 5))),
        "orientation_limit": float(min(np.quantile(upright_s, budget), np.quantile(upright_c, budget / 5))),
        "partial_limit": float(max(np.quantile(partial_s, 1 - partial_budget), np.quantile(partial_c, 1 - partial_budget / 5))),
        # Far above every validation X-ray, stressed ones (border padding) included: a fixed margin, not a quantile.
        "level_share_limit": float(max(0.7, level_share(val_grids).max() + 0.1, level_share(stressed).max() + 0.1)),
    })
    gate.config = config
    arrays = gate.to_bytes()
    gate.config = config = config.model_copy(update={"arrays_sha256": hashlib.sha256(arrays).hexdigest()})

    def refusals(grids: np.ndarray, feats: torch.Tensor) -> dict:
        outcomes = gate.assess(feats, grids.reshape(len(grids), -1).std(axis=1), level_share(grids))
        reasons = collections.Counter(o.reason for o in outcomes if o.reason)
        return {"n": len(outcomes), "refused": sum(reasons.values()), "rate": sum(reasons.values()) / len(outcomes),
                "by_reason": dict(reasons)}

    report = {"validation_clean": refusals(val_grids, clean_f), "validation_stressed": refusals(stressed, stressed_f)}
    if measure_negatives:
        report["negatives"] = measure_catch(gate, runner, preprocess, paths[::7])
    gate.config = config = config.model_copy(update={"figures": report})
    return GateFit(config=config, arrays=arrays, report=report)


def measure_catch(gate: ValidityGate, runner: WithFeatures, preprocess: PreprocessConfig, xray_paths: list[Path]) -> dict:
    """Share of each kind of offline negative that gets no verdict, through the serving decode path."""
    from training.negatives import all_negatives

    limits = InputLimits(max_bytes=2**40, max_pixels=2**40, min_side=1)
    negatives = all_negatives(xray_paths, preprocess)
    grids = []
    for negative in negatives:
        buffer = io.BytesIO()
        negative.image.save(buffer, format="PNG")
        grids.append(prepare(buffer.getvalue(), preprocess, limits).pixels)
    stacked = np.stack(grids)
    outcomes = gate.assess(pooled_features(runner, preprocess, stacked), stacked.reshape(len(stacked), -1).std(axis=1),
                           level_share(stacked))
    by_kind: dict[str, dict] = {}
    for negative, outcome in zip(negatives, outcomes):
        entry = by_kind.setdefault(negative.kind, {"n": 0, "caught": 0, "reasons": collections.Counter()})
        entry["n"] += 1
        entry["caught"] += outcome.reason is not None
        entry["reasons"][outcome.reason or "answered"] += 1
    total = sum(e["caught"] for e in by_kind.values()) / len(outcomes)
    return {"n": len(outcomes), "catch_rate": total,
            "by_kind": {k: {"n": e["n"], "catch_rate": e["caught"] / e["n"], "reasons": dict(e["reasons"])}
                        for k, e in sorted(by_kind.items())}}


def format_report(report: dict, config: ValidityConfig) -> str:
    """The gate's figures as a Markdown table (docs/validity.md keeps its output)."""
    lines = [f"limits: grey-level spread < {config.blank_std_limit:.2f} is blank; outlier score > "
             f"{config.outlier_limit:.3f} is not a chest X-ray; upright probability < {config.orientation_limit:.4f} "
             "is inverted / rotated / cropped"
             + (f"; partial-view probability > {config.partial_limit:.4f} is cropped (a part, or several side by side)"
                if config.partial_limit is not None else "")
             + (f"; more than {config.level_share_limit:.0%} of the pixels in 4 grey levels is not a chest X-ray "
                "(binarised, posterised)" if config.level_share_limit is not None else "")]
    if "validation_clean" in report:
        lines += ["", "| images | n | refused | share | by reason |", "| --- | ---: | ---: | ---: | --- |"]
    for key, label in (("validation_clean", "validation X-rays, clean (held-out patients)"),
                       ("validation_stressed", "validation X-rays, stressed (acquisition changes)")):
        if key not in report:  # --measure-only: the negatives alone
            continue
        r = report[key]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["by_reason"].items())) or "-"
        lines.append(f"| {label} | {r['n']} | {r['refused']} | {r['rate']:.2%} | {reasons} |")
    if "negatives" in report:
        lines += ["", "| offline negatives (never fitted on) | n | no verdict | reasons |", "| --- | ---: | ---: | --- |"]
        for kind, r in report["negatives"]["by_kind"].items():
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items()))
            lines.append(f"| {kind} | {r['n']} | {r['catch_rate']:.0%} | {reasons} |")
        lines.append(f"| **all** | {report['negatives']['n']} | {report['negatives']['catch_rate']:.1%} | |")
    return "\n".join(lines)


def _never_over_a_fit(path: Path) -> None:
    """Refuse to write a --measure-only report over a fitted gate's report: `training.export --regate` ships from
    that file, and it cannot be made again without fitting (and saving) another version."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(earlier, dict) and "config" in earlier and not earlier.get("measure_only"):
        raise ValueError(f"{path} is the report of a fitted gate (training.export --regate reads it): give "
                         "--measure-only another --json file")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="production", help="'production', a version or a full tag from the model store")
    p.add_argument("--data-dir", type=Path, required=True, help="the folder the model was trained on (<split>/NORMAL, <split>/PNEUMONIA)")
    p.add_argument("--max-refusals", type=bounded(float, 0, 1, low_open=True, high_open=True), default=0.01, help="share of stressed validation X-rays the outlier and orientation checks refuse (half each); the "
                   "partial-view check adds up to a quarter of it")
    p.add_argument("--promote", action="store_true", help="promote the new version to production")
    p.add_argument("--measure-only", action="store_true", help="fit nothing: measure the model's own gate on today's "
                   "offline negatives (what an older gate catches of kinds added since), and save no version")
    p.add_argument("--json", type=output_file, default=None, help="also write the figures here")
    p.add_argument("--threads", type=bounded(int, 0), default=0, help="torch threads (0: all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Re-fit the gate of a stored model on the split it was trained with; save a new version."""
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from models_registry import RegistryError, load_model, promote, save_model
    from training.data import load_splits, run_split
    from training.train import code_version

    started_at = code_version()  # the code that fits, not whatever the tree holds when it is done

    tag = None
    try:
        model = load_model(args.model)
        train_samples, val_samples = run_split(args.data_dir.resolve(), model.card.training_config, model.tag,
                                               model.card.data_fingerprint)
        if args.measure_only:
            if model.gate is None:
                raise ValueError(f"{model.tag} has no validity gate to measure")
            caught = measure_catch(model.gate, feature_runner(model.module), model.card.preprocess,
                                   [s.path for s in val_samples][::7])
            print(format_report({"negatives": caught}, model.gate.config))
            if args.json:  # the figures only (a helper's find: the option was taken and nothing written)
                _never_over_a_fit(args.json)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({
                    "model": model.tag, "measure_only": True, "negatives": caught, "code_version": started_at,
                    "command": "python -m training.gate " + " ".join(argv or sys.argv[1:])}, indent=2))
            return 0
        # The split the model was trained on: without the images its run dropped as unreadable, if it dropped any.
        train, val = load_splits([train_samples, val_samples], model.card.preprocess, progress=sys.stderr.isatty(),
                                 skip_bad=bool(model.card.training_config.get("skip_bad_images")),
                                 descriptions=["decoding train", "decoding validation"])
        fitted = fit_gate(model.module, model.card.preprocess, train, val, max_refusals=args.max_refusals)
        tag = save_model(model.module, model.card.model_copy(update={"validity": fitted.config}), validity=fitted.arrays)
        print(format_report(fitted.report, fitted.config))
        print(f"\nsaved {tag} (weights of {model.tag} with this gate)", flush=True)
        if args.promote:
            try:
                promote(tag)
            except RegistryError as exc:
                raise RegistryError(f"{tag} was saved, not promoted: {exc}") from None
            print(f"promoted {tag} to production")
        if args.json:  # what `training.export --regate` ships: the new version, and how it was made
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "model": tag, "source": model.tag, "command": "python -m training.gate " + " ".join(argv or sys.argv[1:]),
                "code_version": started_at, "config": fitted.config.model_dump(mode="json")}, indent=2))
    except (RegistryError, DataFolderError, OSError, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: " + (f"{tag} was saved" if tag else "no new version was saved"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
