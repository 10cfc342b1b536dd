"""Would test-time framing views make a stored model more robust? Scored on the stress suite, no training.

    python -m training.framing_views --model production --data-dir ../shared/datasets/chest_xray [--json FILE]

The stress suite found the shipped model most sensitive to framing (zoom-in and
border-padding specificity 0.92 and 0.93 against 0.99 clean). Averaging the logits of
re-framed copies of each image (a centre zoom-in, a zoom-out onto a dark border, each
optionally mirrored) is the cheapest lever against that: no training, one forward pass
per view. Each combination of views is scored like `training.compare` scores a model
(the same validation patients, every stress, temperature on clean images, one
threshold at the target sensitivity on all stresses at once).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.preprocess import to_tensor
from core.cli import bounded, output_file
from training import run_command
from training.compare import SHOWN, format_table, summarise
from training.stress import STRESSES, stressed_logits

View = Callable[[torch.Tensor], torch.Tensor]


def zoom_in(x: torch.Tensor, keep: float = 0.9) -> torch.Tensor:
    """The centre `keep` of the grid, resized back to the full grid."""
    side = x.shape[-1]
    crop = round(side * keep)
    start = (side - crop) // 2
    return F.interpolate(x[..., start:start + crop, start:start + crop], size=(side, side), mode="bilinear",
                         antialias=True, align_corners=False)


def zoom_out(x: torch.Tensor, keep: float = 0.9) -> torch.Tensor:
    """The grid shrunk to `keep` of its side, centred on a border of each image's darkest value."""
    side = x.shape[-1]
    small = round(side * keep)
    start = (side - small) // 2
    out = x.amin(dim=(2, 3), keepdim=True).expand(-1, -1, side, side).clone()
    out[..., start:start + small, start:start + small] = F.interpolate(x, size=(small, small), mode="bilinear",
                                                                       antialias=True, align_corners=False)
    return out


def mirror(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(3,))


VIEWS: dict[str, View] = {
    "image": lambda x: x, "mirror": mirror, "zoom-in": zoom_in, "zoom-out": zoom_out,
    "zoom-in mirrored": lambda x: mirror(zoom_in(x)), "zoom-out mirrored": lambda x: mirror(zoom_out(x)),
}
# id -> (label, views averaged)
COMBINATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shipped": ("image + mirror (as shipped)", ("image", "mirror")),
    "image": ("image only (half the cost)", ("image",)),
    "zoom-in": ("image + zoom-in mirrored (same cost)", ("image", "zoom-in mirrored")),
    "zoom-out": ("image + zoom-out mirrored (same cost)", ("image", "zoom-out mirrored")),
    "four": ("image, mirror, zoom-in, zoom-out (2x cost)", ("image", "mirror", "zoom-in", "zoom-out")),
    "six": ("all six views (3x cost)", tuple(VIEWS)),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="production", help="stored model tag (its run's validation patients)")
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder the model was trained on")
    parser.add_argument("--only", nargs="+", choices=list(COMBINATIONS), default=list(COMBINATIONS),
                        help="score only these combinations (only their views are computed)")
    parser.add_argument("--target-sensitivity", type=bounded(float, 0, 1, low_open=True), default=0.97)
    parser.add_argument("--json", type=output_file, help="also write every combination's figures here")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(_score, get_args_parser().parse_args(argv))


def _score(args: argparse.Namespace) -> int:
    from models_registry import load_model
    from training.data import held_out_samples

    model = load_model(args.model)
    module, config = model.module.eval(), model.card.preprocess
    val = held_out_samples(args.data_dir, model.card.training_config, model.tag, model.card.data_fingerprint)
    labels = np.array([s.label for s in val])
    views = [view for view in VIEWS if any(view in COMBINATIONS[c][1] for c in args.only)]

    def every_view(grids: np.ndarray) -> np.ndarray:  # (N, views): each stressed grid is made once for all views
        with torch.inference_mode():
            x = to_tensor(grids, config)
            return np.stack([module.members_logits(VIEWS[view](x)).numpy() for view in views], axis=1)

    stacked = stressed_logits(every_view, [s.path for s in val], config)
    logits = {view: {stress: z[:, k] for stress, z in stacked.items()} for k, view in enumerate(views)}
    results = [summarise(COMBINATIONS[c][0], {s: np.mean([logits[v][s] for v in COMBINATIONS[c][1]], axis=0)
                                              for s in STRESSES}, labels, args.target_sensitivity) for c in args.only]
    print(f"{len(val)} validation images of the held-out patients of {model.tag}'s run, each combination of views "
          f"averaged in logits; operating point as in training.compare ({', '.join(SHOWN)} shown)\n")
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model.tag, "n": len(val), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
