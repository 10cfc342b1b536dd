"""Everything that touches the BentoML model store: save, list, promote, roll back, export, load.

No other code in the project calls `bentoml.models` directly.

The names below are imported on first use (PEP 562): `python -m models_registry` imports this package before its
`__main__` runs, and importing torch and BentoML here took the 1.7 s in which a Ctrl-C printed a traceback that the
command line's own handler never saw.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME_OF = {
    "MODEL_NAME": "core.card",
    "ModelCard": "core.card",
    "LoadedModel": "models_registry.loader",
    "ModelIntegrityError": "models_registry.loader",
    "load_model": "models_registry.loader",
    **{name: "models_registry.store" for name in (
        "PRODUCTION", "RegistryError", "delete_model", "export_model", "import_model", "list_models",
        "production_tag", "promote", "read_card", "resolve_service_tag", "resolve_tag", "rollback", "save_model")},
}

__all__ = sorted(_HOME_OF)

_SUBMODULES = ("calibrate", "default", "loader", "store")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `models_registry.store` before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME_OF, *_SUBMODULES})
