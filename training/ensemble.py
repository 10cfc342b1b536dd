"""Combine stored models into one averaged-logit ensemble, calibrated, stressed and gated like a trained model.

    python -m training.ensemble --models TAG_A TAG_B --data-dir ../shared/datasets/chest_xray --out runs/ab

The members must have been trained on the same patient split of the same folder
(same split arguments and data fingerprint) with the same architecture and
preprocessing: the ensemble is then scored, like each member was, on validation
patients none of them trained on. Its temperature and threshold are fitted anew
(averaging logits changes their scale), the stress table and the validity gate
(which reads the first member's features) are made by the same `training.train.finish`,
and it is saved as one new model version: served, explained, calibrated per site,
promoted and rolled back like any other. Its training time is the sum of the
members' plus this command's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.cli import bounded
from training import check_distinct_networks, run_command

# The member's training options that decide its patient split and input grid: the ensemble's run reuses them.
SHARED_OPTIONS = ("split", "val_fraction", "max_per_class", "skip_bad_images", "seed", "image_size",
                  "normalization", "dicom_window", "arch", "dropout")
# Options added after some models were trained: a card without them had the default.
LATER_OPTIONS = {"max_per_class": None, "skip_bad_images": False, "dicom_window": 0}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="two or more stored models (tags or versions)")
    p.add_argument("--data-dir", type=Path, required=True, help="the folder the members were trained on")
    p.add_argument("--out", type=Path, required=True, help="run folder for config, metrics, stress table, plots")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="average the members' logits on the image only, without its mirror image (half the compute)")
    p.add_argument("--target-sensitivity", type=bounded(float, 0, 1, low_open=True), default=0.97)
    p.add_argument("--threshold-policy", choices=["clean", "stressed"], default="stressed")
    p.add_argument("--no-gate", action="store_true", help="save the ensemble without an input-validity gate")
    p.add_argument("--no-register", dest="register", action="store_false", help="do not save into the BentoML store")
    p.add_argument("--promote", action="store_true", help="promote the saved ensemble to production")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m training.ensemble`: exit 2 with one line on any failure."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.promote and not args.register:  # nothing would be saved to promote: it was ignored without a word
        parser.error("--promote needs the ensemble saved in the store: leave out --no-register")
    return run_command(_combine, args)


def _members_agree(members: list) -> dict:
    """The first member's training configuration, after checking that every member shares what must be shared."""
    if len(members) < 2:
        raise ValueError("an ensemble needs two or more models")
    check_distinct_networks(members)  # a re-gated version has a tag of its own and the same network (a helper's find)
    configs = [LATER_OPTIONS | m.card.training_config for m in members]
    for m, config in zip(members, configs):
        if m.card.spec.members != 1:
            raise ValueError(f"{m.tag} is an ensemble already; list its members instead")
        if m.card.site_calibration is not None:
            raise ValueError(f"{m.tag} is a site-calibrated version; combine the models it was derived from")
        missing = [key for key in SHARED_OPTIONS if key not in config]
        if missing:
            raise ValueError(f"{m.tag} does not record its training options {', '.join(missing)}")
    for key in SHARED_OPTIONS:
        values = {json.dumps(config[key]) for config in configs}
        if len(values) != 1:
            raise ValueError(f"the members differ in their training option {key!r} ({', '.join(sorted(values))}): "
                             "they must share the patient split and the input grid")
    if len({m.card.data_fingerprint for m in members}) != 1:
        raise ValueError("the members were trained on different data (their data fingerprints differ)")
    if len({m.card.spec.in_channels for m in members}) != 1:
        raise ValueError("the members take different numbers of input channels")
    return configs[0]


def _combine(args: argparse.Namespace) -> int:
    import torch

    from core.model import ModelSpec, PneumoniaNet
    from models_registry import load_model
    from training.data import fingerprint
    from training.train import (check_out, code_version, finish, get_args_parser as train_parser, load_data,
                                preprocess_config, replace_earlier_run)

    started = time.monotonic()
    check_out(args.out, args.overwrite, args.data_dir)
    members = [load_model(ref) for ref in args.models]
    config = _members_agree(members)
    run = train_parser().parse_args(["--data-dir", str(args.data_dir), "--out", str(args.out)])
    for key in SHARED_OPTIONS:
        setattr(run, key, config[key])
    if preprocess_config(run) != members[0].card.preprocess:
        raise ValueError(f"{members[0].tag} was stored with preprocessing its training options do not describe")
    for key in ("tta", "target_sensitivity", "threshold_policy", "no_gate", "register", "promote", "progress"):
        setattr(run, key, getattr(args, key))
    spec = ModelSpec.model_validate(members[0].card.spec.model_dump() | {"members": len(members), "tta_hflip": args.tta})
    module = PneumoniaNet(spec)
    for net, member in zip(module.networks(), members):
        net.load_state_dict(member.module.backbone.state_dict())
    module = module.to(memory_format=torch.channels_last).eval()

    train, val = load_data(run, show=args.progress)
    data_fp = fingerprint(train.samples + val.samples)
    if data_fp != members[0].card.data_fingerprint:
        raise ValueError(f"{args.data_dir} is not the data the members were trained on (data fingerprint "
                         f"{data_fp[:12]}, theirs {members[0].card.data_fingerprint[:12]})")
    member_seconds = sum(m.card.training_seconds or 0.0 for m in members)
    replace_earlier_run(args.out)  # check_out refused a run there unless --overwrite
    record = {key: config[key] for key in SHARED_OPTIONS}
    record.update(data_dir=str(args.data_dir), out=str(args.out), tta=args.tta, target_sensitivity=args.target_sensitivity,
                  threshold_policy=args.threshold_policy,
                  command="python -m training.ensemble " + " ".join(sys.argv[1:]), code_version=code_version(),
                  spec=spec.model_dump(), preprocess=members[0].card.preprocess.model_dump(),
                  members=[{"tag": m.tag, "command": m.card.training_config.get("command"),
                            "training_seconds": m.card.training_seconds} for m in members])
    (args.out / "config.json").write_text(json.dumps(record, indent=2))
    print(f"ensemble of {len(members)} ({', '.join(m.tag for m in members)}), mirror view {'on' if args.tta else 'off'}: "
          f"val {len(val.labels)} images, data fingerprint {data_fp[:12]}", flush=True)
    finish(run, module, None, [], train, val, data_fp, started - member_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
