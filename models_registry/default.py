"""The default model shipped in the repository, so a fresh machine can serve without training."""

from __future__ import annotations

from pathlib import Path

from models_registry.store import import_model, production_tag, promote

DEFAULT_ARCHIVE = Path(__file__).resolve().parent.parent / "default_model" / "pneumonia-classifier.bentomodel"


def import_default(archive: Path = DEFAULT_ARCHIVE) -> str:
    """Import the shipped archive; promote it only when no production model exists yet."""
    current = production_tag()
    if current is not None:
        promote(current)  # make an implicit single-model production explicit before adding a second model
    tag = import_model(archive, promote_if_none=current is None)
    if current is None:
        return f"imported {tag} and promoted it to production"
    return f"imported {tag}; production stays {current}"


def ensure_default(archive: Path = DEFAULT_ARCHIVE) -> str:
    """Import and promote the shipped model only when the store has no production model."""
    current = production_tag()
    if current is not None:
        return f"production model: {current}"
    return import_default(archive)
