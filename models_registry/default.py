"""The default model shipped in the repository, so a fresh machine can serve without training."""

from __future__ import annotations

from pathlib import Path

from models_registry.store import (MODEL_NAME, RegistryError, ever_promoted, import_model, is_stored,
                                   pin_implicit_production, production_tag, promote, resolve_tag, stored_tags)

DEFAULT_ARCHIVE = Path(__file__).resolve().parent.parent / "default_model" / "pneumonia-classifier.bentomodel"


def import_default(archive: Path = DEFAULT_ARCHIVE) -> str:
    """Import the shipped archive; promote it when no production model exists or the promoted one is gone."""
    current = production_tag()
    if current is not None and is_stored(current):
        # Make an implicit single-model production explicit before adding a second model. Not `promote`: it loads the
        # model, and a production model whose weights were damaged stopped this import, the mend messages name.
        pin_implicit_production(MODEL_NAME)
        known = set(stored_tags())
        tag = import_model(archive)
        done = f"{tag} is already in the store" if tag in known else f"imported {tag}"
        return f"{done}; production stays {current}"
    tag = import_model(archive)
    promote(tag)
    if current is None:
        return f"imported {tag} and promoted it to production"
    return f"the production model {current} is no longer in the store: imported {tag} and promoted it"


def ensure_default(archive: Path = DEFAULT_ARCHIVE) -> str:
    """Import and promote the shipped model only when the store has no production model."""
    current = production_tag()
    if current is None:
        if stored_tags() and ever_promoted():  # `delete production --force` with other models stored (a review's find)
            raise RegistryError("no production model: the promoted one was deleted and other models are stored; "
                                "promote one of them (python -m models_registry list, then promote TAG), or restore "
                                "the shipped one (python -m models_registry import-default)")
        return import_default(archive)
    if is_stored(current):
        resolve_tag(current)  # a damaged production folder: RegistryError naming it and the mend (`./dev.sh serve` stops)
        return f"production model: {current}"
    if stored_tags():  # other models are there: which one to serve is the operator's choice, not ours
        # An error, not a warning on stdout with exit 0: `./dev.sh serve` went on to a server that could not start.
        raise RegistryError(f"the production model {current} is no longer in the store; promote one of the stored "
                            "models (python -m models_registry list, then promote TAG)")
    # The promoted model was deleted outside the registry (`bentoml models delete`) and nothing else is stored.
    return import_default(archive)
