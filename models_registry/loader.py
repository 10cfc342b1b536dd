"""Load a stored model into a ready-to-run module, verifying its weights first."""

from __future__ import annotations

import hashlib
import io

import torch

from core.card import MODEL_NAME, WEIGHTS_FILE, ModelCard
from core.validity import VALIDITY_FILE, ValidityGate
from core.engines import Engine, build_runner
from core.inference import LoadedModel
from core.model import build_model
from models_registry.store import PRODUCTION, RegistryError, resolve_tag, store_path_of


class ModelIntegrityError(RegistryError):
    """The stored weights do not match the sha256 recorded when they were saved. `problem` is what is wrong, without
    the advice for a stored model (an import says its own: the model it could not load is not kept)."""

    def __init__(self, problem: str, advice: str = "", damaged: bool = False) -> None:
        super().__init__(f"{problem}; {advice}" if advice else problem)
        self.problem = problem
        self.damaged = damaged  # the files are not what was saved (a sha256 mismatch), not merely unusable here


def load_model(ref: str = PRODUCTION, name: str = MODEL_NAME, engine: Engine = "eager") -> LoadedModel:
    """Resolve `ref` ('production', a version or a tag), verify and load it in eval mode.

    `engine` chooses how the forward pass runs (core/engines.py); `module`
    stays the eager reference either way.
    """
    tag = resolve_tag(ref, name)
    import bentoml

    stored = bentoml.models.get(tag)
    try:
        card = ModelCard.model_validate(stored.info.metadata)
    except Exception as exc:
        raise RegistryError(f"model {tag} has unusable metadata: {exc}") from None
    weights_path = store_path_of(tag) / WEIGHTS_FILE
    try:
        payload = weights_path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(f"model {tag}: cannot read weights ({exc})") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != card.weights_sha256:
        raise ModelIntegrityError(
            f"model {tag}: weights file {weights_path} is corrupt "
            f"(sha256 {digest[:16]}..., expected {card.weights_sha256[:16]}...)",
            f"delete it (python -m models_registry delete {tag} --force) and import its archive again, or re-train it",
            damaged=True,
        )
    module = build_model(card.spec)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as exc:
        raise ModelIntegrityError(f"model {tag}: weights do not fit architecture {card.spec.arch}: {exc}") from None
    module = module.to(memory_format=torch.channels_last).eval()  # oneDNN's fast layout on CPU
    runner = build_runner(module, engine, card.preprocess.image_size)
    return LoadedModel(tag=tag, module=module, card=card, engine=engine, runner=runner, gate=_load_gate(tag, card))


def _load_gate(tag: str, card: ModelCard) -> ValidityGate | None:
    """The model's validity gate, verified against the sha256 in its card; None when it has none."""
    if card.validity is None:
        return None
    path = store_path_of(tag) / VALIDITY_FILE
    try:
        return ValidityGate.from_bytes(card.validity, path.read_bytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelIntegrityError(f"model {tag}: validity gate {path} is unusable ({exc})", "delete it "
                                 f"(python -m models_registry delete {tag} --force) and import its archive again") from None
