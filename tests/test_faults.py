"""Faults against real `bentoml serve` processes of the shipped model (issue 6, requirement 4).

Each test starts its own server on free loopback ports (the shared session
server must not be killed) and always kills its whole process group at the end.
The measured figures are printed (`pytest -s`) and documented in
docs/hardening.md ("Faults"); scripts/fault_*.py run the same experiments standalone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from harness.faults import sigterm_experiment, worker_kill_experiment
from harness.paths import VENV_BIN
from harness.payloads import large_png, xray_payloads
from harness.processes import wait_until_workers_warm, worker_pids
from harness.servers import ServerProcess, bentoml_serve, free_port, kill_group, server_env

SERVICE = "service:PneumoniaClassifier"
TRANSPORT_ERRORS = {"ConnectError", "RemoteProtocolError", "ReadError"}  # refused or reset: never a timeout

Spawn = Callable[..., ServerProcess]


@pytest.fixture
def spawn(production_tag: str, tmp_path: Path) -> Iterator[Spawn]:
    """Start `bentoml serve` servers of the shipped model; every one is killed (whole group) afterwards."""
    started: list[ServerProcess] = []

    def start(ready_path: str = "/readyz", **env: str) -> ServerProcess:
        env.setdefault("PNEUMONIA_GRPC__HOST", "127.0.0.1")
        env.setdefault("PNEUMONIA_GRPC__PORT", str(free_port()))
        server = bentoml_serve(SERVICE, free_port(), tmp_path / f"server-{len(started)}.log", **env)
        started.append(server)
        return server.start(ready_timeout=180, ready_path=ready_path)

    yield start
    for server in started:
        server.stop()
        kill_group(server)


# --------------------------------------------------------------------------- a worker killed with SIGKILL


def test_sigkilled_worker_is_replaced_and_clients_see_few_failures(spawn: Spawn) -> None:
    server = spawn(PNEUMONIA_WORKERS="2")
    assert server.process is not None
    assert len(wait_until_workers_warm(server, 2)) == 2  # both models warm before the load starts
    result = worker_kill_experiment(server, xray_payloads(16), workers=2, clients=4, warm_s=2.0, settle_s=1.0,
                                    recover_timeout_s=100)
    print("\nworker kill:", result.as_dict())
    assert result.requests_before_kill > 10 and result.failures_before_kill == 0
    # Only requests the killed worker held can fail: at most one per client.
    assert result.failures_after_kill <= result.clients, result.failure_kinds
    assert set(result.failure_kinds) <= TRANSPORT_ERRORS, result.failure_kinds
    # The other worker kept answering, and circus replaced the dead one with a warm worker.
    assert result.longest_gap_s < 10
    assert result.replacement_pid is not None and result.replacement_ready_s is not None, server.logs()[-3000:]
    assert result.replacement_ready_s < 90
    assert len(worker_pids(server.process.pid)) == 2
    response = httpx.get(server.url + "/readyz", timeout=10)
    assert response.status_code == 200


# --------------------------------------------------------------------------- SIGTERM under load


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(spawn: Spawn) -> None:
    server = spawn()
    heavy = [large_png(seed=i % 2) for i in range(16)]
    result = sigterm_experiment(server, heavy, in_flight=4)
    print("\nSIGTERM:", {k: v for k, v in result.as_dict().items() if k != "late"})
    print("late requests:", result.late)
    assert result.in_flight_ok == result.in_flight, result.in_flight_kinds  # graceful drain
    assert result.exit_code == 0 and result.exit_after_term_s is not None and result.exit_after_term_s < 60
    # New callers are answered, told 503, or refused/reset, each within the drain: never left hanging.
    assert set(result.late_kinds) <= TRANSPORT_ERRORS | {"http_200", "http_503"}, result.late_kinds
    assert result.late_max_s <= result.exit_after_term_s + 5
    assert result.late[-1]["kind"] == "ConnectError" and result.late[-1]["took_s"] < 1  # after exit: refused


# --------------------------------------------------------------------------- bad model at start-up


def _copy_store(source_home: Path, target_home: Path) -> Path:
    shutil.copytree(source_home / "models", target_home / "models")
    return target_home


def _model_dir(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version


def _truncate_weights(home: Path, tag: str) -> None:
    weights = _model_dir(home, tag) / "weights.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _break_metadata(home: Path, tag: str) -> None:
    path = _model_dir(home, tag) / "model.yaml"
    info = yaml.safe_load(path.read_text())
    info["metadata"]["threshold"] = "not-a-number"
    path.write_text(yaml.safe_dump(info))


BAD_MODELS: dict[str, tuple[Callable[[Path, str], None] | None, dict[str, str], str]] = {
    # case: (how to damage a copy of the store, extra env, text the one-line error must contain)
    "empty_store": (None, {}, "no production model; the store has no model"),
    "unknown_tag": (lambda home, tag: None, {"PNEUMONIA_MODEL": "pneumonia-classifier:doesnotexist"}, "is not in the store"),
    "truncated_weights": (_truncate_weights, {}, "is corrupt (sha256"),  # any other bytes: the same check
    "unusable_metadata": (_break_metadata, {}, "has unusable metadata"),
}


@dataclass
class ServeRun:
    case: str
    code: int | None
    seconds: float
    output: str
    port: int


def _serve_until_exit(case: str, home: Path, env: dict[str, str], timeout: float = 90.0) -> ServeRun:
    """`bentoml serve` that is expected to exit by itself; killed (whole group) if it does not."""
    port = free_port()
    args = [str(VENV_BIN / "bentoml"), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]
    started = time.monotonic()
    process = subprocess.Popen(
        args, env=server_env(BENTOML_HOME=str(home), PNEUMONIA_GRPC__PORT=str(free_port()), **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, code = process.communicate()[0] + f"\n[still running after {timeout}s: killed]", None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # nothing may be left behind
        except ProcessLookupError:
            pass
    return ServeRun(case, code, time.monotonic() - started, output, port)


def _check_bad_model_runs(cases: dict, production_tag: str, bentoml_home: Path, tmp_path: Path) -> None:
    homes = {}
    for case, (damage, _, _) in cases.items():
        homes[case] = tmp_path / case
        homes[case].mkdir()
        if damage is not None:
            damage(_copy_store(bentoml_home, homes[case]), production_tag)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: start-up is mostly imports
        runs = list(pool.map(lambda case: _serve_until_exit(case, homes[case], cases[case][1]), cases))
    problems = [problem for run in runs for problem in _stop_problems(run, "cannot serve:", cases[run.case][2])]
    assert not problems, "\n".join(problems) + "\n" + "\n---\n".join(r.output[-2000:] for r in runs)


def _stop_problems(run: ServeRun, marker: str, expected: str) -> list[str]:
    """What is wrong with a `bentoml serve` that had to refuse to start: it must exit 1 with exactly one
    `marker` line containing `expected`, print no stack trace and leave nothing listening."""
    last = run.output.strip().splitlines()[-1] if run.output.strip() else ""
    print(f"\n{run.case}: exit {run.code} after {run.seconds:.1f}s: {last}")
    problems = []
    error_lines = [line for line in run.output.splitlines() if marker in line]
    if run.code != 1:
        problems.append(f"{run.case}: exit code {run.code}")
    if "Traceback" in run.output:
        problems.append(f"{run.case}: stack trace in the output")
    if len(error_lines) != 1 or expected not in error_lines[0]:
        problems.append(f"{run.case}: no single line saying {expected!r}")
    try:  # nothing listens: no half-ready server
        httpx.get(f"http://127.0.0.1:{run.port}/livez", timeout=5)
        problems.append(f"{run.case}: something answers on its port")
    except httpx.ConnectError:
        pass
    return problems


def test_bad_model_stops_the_server_with_one_clear_line(production_tag: str, bentoml_home: Path,
                                                        tmp_path: Path) -> None:
    """Empty store, unknown pinned tag, sha mismatch, unusable metadata: exit 1, one line, within seconds."""
    _check_bad_model_runs(BAD_MODELS, production_tag, bentoml_home, tmp_path)


# --------------------------------------------------------------------------- not ready until warm


def test_not_ready_until_warm_early_callers_get_503_and_unavailable(spawn: Spawn) -> None:
    """Early callers: /readyz 503, classify 503 after the wait, gRPC UNAVAILABLE; then (container mode) a
    killed worker ends the server with an error exit."""
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from api._proto.pneumonia.v1 import classifier_pb2 as pb
    from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc

    grpc_port = free_port()
    delay, wait = 12.0, 2.0
    # Listening (/livez answers) while the warm-up is held back by the test knob. BENTOML_CONTAINERIZED is
    # what BentoML's Docker image sets; it matters only for the worker kill at the end.
    server = spawn(ready_path="/livez", PNEUMONIA_WARMUP_DELAY_S=str(delay), PNEUMONIA_READY_WAIT_S=str(wait),
                   PNEUMONIA_GRPC__PORT=str(grpc_port), BENTOML_CONTAINERIZED="true", PNEUMONIA_WORKERS="1")
    listening = time.monotonic()
    image = xray_payloads(2)[0]

    started = time.monotonic()
    ready = httpx.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and time.monotonic() - started < 2
    health = httpx.post(server.url + "/health", json={}, timeout=10)
    assert health.status_code == 200 and health.json()["ready"] is False

    started = time.monotonic()
    early = httpx.post(server.url + "/classify", files=[("images", ("x.jpeg", image))], timeout=30)
    took = time.monotonic() - started
    assert early.status_code == 503, early.text
    assert early.json()["detail"][0]["type"] == "not_ready" and early.headers["retry-after"].isdigit()
    assert wait - 0.5 <= took < wait + 3  # held for the configured wait, then told, never a timeout

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[pb.Image(data=image)]), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
    assert time.monotonic() - listening < delay, "the checks above ran after the window; raise the delay"

    deadline = time.monotonic() + delay + 120
    while httpx.get(server.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.5)
    assert time.monotonic() - listening >= delay - 1  # not ready before the model was warm
    late = httpx.post(server.url + "/classify", files=[("images", ("x.jpeg", image))], timeout=30)
    assert late.status_code == 200 and late.json()[0]["label"] in ("NORMAL", "PNEUMONIA")
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING

    # In a container BentoML does not restart a dead worker: with one worker the server must end, non-zero,
    # so that the orchestrator replaces the container (and not linger without a worker).
    assert server.process is not None
    (worker,) = worker_pids(server.process.pid)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    code = server.process.wait(timeout=60)
    print(f"\ncontainer mode: server exited with {code} {time.monotonic() - killed:.1f}s after its worker was killed")
    assert code != 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/readyz", timeout=5)


# --------------------------------------------------------------------------- bad configuration


BAD_CONFIGS: dict[str, tuple[dict[str, str], str]] = {
    # case: (environment, text the one-line error must contain)
    "unknown_engine": ({"PNEUMONIA_ENGINE": "onnx"}, "engine Input should be 'eager', 'folded' or 'torchscript'"),
    "workers_not_a_number": ({"PNEUMONIA_WORKERS": "two"}, "workers Input should be a valid integer"),
    "settings_file_not_json": ({"PNEUMONIA_SETTINGS_FILE": "{settings}"}, "is not valid JSON"),
}


def test_bad_configuration_stops_the_server_with_one_clear_line(production_tag: str, bentoml_home: Path,
                                                                tmp_path: Path) -> None:
    """Invalid settings end `bentoml serve` with exit 1 and one line naming the setting, never a stack trace."""
    settings_file = tmp_path / "settings.json"
    settings_file.write_text("{workers: 2}")
    cases = {case: ({k: v.format(settings=settings_file) for k, v in env.items()}, text)
             for case, (env, text) in BAD_CONFIGS.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda case: _serve_until_exit(case, bentoml_home, cases[case][0]), cases))
    problems = [problem for run in runs for problem in _stop_problems(run, "invalid configuration", cases[run.case][1])]
    assert not problems, "\n".join(problems) + "\n" + "\n---\n".join(r.output[-2000:] for r in runs)
