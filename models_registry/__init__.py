"""Everything that touches the BentoML model store: save, list, promote, roll back, export, load.

No other code in the project calls `bentoml.models` directly.
"""

from core.card import MODEL_NAME, ModelCard
from models_registry.loader import LoadedModel, ModelIntegrityError, load_model
from models_registry.store import (
    PRODUCTION,
    RegistryError,
    delete_model,
    export_model,
    import_model,
    list_models,
    production_tag,
    promote,
    read_card,
    resolve_service_tag,
    resolve_tag,
    rollback,
    save_model,
)

__all__ = [
    "MODEL_NAME",
    "PRODUCTION",
    "LoadedModel",
    "ModelCard",
    "ModelIntegrityError",
    "RegistryError",
    "delete_model",
    "export_model",
    "import_model",
    "list_models",
    "load_model",
    "production_tag",
    "promote",
    "read_card",
    "resolve_service_tag",
    "resolve_tag",
    "rollback",
    "save_model",
]
