"""Train a pneumonia classifier from scratch on a `<split>/<CLASS>/<image>` folder.

    python -m training.train --data-dir ../shared/datasets/chest_xray --out runs/r1
    torchrun --nproc_per_node=2 -m training.train --data-dir ... --out runs/ddp

Plain functions and an argparse config with every knob named, in the style of
torchvision's references/classification. The run folder gets the config,
per-epoch metrics (JSON and CSV), plots, and the calibrated model, which is
also saved into the BentoML model store through `models_registry`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from core.cli import bounded, check_outside
from training import one_line, plots
from training.augment import AugmentConfig, augment_batch, mix_batch
from training.gate import fit_gate, format_report
from training.stress import format_stress_rows, stress_rows, stressed_logits
from core.calibration import choose_threshold, fit_temperature
from training.data import CLASS_NAMES, DataFolderError, LoadedSplit, fingerprint, load_splits, training_split
from core.metrics import classification_report
from core.model import ModelSpec, PneumoniaNet, build_model
from core.preprocess import PreprocessConfig, to_tensor


_AUGMENT_HELP = {
    "rotate_deg": "largest rotation, either way, in degrees",
    "scale": "zoom range (log-uniform)",
    "aspect": "width/height stretch range (log-uniform)",
    "shear_deg": "largest shear, either way, in degrees",
    "hflip": "probability of a mirror image",
    "gamma": "exposure curve range (log-uniform gamma)",
    "blur_p": "share of images blurred",
    "noise_p": "share of images given sensor noise",
    "noise_std": "standard deviation of that noise (grey range 0..1)",
    "erase_p": "share of images with a random occluder",
}


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The augmentation of a run from its `--aug-*` options (their defaults are AugmentConfig's)."""
    return AugmentConfig(**{name: getattr(args, f"aug_{name}") for name in AugmentConfig.model_fields})


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, required=True, help="folder holding <split>/NORMAL and <split>/PNEUMONIA")
    g.add_argument("--split", default="train", help="sub-folder to train on (split into train/validation by patient)")
    g.add_argument("--val-fraction", type=bounded(float, 0, 1, low_open=True, high_open=True), default=0.15, help="share of images (by patient) held out for validation")
    g.add_argument("--max-per-class", type=bounded(int, 1), default=None, help="use at most this many images per class (smoke runs)")
    g.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images with a report instead of failing")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="mobilenet_v3_small", choices=list(ModelSpec.model_fields["arch"].annotation.__args__))
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--normalization", default="per_image",
                   choices=list(PreprocessConfig.model_fields["normalization"].annotation.__args__),
                   help="how grey levels are normalised (core.preprocess.PreprocessConfig)")
    g.add_argument("--dicom-window", type=int, default=0,
                   help="which VOI LUT or Window Center/Width of DICOM inputs to apply (0: the first); stored with "
                   "the model, so serving windows as training did")
    g.add_argument("--dropout", type=float, default=0.2)
    g.add_argument("--no-tta", dest="tta", action="store_false", help="disable mirror test-time augmentation")
    g.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (needs network access)")
    g = p.add_argument_group("augmentation", "applied to each training batch (training/augment.py)")
    for name, spec in AugmentConfig.model_fields.items():
        flag, default = "--aug-" + name.replace("_", "-"), spec.default
        pair = isinstance(default, tuple)
        g.add_argument(flag, dest=f"aug_{name}", type=float, default=list(default) if pair else default,
                       nargs=2 if pair else None, metavar=("LOW", "HIGH") if pair else "VALUE",
                       help=spec.description or _AUGMENT_HELP[name])
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=bounded(int, 1), default=20)
    g.add_argument("--batch-size", type=bounded(int, 2), default=64,
                   help="per process; at least 2 (BatchNorm needs two images to train on)")
    g.add_argument("--lr", type=bounded(float, 0, 10, low_open=True), default=3e-3, help="peak learning rate of the one-cycle schedule")
    g.add_argument("--weight-decay", type=bounded(float, 0, 10), default=0.05)
    g.add_argument("--warmup-fraction", type=bounded(float, 0, 1, high_open=True), default=0.1)
    g.add_argument("--label-smoothing", type=bounded(float, 0, 1, high_open=True), default=0.05)
    g.add_argument("--ema-decay", type=bounded(float, 0, 1, high_open=True), default=0.998, help="decay of the weight average evaluated and saved")
    g.add_argument("--bn-images", type=bounded(int, 2), default=1024, help="clean training images used to re-estimate BatchNorm statistics before each evaluation")
    g.add_argument("--patience", type=bounded(int, 1), default=8, help="early stop after this many epochs without a better validation ROC-AUC")
    g.add_argument("--select", choices=["best", "last"], default="best",
                   help="keep the epoch with the best validation ROC-AUC, or the last one (validation then chooses nothing)")
    g.add_argument("--seed", type=bounded(int, 0, 2**31 - 1), default=0)
    g.add_argument("--threads", type=bounded(int, 0), default=0, help="torch threads per process (0: cores / processes)")
    g = p.add_argument_group("calibration")
    g.add_argument("--target-sensitivity", type=bounded(float, 0, 1, low_open=True), default=0.97, help="pneumonia recall the threshold must reach on validation")
    g.add_argument("--threshold-policy", choices=["clean", "stressed"], default="stressed",
                   help="reach the target on clean validation images, or on them under every stress of training/stress.py")
    g.add_argument("--no-gate", action="store_true", help="save the model without an input-validity gate (not recommended)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="run folder for config, metrics, plots")
    g.add_argument("--no-register", dest="register", action="store_false", help="do not save into the BentoML store")
    g.add_argument("--promote", action="store_true", help="promote the saved model to production")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def single_process_device() -> torch.device:
    """Where a run outside torchrun trains: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, single_process_device()


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.inference_mode()
def predict_logits(module: torch.nn.Module, split: LoadedSplit, preprocess: PreprocessConfig,
                   device: torch.device, batch_size: int = 128) -> np.ndarray:
    module.eval()
    out = [module(to_tensor(split.pixels[i:i + batch_size], preprocess).to(device)).float().cpu()
           for i in range(0, len(split.labels), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def recompute_batchnorm(module: torch.nn.Module, split: LoadedSplit, preprocess: PreprocessConfig,
                        device: torch.device, images: int, batch_size: int = 64, seed: int = 0) -> None:
    """Re-estimate BatchNorm statistics on clean training images ("precise BN").

    Early in from-scratch training the activations move faster than running
    averages follow, and the evaluated model collapses to a constant; exact
    statistics on un-augmented images match what evaluation and serving see.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the passes below
    module.train()
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:images]
    for i in range(0, len(order), batch_size):
        index = order[i:i + batch_size]
        if len(index) > 1:
            module(to_tensor(split.pixels[index], preprocess).to(device))
    for norm in norms:
        norm.momentum = 0.1
    module.eval()


def train_one_epoch(model, optimizer, scheduler, ema, train: LoadedSplit, args, preprocess, augment,
                    gen: torch.Generator, epoch: int, rank: int, world: int, device: torch.device,
                    pos_weight: torch.Tensor) -> float:
    model.train()
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    per_rank = len(order) // world
    order = order[rank * per_rank:(rank + 1) * per_rank]
    steps = per_rank // args.batch_size  # drop the ragged last batch: BatchNorm dislikes tiny batches
    total, seen = 0.0, 0
    bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not (args.progress and rank == 0), leave=False, unit="batch")
    for step in bar:
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        # Augment on the training device: on a GPU the CPU would otherwise be the bottleneck.
        x, y = mix_batch(augment_batch(train.pixels[index].to(device), augment, gen), train.labels[index], augment, gen)
        x, y = to_tensor(x, preprocess), y.to(device)
        target = y * (1 - args.label_smoothing) + 0.5 * args.label_smoothing
        loss = F.binary_cross_entropy_with_logits(model(x), target, pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)
        value = loss.item()
        if not math.isfinite(value):  # NaN from here on: hours of training for an error only at the end
            raise ValueError(f"training diverged at epoch {epoch}, step {step}: the loss is {value}; lower --lr (now "
                             f"{args.lr:g}) or --weight-decay (now {args.weight_decay:g}), or narrow the --aug-* ranges")
        total += value * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(seen, 1)


def load_data(args: argparse.Namespace, show: bool) -> tuple[LoadedSplit, LoadedSplit]:
    """The training folder split by patient into train and validation, decoded into memory."""
    preprocess = preprocess_config(args)
    train_samples, val_samples = training_split(args.data_dir, args.split, args.val_fraction, args.seed, args.max_per_class)
    train, val = load_splits([train_samples, val_samples], preprocess, skip_bad=args.skip_bad_images, progress=show,
                             descriptions=["decoding train", "decoding validation"])
    return train, val


def preprocess_config(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(image_size=args.image_size, normalization=args.normalization,
                            dicom_window=args.dicom_window)


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(arch=args.arch, dropout=args.dropout, tta_hflip=args.tta)


def check_options(args: argparse.Namespace) -> None:
    """Validate the typed configurations the options make: exit 2 with one line `error: argument --aug-scale: ...`,
    before any image is read (a NaN or a zero in a log-uniform range otherwise failed
    after the data was loaded, or after an epoch)."""
    from pydantic import ValidationError

    for build, prefix in ((augment_config, "--aug-"), (preprocess_config, "--"), (model_spec, "--")):
        try:
            build(args)
        except ValidationError as exc:
            error = exc.errors()[0]
            message = error["msg"].removeprefix("Value error, ")
            field = str(error["loc"][0]) if error["loc"] else message.split(":")[0]
            flag = {"tta_hflip": "--no-tta"}.get(field, prefix + field.replace("_", "-"))
            print(f"error: argument {flag}: {message.removeprefix(field + ': ')}", file=sys.stderr)
            raise SystemExit(2)


def train_model(args: argparse.Namespace, train: LoadedSplit, val: LoadedSplit, *, rank: int = 0, world: int = 1,
                device: torch.device = torch.device("cpu")) -> tuple[PneumoniaNet, int, list[dict]]:
    """Train from scratch; returns the weight average of the chosen epoch (`--select`), that epoch and the history.

    `val` only reports progress (and, with `--select best`, picks the epoch); cross-validation
    uses `--select last`, so its held-out fold never chooses anything.
    """
    check_steps(len(train.labels), args.batch_size, world)
    gen = seed_everything(args.seed + rank)
    preprocess, augment = preprocess_config(args), augment_config(args)
    # channels_last doubles CPU training throughput of MobileNetV3 (oneDNN's preferred layout).
    model = build_model(model_spec(args), pretrained=args.pretrained).to(device, memory_format=torch.channels_last)
    decay = args.ema_decay

    def ema_update(average: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        # Warm-up: a plain mean over the first 1/(1-decay) steps, then exponential.
        weight = max(1.0 - decay, 1.0 / (float(count) + 1.0))
        return average + (current - average) * weight

    ema = AveragedModel(model, avg_fn=ema_update, use_buffers=True)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, (len(train.labels) // world) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                    pct_start=args.warmup_fraction)
    positives = float(train.labels.sum())
    pos_weight = torch.tensor((len(train.labels) - positives) / max(positives, 1.0), device=device)

    history: list[dict] = []
    best_auc, best_state, best_epoch, stale = -1.0, None, 0, 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.monotonic()
        loss = train_one_epoch(ddp_model, optimizer, scheduler, ema, train, args, preprocess, augment, gen, epoch,
                               rank, world, device, pos_weight)
        stop = torch.zeros(1)
        if rank == 0:
            recompute_batchnorm(ema.module, train, preprocess, device, args.bn_images, seed=args.seed)
            logits = predict_logits(ema.module, val, preprocess, device)
            report = classification_report(val.labels.numpy(), 1 / (1 + np.exp(-logits)), 0.5)
            val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), val.labels.float()))
            row = {"epoch": epoch, "train_loss": loss, "val_loss": val_loss, "val_roc_auc": report["roc_auc"],
                   "val_accuracy": report["accuracy"], "lr": scheduler.get_last_lr()[0], "seconds": time.monotonic() - t0}
            history.append(row)
            improved = report["roc_auc"] > best_auc if args.select == "best" else True
            if improved:
                best_auc, best_epoch, stale = report["roc_auc"], epoch, 0
                best_state = copy.deepcopy(ema.module.state_dict())
            else:
                stale += 1
            print(f"epoch {epoch:3d}/{args.epochs}  train_loss {loss:.4f}  val_loss {val_loss:.4f}  "
                  f"val_auc {report['roc_auc']:.4f}  val_acc@0.5 {report['accuracy']:.4f}  "
                  f"{row['seconds']:.0f}s{'  *kept' if improved else ''}", flush=True)
            if stale >= args.patience:
                print(f"early stop: no better validation ROC-AUC for {args.patience} epochs", flush=True)
                stop[0] = 1
        if world > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            break
    module = ema.module
    if best_state is not None:
        module.load_state_dict(best_state)
    return module.cpu().eval(), best_epoch, history


RUN_FILES = ("config.json", "weights.pt", "metrics.json", "model_tag.txt")  # any of them: --out holds a run
# Everything `main` and `finish` write into a run folder: a run replacing another (--overwrite) removes them all
# when it starts writing, so that no file of the replaced run (its model tag, its gate report) is left for
# `training.export` to mix with the new one.
RUN_OUTPUTS = (*RUN_FILES, "stress.md", "validity.md", "metrics.csv", "curves.png", "roc.png", "confusion.png")


def check_out(out: Path, overwrite: bool, data_dir: Path) -> None:
    """Refuse a run folder that holds a run (its config would be replaced at once, its weights at the end: an
    interrupted re-run leaves a mix), lies in a class folder the training images are read from, or cannot be
    made, before any image is read."""
    check_outside(out, [data_dir / "train" / name for name in CLASS_NAMES], "--out", "--data-dir", data_dir)
    try:  # the card and config.json record it as text: a name that is not UTF-8 failed only after the training
        str(out.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"--out {os.fsencode(out)!r}: the path is not UTF-8 text, which the run's records need; "
                         "choose another") from None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); choose a new folder, "
                         "or pass --overwrite to replace it")
    if any(out.glob("fold*.json")):
        raise ValueError(f"--out {out} holds a cross-validation (fold*.json); choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot make the run folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the run folder is not writable")


def replace_earlier_run(out: Path) -> None:
    """Remove the files of the run in `out` (only those, and only when it holds a run), once the run replacing it
    has its data and starts writing: a replacement that fails earlier leaves the earlier run whole."""
    if not any((out / name).exists() for name in RUN_FILES):
        return
    for name in RUN_OUTPUTS:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {out}: cannot remove the earlier run's {name} ({exc.strerror or exc})") from None


def check_steps(images: int, batch_size: int, world: int = 1) -> None:
    """Refuse a batch larger than the training images of a process: every epoch would be zero steps, and an
    untrained model would be saved."""
    if images // world < batch_size:
        raise ValueError(f"--batch-size {batch_size} is more than the {images // world} training images each "
                         "process has: no training step would run; lower --batch-size")


def main(args: argparse.Namespace) -> int:
    # Validate the configuration before anything slow, so a bad option fails at once with its name.
    augment_config(args), preprocess_config(args), model_spec(args)
    check_out(args.out, args.overwrite, args.data_dir)
    rank, world, device = setup_distributed()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    started = time.monotonic()
    train, val = load_data(args, show=args.progress and rank == 0)
    data_fp = fingerprint(train.samples + val.samples)
    check_steps(len(train.labels), args.batch_size, world)
    if rank == 0:
        replace_earlier_run(args.out)  # check_out refused a run there unless --overwrite
        args.writing = True  # from here, an interrupted run leaves an unfinished one in --out
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        # The commit is read now, before the long run: a commit or an edit made while it trains must not be recorded
        # as what produced it.
        config.update(command="python -m training.train " + " ".join(sys.argv[1:]), world_size=world,
                      code_version=code_version(),
                      augment=augment_config(args).model_dump(), preprocess=preprocess_config(args).model_dump(),
                      spec=model_spec(args).model_dump())
        (args.out / "config.json").write_text(json.dumps(config, indent=2))
        print(f"train {len(train.labels)} images / val {len(val.labels)} images "
              f"({len({s.patient for s in train.samples})} / {len({s.patient for s in val.samples})} patients), "
              f"data fingerprint {data_fp[:12]}, {world} process(es), {torch.get_num_threads()} threads each", flush=True)
    module, best_epoch, history = train_model(args, train, val, rank=rank, world=world, device=device)
    if rank == 0:
        finish(args, module, best_epoch, history, train, val, data_fp, started)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def choose_operating_point(args: argparse.Namespace, clean: np.ndarray, stressed: dict[str, np.ndarray],
                           labels: np.ndarray, temperature: float) -> float:
    """The threshold policy (`--threshold-policy`).

    clean: the highest threshold reaching the target sensitivity on clean validation images.
    stressed: the same on every validation image under every stress of the suite at once, so the
    operating point already accounts for a new site's acquisition changes.
    """
    if args.threshold_policy == "clean":
        return choose_threshold(labels, 1 / (1 + np.exp(-clean / temperature)), args.target_sensitivity)
    pooled = np.concatenate(list(stressed.values()))
    return choose_threshold(np.tile(labels, len(stressed)), 1 / (1 + np.exp(-pooled / temperature)), args.target_sensitivity)


def finish(args, module: PneumoniaNet, best_epoch: int | None, history: list[dict], train: LoadedSplit, val: LoadedSplit,
           data_fp: str, started: float) -> None:
    """Calibrate on validation, pick the operating point, stress-test, fit the validity gate, save and register.

    `started` is when the work behind `module` began (monotonic clock): its training time is measured up to now.
    """
    preprocess = preprocess_config(args)
    logits = predict_logits(module, val, preprocess, torch.device("cpu"))
    labels = val.labels.numpy()
    temperature = fit_temperature(logits, labels)
    paths = [s.path for s in val.samples]

    def logits_of(grids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(to_tensor(grids, preprocess)).float().numpy()

    stressed = stressed_logits(logits_of, paths, preprocess)
    threshold = choose_operating_point(args, logits, stressed, labels, temperature)
    probs = 1 / (1 + np.exp(-logits / temperature))
    report = classification_report(labels, probs, threshold)
    report["best_epoch"] = best_epoch
    stress = stress_rows(stressed, labels, temperature, threshold)
    report["stress"] = {row["stress"]: {k: v for k, v in row.items() if k != "stress"} for row in stress}
    report["threshold_policy"] = args.threshold_policy
    training_seconds = time.monotonic() - started

    out: Path = args.out
    (out / "metrics.json").write_text(json.dumps({"history": history, "validation": report, "temperature": temperature,
                                                  "threshold": threshold, "training_seconds": training_seconds}, indent=2))
    (out / "stress.md").write_text(format_stress_rows(stress) + "\n")
    if history:  # an ensemble of stored members (training.ensemble) has no epochs of its own
        with open(out / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        plots.training_curves(history, out / "curves.png")
    plots.roc(labels, probs, threshold, out / "roc.png", f"validation ROC (AUC {report['roc_auc']:.4f})")
    plots.confusion(report["confusion_matrix"], out / "confusion.png", f"validation @ threshold {threshold:.3f}")
    worst = min(stress, key=lambda r: r["specificity"])
    kept = "ensemble" if best_epoch is None else f"kept epoch {best_epoch}"
    print(f"{kept}: val ROC-AUC {report['roc_auc']:.4f}, temperature {temperature:.3f}, "
          f"threshold {threshold:.4f} ({args.threshold_policy}) -> sensitivity {report['per_class']['PNEUMONIA']['recall']:.4f}, "
          f"specificity {report['per_class']['NORMAL']['recall']:.4f}, accuracy {report['accuracy']:.4f}, "
          f"ECE {report['ece']:.4f}; worst stress '{worst['stress']}': specificity {worst['specificity']:.3f}, "
          f"ROC-AUC {worst['roc_auc']:.4f}; trained in {training_seconds / 60:.1f} min", flush=True)
    torch.save(module.state_dict(), out / "weights.pt")  # kept even if registering fails below
    if not args.register:
        return
    from models_registry import ModelCard, RegistryError, promote, save_model

    gate = None if args.no_gate else fit_gate(module, preprocess, train, val, seed=args.seed)
    if gate is not None:
        (out / "validity.md").write_text(format_report(gate.report, gate.config) + "\n")
        print(f"validity gate: {gate.report['validation_clean']['rate']:.2%} of validation X-rays refused "
              f"({gate.report['validation_stressed']['rate']:.2%} stressed); offline negatives caught "
              f"{gate.report['negatives']['catch_rate']:.1%}", flush=True)
    config = json.loads((out / "config.json").read_text())
    card = ModelCard(spec=module.spec, preprocess=preprocess, class_names=CLASS_NAMES, temperature=temperature,
                     threshold=threshold, target_sensitivity=args.target_sensitivity, val_metrics=report,
                     training_config=config, data_fingerprint=data_fp,
                     code_version=config["code_version"], training_seconds=round(training_seconds, 1),
                     validity=gate.config if gate else None)
    tag = save_model(module, card, validity=gate.arrays if gate else None)
    (out / "model_tag.txt").write_text(tag + "\n")
    if args.promote:
        try:
            promote(tag)
        except RegistryError as exc:  # e.g. clearly worse than production: the run and the stored model stay
            raise RegistryError(f"{tag} was saved, not promoted: {exc}") from None
    print(f"saved {tag} to the BentoML model store{' and promoted it to production' if args.promote else ''}", flush=True)


def cli(argv: list[str] | None = None) -> int:
    """`python -m training.train`: exit 2 with the reason (every data-folder problem listed), never a stack trace."""
    parser = get_args_parser()
    # Here, not in get_args_parser: crossval and ensemble build on those options and keep their own folders.
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    args = parser.parse_args(argv)
    if args.promote and not args.register:  # nothing would be saved to promote (a helper's find: silently ignored)
        parser.error("--promote needs the model saved in the store: leave out --no-register")
    check_options(args)
    registry_errors: tuple[type[Exception], ...] = ()
    if args.register:  # without it, BentoML need not be installed (a lent GPU machine that only trains had to stub it)
        from models_registry import RegistryError
        registry_errors = (RegistryError,)

    made = not args.out.exists()  # a run folder this command makes is removed again if it writes nothing into it
    try:
        return main(args)
    except DataFolderError as exc:
        _remove_unused(args.out, made, args)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (*registry_errors, OSError, ValueError) as exc:  # pydantic's ValidationError (a bad --aug-* value) included
        _remove_unused(args.out, made, args)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "writing", False):
            print(f"interrupted: no model was saved; {args.out} holds an unfinished run (the same command with "
                  "--overwrite starts again)", file=sys.stderr)
        else:
            _remove_unused(args.out, made, args)
            print(f"interrupted before the run wrote anything: {args.out} is as it was", file=sys.stderr)
        return 130


def _remove_unused(out: Path, made: bool, args: argparse.Namespace) -> None:
    """Remove the run folder this command made when the run failed before writing into it: a bad data folder left
    an empty --out behind, and an interrupted run said the folder was "as it was" though it had not existed."""
    if made and not getattr(args, "writing", False):
        try:
            out.rmdir()  # only an empty folder
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(cli())
