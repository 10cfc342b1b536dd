"""Training side of the pneumonia classifier: data folders and splits, augmentation, the training loop,
calibration fitting, evaluation, plots and export. Imports core and models_registry."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any


def one_line(exc: BaseException) -> str:
    """An exception as one line for a command line's error (pydantic's line breaks and doc links folded away)."""
    return " ".join(re.sub(r"For further information visit \S+", "", str(exc)).split()) or type(exc).__name__


def run_command(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A command line's body, offline: its exit code, or 2 with one line on stderr on any failure (no stack trace)."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    try:
        return body(args)
    except BrokenPipeError:  # `... | head` stopped reading: nothing to say ("error: Broken pipe" said it wrongly)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line, never a stack trace
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def check_distinct_networks(models: Sequence[Any]) -> None:
    """ValueError when a stored model (`.tag`, `.card.weights_sha256`) is listed twice, or one network under two
    tags (a re-gated or re-calibrated version keeps its weights): it would only repeat a row or a member."""
    if len({m.tag for m in models}) != len(models):
        raise ValueError("a model is listed twice")
    first: dict[str, str] = {}
    for m in models:
        if (twin := first.setdefault(m.card.weights_sha256, m.tag)) != m.tag:
            raise ValueError(f"{m.tag} and {twin} have the same weights: list each network once")
