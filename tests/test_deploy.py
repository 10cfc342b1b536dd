"""deploy/: Kubernetes manifests, Prometheus rules and the Grafana dashboard, checked offline with the real tools.

- `kubectl kustomize` of every overlay, piped through `kubernetes-validate --strict` (schemas bundled in the
  package, no network) for the built-in kinds; the custom resources (KEDA, Prometheus operator) against the
  structural schemas of tests/crd_schemas.py;
- the objects against each other and against the service: selectors, ports, settings names and values,
  memory from docs/results/memory.json, the image's user, shutdown grace;
- `promtool check rules` and `promtool test rules` on deploy/prometheus, and every PromQL query of the
  dashboard and the autoscalers through promtool's parser;
- every metric name (and the labels selected on) in the dashboard, the rules and the autoscalers exists on a
  live server's /metrics after real HTTP and gRPC traffic.

kubectl and promtool may be missing on other machines (`./dev.sh setup` installs promtool where it can): then
only the checks that need them skip, saying so.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness.paths import ROOT, VENV_BIN
from harness.payloads import xray_payloads
from harness.servers import ServerProcess
from tests.crd_schemas import errors as crd_errors

KUBERNETES_VERSION = "1.32.0"  # bundled by kubernetes-validate (1.25-1.37) and kubectl's own minor version here
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "kubernetes" / "overlays").iterdir() if p.is_dir())
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
RULES = DEPLOY / "prometheus" / "pneumonia-rules.yaml"
RULE_TESTS = sorted((DEPLOY / "prometheus").glob("*.test.yaml"))
DASHBOARD = DEPLOY / "grafana" / "pneumonia-classifier.json"
ADAPTER_VALUES = DEPLOY / "kubernetes" / "overlays" / "example-prometheus-adapter" / "prometheus-adapter-values.yaml"
# Labels the scrape adds to every series (ServiceMonitor target labels, kubernetes-pods relabelling).
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container"}


def tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed, so {purpose} is not checked here "
                    f"({'./dev.sh setup installs it with apt-get as root' if name == 'promtool' else 'install kubectl'})")
    return path


def run(args: list[str], stdin: str | None = None, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def builds() -> dict[str, str]:
    """`kubectl kustomize` of each overlay: its YAML stream."""
    kubectl = tool("kubectl", "the kustomize build of deploy/kubernetes")
    out = {}
    for overlay in OVERLAYS:
        result = run([kubectl, "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)])
        assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
        out[overlay] = result.stdout
    return out


def objects(stream: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(stream) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def kubernetes_validate(stream: str) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION, "-"],
               stdin=stream)


# ---------------------------------------------------------------- the manifests


def test_every_overlay_builds_and_its_builtin_kinds_validate_strictly(builds: dict[str, str]) -> None:
    assert {"example", "example-prometheus-adapter"} <= set(builds)
    for overlay, stream in builds.items():
        result = kubernetes_validate(stream)
        assert result.returncode == 0, f"{overlay}:\n{result.stdout}{result.stderr}"
        # kubernetes-validate passes a kind it has no schema for with a warning: a mistyped apiVersion of a
        # built-in kind would slip through that way. Only the custom resources may be unknown to it.
        unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr))
        assert unknown <= CRD_KINDS, f"{overlay}: no schema for {unknown - CRD_KINDS}"
        passed = set(re.findall(r"passed for resource (\w+)/", result.stdout + result.stderr))
        assert {"deployment", "service", "poddisruptionbudget", "networkpolicy", "serviceaccount", "configmap"} <= passed


def test_strict_validation_rejects_a_misspelt_field(builds: dict[str, str]) -> None:
    """The control: the same validator fails a Deployment with one unknown field and one wrong type."""
    docs = objects(builds["example"])
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    result = kubernetes_validate(yaml.safe_dump(deployment))
    assert result.returncode != 0 and "readOnlyRootFS" in result.stdout + result.stderr
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    assert kubernetes_validate(yaml.safe_dump(deployment)).returncode != 0


def test_custom_resources_fit_their_crd_schemas(builds: dict[str, str]) -> None:
    seen = set()
    for overlay, stream in builds.items():
        for doc in objects(stream):
            if doc["kind"] in CRD_KINDS:
                seen.add(doc["kind"])
                assert crd_errors(doc, KUBERNETES_VERSION) == [], f"{overlay} {doc['kind']}"
    assert seen == CRD_KINDS
    scaled = copy.deepcopy(one(objects(builds["example"]), "ScaledObject"))  # the control
    del scaled["spec"]["triggers"][0]["metadata"]["query"]
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["selectPolicy"] = 3
    problems = crd_errors(scaled, KUBERNETES_VERSION)
    assert any("'query' is a required property" in p for p in problems)
    assert any(p.startswith("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp") for p in problems)


def _selectors(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, str]]]:
    """(what, matchLabels) of every selector that must pick the classifier's pods."""
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "Service":
            yield "Service.spec.selector", spec["selector"]
        elif kind in ("Deployment", "PodDisruptionBudget", "ServiceMonitor"):
            yield f"{kind}.spec.selector", spec["selector"]["matchLabels"]
        elif kind == "NetworkPolicy":
            yield "NetworkPolicy.spec.podSelector", spec["podSelector"]["matchLabels"]
        if kind == "Deployment":
            for constraint in spec["template"]["spec"]["topologySpreadConstraints"]:
                yield f"topologySpread {constraint['topologyKey']}", constraint["labelSelector"]["matchLabels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_refer_to_each_other_correctly(builds: dict[str, str], overlay: str) -> None:
    docs = objects(builds[overlay])
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces and "default" not in namespaces, namespaces
    namespace = namespaces.pop()

    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for what, labels in _selectors(docs):
        assert labels, f"{what} is empty: it would select every pod of the namespace"
        assert labels.items() <= pod["metadata"]["labels"].items(), what

    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = one(docs, "Service")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(container_ports)
    monitor = one(docs, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e["honorLabels"] for e in monitor["spec"]["endpoints"])  # keeps BentoML's own `endpoint` label
    policy = one(docs, "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= set(container_ports)

    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert {s["configMapRef"]["name"] for s in container["envFrom"]} <= configmaps
    env = {e["name"]: e.get("value") for e in container["env"]}
    keys_file = Path(env["PNEUMONIA_SECURITY__API_KEYS_FILE"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secret = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert mounts[secret["name"]]["mountPath"] == str(keys_file.parent) and mounts[secret["name"]]["readOnly"]
    assert [i["path"] for i in secret["secret"]["items"]] == [keys_file.name]
    assert not secret["secret"].get("optional", False)  # without keys the pod must not start (open service)

    autoscalers = [d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    assert len(autoscalers) == 1, [d["kind"] for d in autoscalers]
    scaler = autoscalers[0]["spec"]
    assert scaler["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaler["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    minimum = scaler.get("minReplicaCount", scaler.get("minReplicas"))
    assert minimum >= 2 and one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1  # one pod always serves
    # A Deployment that names a replica count is set back to it by every `kubectl apply`, cutting autoscaled pods.
    assert "replicas" not in deployment["spec"]
    for trigger in scaler.get("triggers", []):  # KEDA's queries must select this namespace's series
        assert re.findall(r'namespace="([^"]*)"', trigger["metadata"]["query"]) == [namespace] * 2, trigger["name"]
        # an empty answer (no pod scraped) is an error that triggers the fallback, not a silent 0
        assert trigger["metadata"]["ignoreNullValues"] == "false", trigger["name"]


def _quantity(value: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_the_deployment_runs_the_bento_as_the_service_and_the_measurements_say(builds: dict[str, str],
                                                                               tmp_path: Path) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID
    from settings import ServingSettings

    docs = objects(builds["example"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    configmap = one(docs, "ConfigMap")["data"]

    # Ports: HTTP 3000 (BentoML's default) and the gRPC port the Bento's image sets (bentofile.yaml envs).
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    image_grpc_port = next(e["value"] for e in bentofile["envs"] if e["name"] == "PNEUMONIA_GRPC__PORT")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 3000, "grpc": int(image_grpc_port)} and env["PNEUMONIA_GRPC__PORT"] == image_grpc_port

    # Every PNEUMONIA_* variable names a setting, and the service accepts the values (its own validation).
    pneumonia = {k: v for k, v in {**configmap, **env}.items() if k.startswith("PNEUMONIA_")}
    for name in pneumonia:
        model: Any = ServingSettings
        for part in name.removeprefix("PNEUMONIA_").lower().split("__"):
            assert part in model.model_fields, f"{name} is not a setting (settings.py)"
            model = model.model_fields[part].annotation
    keys = tmp_path / "api-keys"  # stands in for the Secret's file
    keys.write_text("# one key per line\n" + "k" * 32 + "\n")
    child_env = {**{k: v for k, v in os.environ.items() if not k.startswith("PNEUMONIA_")}, **pneumonia,
                 "PNEUMONIA_SECURITY__API_KEYS_FILE": str(keys)}
    loaded = run([str(VENV_BIN / "python"), "-c", "import json; from settings import ServingSettings; "
                  "s = ServingSettings(); print(json.dumps({'workers': s.worker_count(), "
                  "'threads': s.threads_per_worker(), 'grace': s.grpc.shutdown_grace_s, 'keys': len(s.security.keys())}))"],
                 env=child_env)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    settings = json.loads(loaded.stdout.strip().splitlines()[-1])

    # One worker per requested core, explicitly (the default counts the node's cores), one torch thread each.
    workers = settings["workers"]
    assert settings["threads"] == 1 and settings["keys"] == 1
    resources = container["resources"]
    assert _quantity(resources["requests"]["cpu"]) == _quantity(resources["limits"]["cpu"]) == workers
    # Memory: at least the measured high-water mark for that many workers (scripts/measure_memory.py).
    measured = json.loads((ROOT / "docs" / "results" / "memory.json").read_text())
    states = [measured[s] for s in ("idle", "peak_under_load", "after_load")]
    arbiter = max(p["pss_mib"] for s in states for p in s if p["role"] == "arbiter")
    worker = max(p["pss_mib"] for s in states for p in s if p["role"] == "worker")
    assert measured["derived"]["workers"] == workers
    request, limit = (_quantity(resources[k]["memory"]) for k in ("requests", "limits"))
    assert request == limit >= _quantity(measured["derived"]["memory_request_limit"]) >= (arbiter + workers * worker) * 2**20

    # Probes: BentoML's /readyz (model warm) and /livez on the HTTP port; minutes of start-up allowed.
    probe = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probe["startupProbe"]["path"] == probe["readinessProbe"]["path"] == "/readyz"
    assert probe["livenessProbe"]["path"] == "/livez" and {p["port"] for p in probe.values()} == {"http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    # Non-root (the image's own user), read-only root file system, writable volumes where BentoML writes.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == BENTO_UID_GID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    mounted = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", env["BENTOML_HOME"]} <= mounted
    assert not pod["automountServiceAccountToken"]

    # Shutdown: endpoints updated (preStop), then the gRPC grace and the HTTP drain fit in the pod's grace.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + settings["grace"] + 10
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {"kubernetes.io/hostname",
                                                                           "topology.kubernetes.io/zone"}


def test_autoscaler_thresholds_sit_below_the_measured_capacity(builds: dict[str, str]) -> None:
    capacity = json.loads(run([str(VENV_BIN / "python"), "scripts/capacity.py", "--json"]).stdout)
    pod_capacity = capacity["pod_capacity_images_per_s"]
    knee = capacity["knee_row"]["clients"]  # the benchmark's client count at which one pod saturates
    thresholds = {}
    for overlay, stream in builds.items():
        for doc in objects(stream):
            if doc["kind"] == "ScaledObject":
                for trigger in doc["spec"]["triggers"]:
                    thresholds[(overlay, trigger["name"])] = float(trigger["metadata"]["threshold"])
            elif doc["kind"] == "HorizontalPodAutoscaler":
                for metric in doc["spec"]["metrics"]:
                    thresholds[(overlay, metric["pods"]["metric"]["name"])] = float(metric["pods"]["target"]["averageValue"])
    images = {k: v for k, v in thresholds.items() if "images" in k[1]}
    inflight = {k: v for k, v in thresholds.items() if "inflight" in k[1]}
    assert len(images) == len(inflight) == 2, thresholds
    for key, value in images.items():  # scale out well before a pod saturates, not at a trickle
        assert 0.4 * pod_capacity <= value <= 0.75 * pod_capacity, (key, value, pod_capacity)
    for key, value in inflight.items():
        assert 1 <= value < knee, (key, value, knee)
    assert len(set(images.values())) == len(set(inflight.values())) == 1  # KEDA and the native HPA agree


# ---------------------------------------------------------------- rules, dashboard, queries


def test_alert_rules_pass_promtool_checks_and_unit_tests() -> None:
    promtool = tool("promtool", "deploy/prometheus with promtool")
    checked = run([promtool, "check", "rules", str(RULES)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(RULE_TESTS) >= 2
    tested = run([promtool, "test", "rules", *map(str, RULE_TESTS)], timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    exercised = {a for path in RULE_TESTS for case in yaml.safe_load(path.read_text())["tests"]
                 for a in (t["alertname"] for t in case.get("alert_rule_test", []))}
    assert alerts == exercised, f"alerts without a unit test: {alerts - exercised}"
    assert {"PneumoniaHighErrorRate", "PneumoniaHighLatencyP99", "PneumoniaPredictionDrift",
            "PneumoniaHighInputRefusalRate"} <= alerts


def test_the_operator_rule_object_holds_the_rule_file() -> None:
    rule_object = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "prometheusrule.yaml").read_text())
    assert rule_object["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard (panel targets and template variables), by where it is."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']} [{target['refId']}]"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert match, query
            queries[f"variable {variable['name']}"] = match.group(1)
    return queries


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus receives it: Grafana's variables replaced by typical values."""
    values = {"__rate_interval": "1m", "__interval": "30s", "__range": "6h", "namespace": "pneumonia", "pod": ".*"}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def scaler_queries() -> dict[str, str]:
    """The KEDA triggers' queries (as in the base: the overlay only fills in the namespace) and
    prometheus-adapter's metrics queries, as Prometheus receives them."""
    queries = {}
    scaled = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "scaledobject.yaml").read_text())
    for trigger in scaled["spec"]["triggers"]:
        queries[f"KEDA trigger {trigger['name']}"] = trigger["metadata"]["query"]
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        query = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.GroupBy>>", "pod")
                 .replace("<<.LabelMatchers>>", 'namespace="pneumonia",pod=~"a|b"'))
        queries[f"adapter {rule['name']['as']}"] = query
        queries[f"adapter series {rule['name']['as']}"] = rule["seriesQuery"]
    return queries


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    used = set(re.findall(r"\$\{?(\w+)\}?", json.dumps(dashboard)))
    assert used - {"__rate_interval", "__interval", "__range"} <= set(variables)


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each query of the dashboard and the autoscalers (as a recording rule of a scratch file)."""
    promtool = tool("promtool", "the PromQL of the dashboard and the autoscalers")
    queries = {**{k: grafana_to_promql(v) for k, v in dashboard_queries().items()}, **scaler_queries()}
    rules = [{"record": f"check:query_{i}", "expr": expr} for i, expr in enumerate(queries.values())]
    scratch = tmp_path / "queries.yaml"
    scratch.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(scratch)])
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + "\n".join(f"{i}: {k}" for i, k in enumerate(queries))
    broken = scratch.with_name("broken.yaml")  # the control: one unbalanced parenthesis fails
    broken.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "check:x", "expr": "sum(rate(a[5m])"}]}]}))
    assert run([promtool, "check", "rules", str(broken)]).returncode != 0


def test_adapter_metrics_answer_zero_for_a_warm_pod_without_the_signal(tmp_path: Path) -> None:
    """Pod a has served HTTP /classify; pod b is warm (pneumonia_model_info) but has had no HTTP call and no image
    yet, as on a fresh deployment or at a gRPC-only site. b must read 0, not be missing: a Pods metric missing for
    some pods holds the HPA's scale-down (a helper's find: both adapter metrics were missing until then)."""
    promtool = tool("promtool", "the adapter rules with promtool")
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    records = [{"record": f"adapter:{rule['name']['as']}",
                "expr": rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.Series>>", "unused")
                .replace("<<.LabelMatchers>>", 'namespace="pneumonia"')} for rule in rules]
    (tmp_path / "adapter.yaml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": records}]}))
    info = 'pneumonia_model_info{{namespace="pneumonia",pod="{pod}",model="m",arch="x",threshold="0.5"}}'
    series = [
        {"series": info.format(pod="a"), "values": "1x10"},
        {"series": info.format(pod="b"), "values": "1x10"},
        {"series": 'bentoml_service_request_in_progress{namespace="pneumonia",pod="a",endpoint="/classify"}',
         "values": "3x10"},
        {"series": 'pneumonia_predictions_total{namespace="pneumonia",pod="a",label="NORMAL",model="m"}',
         "values": "0+60x10"},  # one image a second
    ]
    expected = {
        "adapter:pneumonia_classify_inflight_requests": {"a": 3, "b": 0},
        "adapter:pneumonia_images_per_second": {"a": 1, "b": 0},
    }
    tests = [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": name, "eval_time": "5m",
         "exp_samples": [{"labels": f'{name}{{pod="{pod}"}}', "value": value} for pod, value in by_pod.items()]}
        for name, by_pod in expected.items()]}]
    (tmp_path / "adapter_test.yaml").write_text(yaml.safe_dump({"rule_files": ["adapter.yaml"], "tests": tests}))
    result = run([promtool, "test", "rules", str(tmp_path / "adapter_test.yaml")], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(expected) == {record["record"] for record in records}


# ---------------------------------------------------------------- metric names against a live /metrics

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                   "unless", "inf", "nan", "atan2"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def selectors(expr: str) -> list[tuple[set[str], dict[str, tuple[str, str]]]]:
    """The vector selectors of a PromQL expression: (metric names, {label: (operator, value)}) each.

    A name comes from before the braces or from a `__name__` matcher (alternatives of a regex split on `|`).
    Function names, aggregation clauses' label lists, keywords, strings, numbers and durations are skipped.
    """
    found: list[tuple[set[str], dict[str, tuple[str, str]]]] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in "\"'":  # a string argument (label_replace, ...)
            end = i + 1
            while end < n and expr[end] != ch:
                end += 2 if expr[end] == "\\" else 1
            i = end + 1
        elif ch == "[":  # range or subquery duration
            i = expr.index("]", i) + 1
        elif ch == "{":
            found.append((set(), _matchers(expr, i)))
            i = _closing_brace(expr, i) + 1
        elif ch.isalpha() or ch in "_:":
            match = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*").match(expr, i)
            word, i = match.group(0), match.end()
            rest = expr[i:].lstrip()
            if word in LABEL_LISTS and rest.startswith("("):
                i = expr.index(")", i) + 1
            elif word in PROMQL_KEYWORDS or rest.startswith("(") or re.match(r"(by|without)\s*\(", rest):
                continue  # a keyword, a function, or an aggregation with its clause before the parenthesis
            elif rest.startswith("{"):
                start = expr.index("{", i)
                found.append(({word}, _matchers(expr, start)))
                i = _closing_brace(expr, start) + 1
            else:
                found.append(({word}, {}))
        elif ch.isdigit() or ch == ".":
            i = re.compile(r"[0-9.]+(e[+-]?[0-9]+)?[smhdwy]*").match(expr, i).end()
        else:
            i += 1
    for names, matchers in found:
        if "__name__" in matchers:
            op, value = matchers.pop("__name__")
            names |= set(value.split("|")) if op == "=~" else {value}
    return found


def _closing_brace(expr: str, start: int) -> int:
    i = start + 1
    while expr[i] != "}":
        if expr[i] == '"':
            i += 1
            while expr[i] != '"':
                i += 2 if expr[i] == "\\" else 1
        i += 1
    return i


def _matchers(expr: str, start: int) -> dict[str, tuple[str, str]]:
    body = expr[start + 1:_closing_brace(expr, start)]
    matchers, pos = {}, 0
    while pos < len(body.rstrip()):
        m = MATCHER.match(body, pos)
        assert m, f"cannot read the label matchers {{{body}}}"
        matchers[m.group(1)] = (m.group(2), m.group(3))
        pos = m.end()
    return matchers


def test_the_selector_reader_finds_metrics_and_labels() -> None:
    """The control of the reader the next test relies on."""
    expr = ('histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{endpoint="/classify",le!="x"}[5m] offset 1h)))'
            ' / on (namespace) group_left (model) sum without (pod) (b_total) or vector(0)'
            ' and label_replace(c, "dst", "$1", "src", "(.*)") > 0.5 unless {namespace="n",__name__=~"d_total|e_total"}')
    assert selectors(expr) == [({"a_bucket"}, {"endpoint": ("=", "/classify"), "le": ("!=", "x")}),
                               ({"b_total"}, {}), ({"c"}, {}), ({"d_total", "e_total"}, {"namespace": ("=", "n")})]


@pytest.fixture(scope="module")
def live_metrics(server: ServerProcess) -> dict[str, list[dict[str, str]]]:
    """A live /metrics after real traffic: sample name -> label sets of its series."""
    from client import connect

    images = xray_payloads(4)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        ok = http.post("/classify", files=[("images", (f"x{i}.jpeg", data)) for i, data in enumerate(images)])
        assert ok.status_code == 200, ok.text
        assert http.post("/classify", files=[("images", ("bad.jpeg", b"not an image"))]).status_code == 400  # refused
        assert http.post("/classify", json={"images": ["x"]}).status_code == 415  # refused by the HTTP guard
        with connect(server.grpc_target, transport="grpc") as api:
            assert len(api.classify(images[:2])) == 2
        text = http.get("/metrics").text
    series: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        assert match, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        series.setdefault(match.group(1), []).append(labels)
    return series


def test_queries_name_only_metrics_and_labels_the_service_exports(live_metrics: dict[str, list[dict[str, str]]]) -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"]
    recorded = {r["record"] for g in rules for r in g["rules"] if "record" in r}
    queries = {
        **{f"dashboard {k}": grafana_to_promql(v) for k, v in dashboard_queries().items()},
        **{f"rule {r.get('record') or r['alert']}": r["expr"] for g in rules for r in g["rules"]},
        **scaler_queries(),
    }
    used: set[str] = set()
    problems = []
    for where, expr in queries.items():
        for names, matchers in selectors(expr):
            for name in names:
                if name in recorded:
                    continue
                used.add(name)
                if name not in live_metrics:
                    problems.append(f"{where}: {name} is not exported")
                    continue
                labels = {k for s in live_metrics[name] for k in s}
                for label, (op, value) in matchers.items():
                    if label not in labels | TARGET_LABELS:
                        problems.append(f"{where}: {name} has no label {label} (it has {sorted(labels)})")
                    elif label in ("le", "endpoint", "grpc_method") and op == "=" and \
                            value not in {s.get(label) for s in live_metrics[name]}:
                        problems.append(f"{where}: {name}{{{label}=\"{value}\"}} matches no series")
    assert not problems, "\n".join(problems)
    # The reader found the service's metrics in every part (an empty set would pass vacuously).
    assert {"bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket",
            "bentoml_service_request_in_progress", "pneumonia_batch_images_bucket",
            "pneumonia_predictions_total", "pneumonia_probability_bucket", "pneumonia_probability_sum",
            "pneumonia_probability_count", "pneumonia_rejected_inputs_total", "pneumonia_model_info",
            "pneumonia_grpc_server_handled_total", "pneumonia_grpc_server_handling_seconds_bucket",
            "pneumonia_http_refused_total"} <= used


# ---------------------------------------------------------------- documentation


def test_the_capacity_table_in_the_deploy_guide_is_current() -> None:
    result = run([str(VENV_BIN / "python"), "scripts/capacity.py", "--check", "docs/deploy.md"])
    assert result.returncode == 0, result.stdout + result.stderr
