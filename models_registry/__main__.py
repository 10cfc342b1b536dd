"""Command line for the model registry.

    python -m models_registry list
    python -m models_registry show production
    python -m models_registry promote TAG
    python -m models_registry rollback
    python -m models_registry delete TAG
    python -m models_registry export production out/
    python -m models_registry import model.bentomodel [--promote-if-none]
    python -m models_registry import-default
    python -m models_registry ensure-default
    python -m models_registry verify production
    python -m models_registry calibrate production --data site_xrays/ --out reports/site [--promote]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def one_line(exc: BaseException) -> str:
    """An exception as one line (pydantic's multi-line messages and doc links folded away)."""
    return " ".join(re.sub(r"For further information visit \S+", "", str(exc)).split()) or type(exc).__name__


def _table(rows: list[dict]) -> str:
    if not rows:
        return "no models in the store (try: python -m models_registry import-default)"
    cols = ["tag", "production", "created", "arch", "image_size", "roc_auc", "sensitivity", "specificity", "threshold",
            "measured_on", "size_mb"]

    def cell(v: object, digits: int = 4) -> str:
        if isinstance(v, bool):
            return "*" if v else ""
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return "" if v is None else str(v)

    readable = [r for r in rows if "broken" not in r]
    body = [[cell(r.get(c), 2 if c == "size_mb" else 4) for c in cols] for r in readable]
    widths = [max([len(c), *(len(b[i]) for b in body)]) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    broken = [f"{r['tag']}: unreadable, cannot be served ({r['broken']}); remove it with `python -m "
              f"models_registry delete {r['tag']} --force`, then import it again" for r in rows if "broken" in r]
    return "\n".join([fmt.format(*cols), *(fmt.format(*b) for b in body), *broken])


REF_HELP = ("'production', 'latest', a version (or the start of one that no other version shares) or a full "
            "tag pneumonia-classifier:VERSION")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models_registry", description="Manage pneumonia classifier models in the BentoML model store.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="every stored model with its key validation metrics")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("show", help="full metadata of one model")
    p.add_argument("ref", nargs="?", default="production", help=REF_HELP)
    p = sub.add_parser("promote", help="make a model the one the service serves")
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("--force", action="store_true", help="promote even when its validation ROC-AUC is more than "
                   "0.01 below the best model promoted so far, or its site calibration missed its sensitivity target")
    sub.add_parser("rollback", help="re-promote the previous production model")
    p = sub.add_parser("delete", help="delete a model from the store")
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("--force", action="store_true", help="also delete the production model")
    p = sub.add_parser("export", help="write a .bentomodel archive (the model is loaded and checked first)")
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("path", help="archive file or folder")
    p.add_argument("--force", action="store_true", help="replace a file at PATH that holds something else")
    p = sub.add_parser("import", help="import a .bentomodel archive")
    p.add_argument("path")
    p.add_argument("--promote-if-none", action="store_true", help="promote it when no production model exists")
    sub.add_parser("import-default", help="import the default model shipped in the repo, promoting it if none is promoted")
    sub.add_parser("ensure-default", help="import and promote the shipped default model only if no production model exists")
    p = sub.add_parser("verify", help="load a model and check its weights against the stored sha256")
    p.add_argument("ref", nargs="?", default="production")
    p = sub.add_parser("calibrate", help="fit temperature and threshold on a site's labeled X-rays; save a new version")
    p.add_argument("ref", nargs="?", default="production", help="the model to calibrate (stays untouched)")
    p.add_argument("--data", required=True, help="folder with NORMAL/ and PNEUMONIA/ X-rays from the site (any supported format)")
    p.add_argument("--out", default=None, help="report folder: report.md, calibration.json, calibration.png")
    p.add_argument("--target-sensitivity", type=float, default=None, help="pneumonia recall the threshold must reach "
                   "on the site data (default: the model's own target)")
    p.add_argument("--min-per-class", type=int, default=30, help="refuse with fewer usable images of either class")
    p.add_argument("--promote", action="store_true", help="promote the calibrated version to production")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import models_registry as reg
    from models_registry.default import ensure_default, import_default

    try:
        reg.store.check_home()
        if args.command == "list":
            rows = reg.list_models()
            print(json.dumps(rows, indent=2) if args.json else _table(rows))
        elif args.command == "show":
            from models_registry.store import show

            print(json.dumps(show(args.ref), indent=2, default=str))
        elif args.command == "promote":
            print(f"production is now {reg.promote(args.ref, force=args.force)}")
        elif args.command == "rollback":
            print(f"production is now {reg.rollback()}")
        elif args.command == "delete":
            print(f"deleted {reg.delete_model(args.ref, force=args.force)}")
        elif args.command == "export":
            print(f"wrote {reg.export_model(args.ref, args.path, overwrite=args.force)}")
        elif args.command == "import":
            known = set(reg.store.stored_tags())
            tag = reg.import_model(args.path, promote_if_none=args.promote_if_none)
            print(f"{tag} is already in the store with the same files" if tag in known else f"imported {tag}")
        elif args.command == "import-default":
            print(import_default())
        elif args.command == "ensure-default":
            print(ensure_default())
        elif args.command == "calibrate":
            from pathlib import Path

            from models_registry.calibrate import calibrate

            result = calibrate(args.ref, Path(args.data), Path(args.out) if args.out else None,
                               target_sensitivity=args.target_sensitivity, min_per_class=args.min_per_class)
            before, after = result.report["before"], result.report["after_cross_validated"]
            print(f"calibrated {result.source} on {result.report['images']} -> {result.tag}"
                  + (" (stored before: the same model, site data and target; no version added)" if result.reused else ""))
            for name, s in (("before", before), ("after (5-fold cross-validated)", after)):
                print(f"  {name:32s} threshold {s['threshold']:.4f}  sensitivity {s['sensitivity']:.3f}  "
                      f"specificity {s['specificity']:.3f}  ECE {s['ece']:.3f}")
            if args.out:
                print(f"report: {Path(args.out) / 'report.md'}")
            if result.report.get("copies_ignored"):
                print(f"note: {result.report['copies_ignored']} byte-identical copies of other files were left out",
                      file=sys.stderr)
            if "warning" in result.report:
                print(f"warning: {result.report['warning']}", file=sys.stderr)
            if args.promote:
                try:
                    print(f"production is now {reg.promote(result.tag)}")
                except reg.RegistryError as exc:
                    raise reg.RegistryError(f"{result.tag} was saved, not promoted: {exc}") from None
        elif args.command == "verify":
            model = reg.load_model(args.ref)
            print(f"{model.tag}: weights match sha256 {model.card.weights_sha256}")
    except reg.RegistryError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line, never a stack trace
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # an import is removed again unless checked; records are replaced in one step
        print("interrupted: see what the store holds with `python -m models_registry list`", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of the output left (`| head`): stop quietly, as a pipeline expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(141)  # 128 + SIGPIPE, the status of a tool the signal stops
