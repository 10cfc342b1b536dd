"""The OpenAPI document at /docs.json, as the service really answers.

BentoML generates it from the APIs' types, with three faults a generated client trips on (a helper's finds,
each checked with `jsonschema` against real answers): its error bodies say `detail` is a string (it is the list
of `{type, loc, msg}` that carries the reason codes); the top-level answers lose `null` from their optional
fields (`heatmap` of a refused image, `site_calibration`); and it names OpenAPI 3.0.2 while writing JSON Schema
2020-12 (`"type": "null"`, `prefixItems`), which is OpenAPI 3.1. It also declares none of the statuses the guard
answers (401, 413, 415, 429, 503, 504), their headers, or the API key. `published` mends BentoML's document.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from api.models import ErrorBody, Explanation, ModelInfo

OPENAPI_PATH = "/docs.json"
_REF = "#/components/schemas/{model}"
_ERROR = {"$ref": _REF.format(model="ErrorBody")}
_REQUEST_ID = {"X-Request-ID": {"description": "this request's id, as the request log records it",
                                "schema": {"type": "string"}}}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
# Statuses the guard (or BentoML around it) answers beside BentoML's 400/404/500, per kind of route.
_UPLOAD_ERRORS = {
    "413": ("request_too_large: the body is over PNEUMONIA_MAX_REQUEST_BYTES", {}),
    "415": ("unsupported_media_type: not multipart/form-data", {}),
    "429": ("rate_limited (the API key's or address's rate), or BentoML's own limit of calls in flight "
            "(PNEUMONIA_MAX_CONCURRENCY; its body is {\"error\": \"Too many requests\"} with no detail)", _RETRY_AFTER),
    "503": ("not_ready (the model is loading), explain_busy or explain_unavailable", _RETRY_AFTER),
    "504": ("not answered within PNEUMONIA_TIMEOUT_S (BentoML's body: {\"error\": ...}, no detail)", {}),
}


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """`model`'s schema as pydantic writes it (optional fields nullable), its sub-models added to `components`."""
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    return schema


def _response(description: str, headers: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "headers": {**_REQUEST_ID, **headers},
            "content": {"application/json": {"schema": _ERROR}}}


def published(spec: dict[str, Any], upload_routes: dict[str, str], keys: bool, protect_health: bool) -> dict[str, Any]:
    """BentoML's document mended (see the module's docstring); `spec` is left as it is."""
    spec = copy.deepcopy(spec)
    spec["openapi"] = "3.1.0"
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    error = _schema(ErrorBody, components)
    components["ErrorBody"] = error
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):  # BentoML's, with `detail` a string
        components[name] = error
    answers = {"/explain": ("Explanation", Explanation), "/health": ("ModelInfo", ModelInfo)}
    for name, model in answers.values():
        components[name] = _schema(model, components)
        components.pop(f"{name}IODescriptor", None)
    if keys:
        spec["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"},
        }
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            # BentoML's statuses are ints until JSON makes them strings
            responses = operation["responses"] = {str(k): v for k, v in operation.get("responses", {}).items()}
            for response in responses.values():  # the guard gives every answer one
                response["headers"] = {**response.get("headers", {}), **_REQUEST_ID}
            if "200" in responses and path in answers:
                responses["200"]["content"] = {"application/json": {"schema": {
                    "$ref": _REF.format(model=answers[path][0])}}}
            protected = path in upload_routes or (path == "/health" and protect_health)
            if keys and protected:
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
                responses["401"] = _response("unauthorized: no API key, or not one of the server's", {})
            if path in upload_routes:
                responses.update({status: _response(text, headers)
                                  for status, (text, headers) in _UPLOAD_ERRORS.items()})
    return spec
