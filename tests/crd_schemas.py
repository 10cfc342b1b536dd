"""Structural JSON schemas of the custom resources in deploy/kubernetes (kubernetes-validate has none for them).

The fields used here, strict (no unknown properties) where this repository writes
them, after the CRDs: KEDA 2.x `ScaledObject` (keda.sh/v1alpha1; the Prometheus
scaler's metadata from its documentation), prometheus-operator `ServiceMonitor`
and `PrometheusRule` (monitoring.coreos.com/v1). ObjectMeta, LabelSelector and the
HPA behaviour are Kubernetes' own definitions, taken from kubernetes-validate's
bundled schemas of the same version as the built-in kinds.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
QUANTITY_STRING = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _object({
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": {"$ref": K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": spec,
    }, ("apiVersion", "kind", "metadata", "spec"))


PROMETHEUS_TRIGGER_METADATA = _object({
    "serverAddress": {"type": "string", "pattern": "^https?://"},
    "query": {"type": "string", "minLength": 1},
    "threshold": QUANTITY_STRING,
    "activationThreshold": QUANTITY_STRING,
    "namespace": {"type": "string"},
    "customHeaders": {"type": "string"},
    "ignoreNullValues": {"enum": ["true", "false"]},
    "unsafeSsl": {"enum": ["true", "false"]},
    "timeout": {"type": "string"},
}, ("serverAddress", "query", "threshold"))

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", _object({
    "scaleTargetRef": _object({
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string", "minLength": 1},
        "envSourceContainerName": {"type": "string"},
    }, ("name",)),
    "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": {"type": "integer", "minimum": 0},
    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
    "idleReplicaCount": {"type": "integer", "minimum": 0},
    "minReplicaCount": {"type": "integer", "minimum": 0},
    "maxReplicaCount": {"type": "integer", "minimum": 1},
    "fallback": _object({"failureThreshold": {"type": "integer", "minimum": 1},
                         "replicas": {"type": "integer", "minimum": 1}}, ("failureThreshold", "replicas")),
    "advanced": _object({
        "restoreToOriginalReplicaCount": {"type": "boolean"},
        "horizontalPodAutoscalerConfig": _object({
            "name": {"type": "string"},
            "behavior": {"$ref": K8S + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"},
        }),
    }),
    "triggers": {"type": "array", "minItems": 1, "items": {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
            "authenticationRef": _object({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["type", "metadata"],
        "additionalProperties": False,
        # The Prometheus scaler's own metadata, strictly.
        "if": {"properties": {"type": {"const": "prometheus"}}},
        "then": {"properties": {"metadata": PROMETHEUS_TRIGGER_METADATA}},
    }},
}, ("scaleTargetRef", "triggers")))

SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", _object({
    "selector": {"$ref": K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
    "namespaceSelector": _object({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}),
    "jobLabel": {"type": "string"},
    "targetLabels": {"type": "array", "items": {"type": "string"}},
    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
    "endpoints": {"type": "array", "minItems": 1, "items": _object({
        "port": {"type": "string"},
        "targetPort": INT_OR_STRING,
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"},
        "metricRelabelings": {"type": "array"},
        "relabelings": {"type": "array"},
    })},
}, ("selector", "endpoints")))

PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", _object({
    "groups": {"type": "array", "minItems": 1, "items": _object({
        "name": {"type": "string", "minLength": 1},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h|d)$"},
        "limit": {"type": "integer"},
        "rules": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {
                "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                "alert": {"type": "string", "minLength": 1},
                "expr": INT_OR_STRING,
                "for": {"type": "string"},
                "keep_firing_for": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["expr"],
            "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
            "additionalProperties": False,
        }},
    }, ("name", "rules"))},
}, ("groups",)))

SCHEMAS = {"ScaledObject": SCALED_OBJECT, "ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def validator(kind: str, kubernetes_version: str) -> jsonschema.Draft202012Validator:
    """A validator of `kind` whose Kubernetes references resolve to that version's strict definitions."""
    definitions = schema_contents(f"kubernetes-json-schema/v{kubernetes_version}-local-strict/_definitions.json",
                                  kubernetes_version)
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(SCHEMAS[kind], registry=registry)


def errors(resource: dict[str, Any], kubernetes_version: str) -> list[str]:
    """What is wrong with a custom resource, as `path: message` lines (empty: it fits its schema)."""
    found = validator(resource["kind"], kubernetes_version).iter_errors(resource)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]
