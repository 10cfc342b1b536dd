"""Shift-stress suite: validation X-rays under acquisition-like changes, through the serving decode path.

    python -m training.stress --model production --data-dir ../shared/datasets/chest_xray

Each stress re-encodes the image as a client would send it (PNG, or JPEG where
compression is the point) and runs it through `preprocess.prepare`, so what is
measured is what the service would answer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from core import dicom
from core.preprocess import InputLimits, PreprocessConfig, prepare
from core.cli import bounded, output_file
from training import run_command

if TYPE_CHECKING:
    from core.inference import LoadedModel

Stress = Callable[[Image.Image, np.random.Generator], bytes]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _tone(curve: Callable[[np.ndarray], np.ndarray]) -> Stress:
    def apply(image: Image.Image, rng: np.random.Generator) -> bytes:
        x = np.asarray(image, dtype=np.float32) / 255.0
        return _png(Image.fromarray((np.clip(curve(x), 0, 1) * 255 + 0.5).astype(np.uint8), mode="L"))

    return apply


def _zoom(factor: float) -> Stress:
    """factor > 1: crop the centre (zoom in); < 1: shrink onto a black border (zoom out / padding)."""

    def apply(image: Image.Image, rng: np.random.Generator) -> bytes:
        w, h = image.size
        if factor >= 1:
            cw, ch = round(w / factor), round(h / factor)
            left, top = (w - cw) // 2, (h - ch) // 2
            return _png(image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR))
        canvas = Image.new("L", (w, h), 0)
        small = image.resize((round(w * factor), round(h * factor)), Image.Resampling.BILINEAR)
        canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
        return _png(canvas)

    return apply


def _rotate(degrees: float) -> Stress:
    return lambda image, rng: _png(image.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0))


def _blur(radius: float) -> Stress:
    return lambda image, rng: _png(image.filter(ImageFilter.GaussianBlur(radius)))


def _noise(sigma: float) -> Stress:
    def apply(image: Image.Image, rng: np.random.Generator) -> bytes:
        x = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (image.height, image.width))
        return _png(Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), mode="L"))

    return apply


def _local_contrast(amount: float, scale: float = 0.1) -> Stress:
    """Unsharp masking at `scale` of the shorter side: a scanner's processing, flatter (amount < 0) or stronger.
    Of 5, 10, 20 and 35 % of the side, flattening at 10 % turned the most normal X-rays into PNEUMONIA calls."""

    def apply(image: Image.Image, rng: np.random.Generator) -> bytes:
        x = np.asarray(image, dtype=np.float32)
        coarse = np.asarray(image.filter(ImageFilter.GaussianBlur(scale * min(image.size))), dtype=np.float32)
        return _png(Image.fromarray(np.clip(x + amount * (x - coarse) + 0.5, 0, 255).astype(np.uint8), mode="L"))

    return apply


def _rescale(side: int) -> Stress:
    """Down- then up-scale through `side` pixels: detail lost in a low-resolution acquisition or export."""

    def apply(image: Image.Image, rng: np.random.Generator) -> bytes:
        w, h = image.size
        return _png(image.resize((side, round(side * h / w)), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BICUBIC))

    return apply


def _full_size(width: int, height: int, quality: int = 92) -> Stress:
    """The image as a full-size scanner JPEG: the service downsamples it (draft decode + resize)."""
    return lambda image, rng: _jpeg(image.resize((width, height), Image.Resampling.BICUBIC), quality)


def _acquisition(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A random mix of the changes below at once, as a new site's scanner and export might apply them."""
    w, h = image.size
    zoom = float(rng.uniform(0.8, 1.2))
    aspect = float(np.exp(rng.uniform(np.log(0.85), np.log(1.15))))
    image = image.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=0)
    cw, ch = min(w, round(w / zoom * aspect)), min(h, round(h / zoom / aspect))
    left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch))
    if zoom < 1:  # zoomed out: the chest shrinks onto a dark border
        canvas = Image.new("L", (round(w / zoom), round(h / zoom)), 0)
        canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
        image = canvas
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    low, high = rng.uniform(0, 0.12), 1 - rng.uniform(0, 0.12)
    if rng.random() < 0.5:  # washed out instead of windowed
        x = low + (high - low) * x
    else:
        x = (x - low) / (high - low)
    x = np.clip(x, 0, 1) ** float(np.exp(rng.uniform(np.log(0.65), np.log(1.5))))
    image = Image.fromarray((x * 255 + 0.5).astype(np.uint8), mode="L")
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.2))))
    if rng.random() < 0.4:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, float(rng.uniform(2, 8)), (h, w))
        image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), mode="L")
    return _jpeg(image, int(rng.integers(40, 95)))


STRESSES: dict[str, Stress] = {
    "clean": lambda image, rng: _png(image),
    "darker (x0.75)": _tone(lambda x: x * 0.75),
    "brighter (x1.25, clipped)": _tone(lambda x: x * 1.25),
    "gamma 0.7": _tone(lambda x: x ** 0.7),
    "gamma 1.4": _tone(lambda x: x ** 1.4),
    "low contrast (0.15 + 0.7x)": _tone(lambda x: 0.15 + 0.7 * x),
    "high contrast (window 10-90 %)": _tone(lambda x: (x - 0.1) / 0.8),
    "flatter contrast at 10 % scale (-50 %)": _local_contrast(-0.5),
    "stronger contrast at 10 % scale (+70 %)": _local_contrast(0.7),
    "zoom in 15 %": _zoom(1.15),
    "border padding 10 %": _zoom(0.82),
    "rotate +7 deg": _rotate(7.0),
    "rotate -7 deg": _rotate(-7.0),
    "blur (sigma 1.2)": _blur(1.2),
    "noise (sigma 8)": _noise(8.0),
    "JPEG quality 30": lambda image, rng: _jpeg(image, 30),
    "downscale to 112 and back": _rescale(112),
    "full-size 1800x1500 JPEG": _full_size(1800, 1500),
    "random acquisition mix": _acquisition,
}




# No limits on files already in a data folder: the stresses start from the full-size image.
_UNLIMITED = InputLimits(max_bytes=2**40, max_pixels=2**40, min_side=1)


def served_grey(path: Path, config: PreprocessConfig) -> Image.Image:
    """The file as a full-size 8-bit grey image, the picture a stress starts from.

    8-bit grey and colour files take PIL's own conversion (the stress figures in the docs were measured so);
    every other kind (16-bit, alpha, palette, DICOM) the shared decoder's, which training and serving use:
    `convert("L")` saturates a 16-bit PNG to white, ignores alpha and cannot open DICOM.
    """
    data = path.read_bytes()
    if not dicom.is_dicom(data):
        with Image.open(io.BytesIO(data)) as image:
            if image.mode in ("L", "RGB"):
                return image.convert("L")
    prepared = prepare(data, config, _UNLIMITED, preview_side=2**31)
    return Image.fromarray(prepared.preview if prepared.preview is not None else prepared.pixels)


def stressed_grids(paths: list[Path], stress: Stress, config: PreprocessConfig, seed: int = 0) -> np.ndarray:
    """The model's uint8 input grids (N, H, W) of these files under one stress, through `prepare`."""
    rng = np.random.default_rng(seed)
    return np.stack([prepare(stress(served_grey(path, config), rng), config, _UNLIMITED).pixels for path in paths])


def stressed_logits(logits_of: Callable[[np.ndarray], np.ndarray], paths: list[Path], config: PreprocessConfig,
                    names: list[str] | None = None, batch_size: int = 128,
                    workers: int | None = None) -> dict[str, np.ndarray]:
    """Raw logits of the files under each stress (all of them unless `names` picks some).

    The stressed images are made by `workers` threads (default: one per core), one stress each; PIL and numpy
    release the GIL, and each stress draws from its own generator, so the figures do not depend on the count.
    The model runs on the calling thread only, one stress at a time, in order.
    """
    names = names or list(STRESSES)
    workers = workers or min(len(names), os.cpu_count() or 1)
    out = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        made = pool.map(lambda name: stressed_grids(paths, STRESSES[name], config), names)
        for name, grids in zip(names, made):
            out[name] = np.concatenate([logits_of(grids[i:i + batch_size]) for i in range(0, len(grids), batch_size)])
    return out


def stress_rows(logits: dict[str, np.ndarray], labels: np.ndarray, temperature: float, threshold: float) -> list[dict]:
    """Per stress: ROC-AUC, and sensitivity / specificity at the threshold."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for name, z in logits.items():
        p = 1 / (1 + np.exp(-z / temperature))
        predicted = p >= threshold
        rows.append({"stress": name, "roc_auc": float(roc_auc_score(labels, p)),
                     "sensitivity": float(predicted[labels == 1].mean()), "specificity": float((~predicted[labels == 0]).mean())})
    return rows


def format_stress_rows(rows: list[dict], spread: list[dict] | None = None) -> str:
    """Markdown table; with `spread` (per-row standard deviations, e.g. over folds) as mean +- sd."""
    lines = ["| validation images | ROC-AUC | sensitivity | specificity |", "| --- | ---: | ---: | ---: |"]
    for i, row in enumerate(rows):
        cells = []
        for key in ("roc_auc", "sensitivity", "specificity"):
            cells.append(f"{row[key]:.4f}" + (f" +- {spread[i][key]:.4f}" if spread else ""))
        lines.append(f"| {row['stress']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score a stored model on the validation patients its training run held "
                                "out, clean and under every stress of the suite, at its stored threshold.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="production", help="'production', a version or a full tag from the model store")
    p.add_argument("--data-dir", type=Path, required=True, help="the folder the model was trained on")
    p.add_argument("--stress", action="append", choices=list(STRESSES), default=None, help="only this stress (repeatable)")
    p.add_argument("--served-side", action="append", type=bounded(int, 1), default=None, metavar="PX",
                   help="instead of the stresses: the images served at this shorter side (repeatable), scored with the "
                        "model's validity gate, below the service's smallest accepted side too")
    p.add_argument("--json", type=output_file, default=None, help="also write the rows here")
    p.add_argument("--threads", type=bounded(int, 0), default=0, help="torch threads (0: all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m training.stress`: the stress table of a stored model; exit 2 with one line on any failure."""
    return run_command(_stress, get_args_parser().parse_args(argv))


def _stress(args: argparse.Namespace) -> int:
    import torch

    from core.metrics import bootstrap_intervals
    from models_registry import load_model
    from training.data import held_out_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    val = held_out_samples(args.data_dir, model.card.training_config, model.tag, model.card.data_fingerprint)
    labels = np.array([s.label for s in val])

    def logits_of(grids: np.ndarray) -> np.ndarray:
        return model.logits(grids).float().numpy()

    if args.served_side:
        return _served_sides(model, [s.path for s in val], labels, args)
    logits = stressed_logits(logits_of, [s.path for s in val], model.card.preprocess, args.stress)
    rows = stress_rows(logits, labels, model.card.temperature, model.card.threshold)
    print(f"model {model.tag}: {len(val)} validation images of its run's held-out patients, "
          f"threshold {model.card.threshold:.4f}\n")
    print(format_stress_rows(rows))
    intervals = {}
    for name in ("clean", "random acquisition mix"):
        if name not in logits:
            continue
        probs = 1 / (1 + np.exp(-logits[name] / model.card.temperature))
        intervals[name] = bootstrap_intervals(labels, probs, probs >= model.card.threshold)
        cells = ", ".join(f"{k} {lo:.4f}-{hi:.4f}" for k, (lo, hi) in intervals[name].items())
        print(f"\n95 % bootstrap intervals, {name}: {cells}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model.tag, "n": len(val), "threshold": model.card.threshold,
                                         "rows": rows, "bootstrap_95": intervals}, indent=2) + "\n")
    return 0


def _smaller(side: int) -> Stress:
    """The image sent at `side` pixels on its shorter side (aspect kept): a thumbnail, a screenshot, an export."""

    def apply(image: Image.Image, rng: np.random.Generator) -> bytes:
        scale = min(1.0, side / min(image.size))
        return _png(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR))

    return apply


def served_side_rows(model: LoadedModel, paths: list[Path], labels: np.ndarray, sides: list[int]) -> list[dict]:
    """Per shorter side: the share the validity gate refuses, and ROC-AUC, sensitivity and specificity of every
    image (as if nothing were refused) and of the answered ones: what sets the service's smallest accepted side."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for side in sides:
        grids = stressed_grids(paths, _smaller(side), model.card.preprocess)
        assessed = [a for i in range(0, len(grids), 64) for a in model.assess(grids[i:i + 64])]
        p = np.array([a.probability for a in assessed])
        answered = np.array([a.gate_refusal is None for a in assessed])
        called = p >= model.card.threshold
        row: dict = {"side": side, "refused": float(1 - answered.mean())}
        for name, keep in (("all", np.ones_like(answered)), ("answered", answered)):
            y, c = labels[keep], called[keep]
            row[name] = {"roc_auc": float(roc_auc_score(y, p[keep])) if len(set(y)) == 2 else None,  # None, not NaN:
                         "sensitivity": float(c[y == 1].mean()) if (y == 1).any() else None,  # JSON has no NaN
                         "specificity": float((~c[y == 0]).mean()) if (y == 0).any() else None}
        rows.append(row)
    return rows


def _served_sides(model: LoadedModel, paths: list[Path], labels: np.ndarray, args: argparse.Namespace) -> int:
    rows = served_side_rows(model, paths, labels, args.served_side)
    print(f"model {model.tag}: {len(paths)} validation images of its run's held-out patients, served small, "
          f"threshold {model.card.threshold:.4f}\n")
    print("| shorter side | refused by the gate | all: ROC-AUC, sensitivity / specificity | answered: ROC-AUC, "
          "sensitivity / specificity |\n| ---: | ---: | --- | --- |")
    shown = lambda value, digits: "-" if value is None else f"{value:.{digits}f}"  # noqa: E731 - one use
    for row in rows:
        cells = [f"{shown(row[k]['roc_auc'], 4)}, {shown(row[k]['sensitivity'], 3)} / {shown(row[k]['specificity'], 3)}"
                 for k in ("all", "answered")]
        print(f"| {row['side']} px | {100 * row['refused']:.1f} % | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model.tag, "n": len(paths), "threshold": model.card.threshold,
                                         "served_sides": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
