"""Training side of the pneumonia classifier: data folders and splits, augmentation, the training loop,
calibration fitting, evaluation, plots and export. Imports core and models_registry."""

from __future__ import annotations

import re


def one_line(exc: BaseException) -> str:
    """An exception as one line for a command line's error (pydantic's line breaks and doc links folded away)."""
    return " ".join(re.sub(r"For further information visit \S+", "", str(exc)).split()) or type(exc).__name__
