"""Training side of the pneumonia classifier: data folders and splits, augmentation, the training loop,
calibration fitting, evaluation, plots and export. Imports core and models_registry."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable


def one_line(exc: BaseException) -> str:
    """An exception as one line for a command line's error (pydantic's line breaks and doc links folded away)."""
    return " ".join(re.sub(r"For further information visit \S+", "", str(exc)).split()) or type(exc).__name__


def run_command(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A command line's body, offline: its exit code, or 2 with one line on stderr on any failure (no stack trace)."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    try:
        return body(args)
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line, never a stack trace
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
