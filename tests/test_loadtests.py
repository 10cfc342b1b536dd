"""Smoke runs of the load-test tools: the Locust command, the one-run benchmark and the start-up timer, short versions.

They check behaviour (reports written, every answer correct, every table row
present), never speed: figures come from the benchmark itself (docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loadtests import run_locust
from harness.paths import ROOT
from harness.servers import HANG_S, SERVER_TOKEN, default_sigint, server_env

pytestmark = pytest.mark.slow


def test_locust_command_writes_reports_with_no_failures(server, tmp_path: Path) -> None:
    """Ends when every request type was sent 3 times (--stop-after), not after a fixed time: the duration is only
    an upper bound, so a slow machine gives a longer run, never one too short to hold every row."""
    out = tmp_path / "locust"
    code = run_locust.main(["--url", server.url, "--users", "4", "--duration", f"{HANG_S:.0f}", "--stop-after", "3",
                            "--out", str(out)])
    logs = (out / "locust.log").read_text() if (out / "locust.log").exists() else ""
    assert code == 0, logs[-3000:]
    for name in ("locust_stats.csv", "locust_failures.csv", "report.html", "summary.json", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    total = summary["aggregated"]
    rows = {row["name"]: row for row in summary["by_request"]}
    assert set(rows) == {"/classify [full-size]", "/classify [single]", "/classify [4 images]", "/health"}
    assert all(row["requests"] >= 3 and row["failures"] == 0 for row in rows.values()), rows
    assert total["failures"] == 0 and total["requests"] == sum(row["requests"] for row in rows.values())
    assert total["p99_ms"] >= total["p50_ms"] > 0 and total["images_per_s"] > 0
    assert "<html" in (out / "report.html").read_text()[:2000].lower()


def test_locust_loads_a_service_that_requires_api_keys(keyed_server, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a helper: no load test could send a key, so against a deployed service (its manifests require keys)
    21,914 of 21,924 requests failed with 401 and 429. $PNEUMONIA_API_KEY (the client CLI's variable) is sent."""
    from tests.conftest import API_KEY

    monkeypatch.setenv("PNEUMONIA_GRPC_URL", keyed_server.grpc_target)
    argv = ["--url", keyed_server.url, "--users", "2", "--grpc", "--duration", f"{HANG_S:.0f}", "--stop-after", "2"]
    monkeypatch.setenv("PNEUMONIA_API_KEY", API_KEY)
    assert run_locust.main([*argv, "--out", str(tmp_path / "keyed")]) == 0
    summary = json.loads((tmp_path / "keyed" / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["by_request"]}
    assert summary["aggregated"]["failures"] == 0 and rows["Classify [single]"]["type"] == "gRPC", rows
    monkeypatch.delenv("PNEUMONIA_API_KEY")
    assert run_locust.main([*argv[:-1], "1", "--out", str(tmp_path / "keyless")]) == 1  # 401 for every request


def test_locust_explain_users_run_beside_classify_users(server, tmp_path: Path) -> None:
    """The Locust mix of docs/performance.md (explain users beside classify users), short: both answered, no failures;
    a call turned away by the explain slots is its own row, not a failure."""
    server.wait_for_explainers()
    out = tmp_path / "locust-explain"
    code = run_locust.main(["--url", server.url, "--users", "4", "--explain-users", "2", "--duration", "8",
                            "--out", str(out)])
    logs = (out / "locust.log").read_text() if (out / "locust.log").exists() else ""
    assert code == 0, logs[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aggregated"]["failures"] == 0
    rows = {row["name"]: row for row in summary["by_request"]}
    assert rows["/explain [explained]"]["requests"] > 0, rows
    assert set(rows) >= {"/classify [full-size]", "/classify [single]", "/explain [explained]"}, rows
    assert sum(row["requests"] for name, row in rows.items() if name.startswith("/classify")) > 0


def test_locust_command_refuses_a_dead_url_and_bad_numbers_before_starting(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A dead URL ran the whole duration and ended with every request failed; `-d 0` ran until killed (Locust reads
    a run time of 0 as no limit); `-u -3` ended with 'Locust wrote no statistics'. Each is now one line, at once."""
    from harness.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    assert run_locust.main(["--url", dead, "-u", "1", "-d", "60", "--out", str(tmp_path / "dead")]) == 2
    assert f"cannot reach {dead}" in capsys.readouterr().err and not (tmp_path / "dead").exists()
    for argv, words in ((["-d", "0"], "argument -d/--duration: must be at least 1 s"),
                        (["-u", "-3"], "argument -u/--users: must be >= 1, not -3"),
                        (["-u", "2", "--explain-users", "3"], "--explain-users: 3 is more than --users 2")):
        with pytest.raises(SystemExit) as exit_:
            run_locust.main(["--url", dead, *argv])
        assert exit_.value.code == 2 and words in capsys.readouterr().err


def run_stopping_servers(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command that starts servers of its own; past `timeout`, interrupt it so that its `finally` blocks stop
    them (SIGINT), and kill it only if it does not end within a minute after that. `subprocess.run(timeout=...)` kills
    at once, which left the benchmark's servers (each in a session of its own) running after a slow run."""
    proc = subprocess.Popen(args, cwd=ROOT, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(args[1:4])} did not finish in {timeout:.0f} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _interrupt_soak(command: list[str], signum: int) -> tuple[int, str]:
    """Start a soak, send `signum` once it is soaking (its first sample line), and return its exit status and
    stderr; the process is killed whatever happens."""
    process = subprocess.Popen(command, cwd=ROOT, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_sigint)
    try:
        lines = iter(process.stderr.readline, "")  # type: ignore[union-attr]
        assert any("served" in line for line in lines)  # soaking: its first sample line
        process.send_signal(signum)
        stderr = process.communicate(timeout=HANG_S)[1]
    finally:
        process.kill()
    return process.returncode, stderr


def test_a_slow_soak_has_no_failures_and_stops_on_ctrl_c(server, tmp_path: Path) -> None:
    """Found here: at 2 requests/s over 16 connections each connection idles 8 s, past the server's 5 s keep-alive,
    and the generator sent on connections the server had closed (half of a slow soak failed); an X-ray the validity
    gate refuses counted as a malformed answer; Ctrl-C printed a traceback."""
    soak = [sys.executable, "scripts/soak.py", "--url", server.url, "--rate", "2", "--connections", "16",
            "--sample-s", "5", "--out", str(tmp_path)]
    done = subprocess.run([*soak, "--minutes", "0.4"], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                          timeout=HANG_S)
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert done.returncode == 0 and report["failures"] == 0, (report.get("failure_kinds"), done.stderr[-2000:])
    assert report["served"] == report["requests"] >= 40 and 0 <= report["refused"] <= 0.1 * report["served"]
    returncode, stderr = _interrupt_soak([*soak, "--minutes", "5"], signal.SIGINT)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted: any server this command started was stopped"
    [partial] = [path for path in tmp_path.glob("soak-*.json") if json.loads(path.read_text()).get("interrupted")]
    assert json.loads(partial.read_text())["samples"], "the samples measured before Ctrl-C are kept"


def test_benchmark_quick_has_every_row_and_no_failures(production_tag: str, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_stopping_servers(
        [sys.executable, "-m", "loadtests.benchmark", "--quick", "--window-s", "1.5", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert result["model"] == production_tag
    assert result["bare_model"]["limit_images_per_s"] > 0
    assert {r["batch"] for r in result["bare_model"]["rows"]} == {1, 8, 32}
    systems = ("service", "service_nobatch", "peer", "peer_engine", "baseline")
    points = {(r["system"], r["clients"]) for r in result["runs"]}
    assert points == {(s, c) for s in systems for c in (1, 8, 32)}
    for row in result["runs"]:
        assert row["failures"] == 0, row
        assert row["images_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_cpu_cores"] is not None and row["server_cpu_cores"] > 0
        assert set(row["by_kind"]) <= {"full", "single", "multi"} and row["by_kind"], row  # per-kind latency
    assert result["peer_workers"] == result["service_workers"] == 1  # --quick: one worker each
    assert set(result["targets"]) == {
        "service_vs_peer", "batching_vs_nobatch", "service_cores_busy_at_8", "service_vs_bare_model",
        "service_vs_baseline", "service_p99_ms_at_8", "zero_failures_at_top",
    }
    for clients in (1, 8, 32):  # the summary's ratios at each client count
        for name in ("service_vs_peer", "service_vs_peer_engine", "service_vs_baseline", "batching_vs_nobatch"):
            assert result["ratios"][f"{name}_at_{clients}"] > 0
    table = (out / "benchmark.md").read_text()
    for label in ("bare model limit", "service, adaptive batching", "service, batching off",
                  "competent peer (FastAPI, no batching)", "competent peer, the service's engine",
                  "naive peer, seeds' style", "service / competent peer (images/s)", "batching on / off (images/s)",
                  "full-size p50 ms"):
        assert label in table and label in proc.stdout, label
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # explain's cost (p50/p95) and classify with and without an explain burst beside it (issue 13)
    explain = result["explain"]
    assert set(explain["rows"]) == {"explain_alone", "classify_alone", "classify_beside_burst", "explain_burst"}
    for name, row in explain["rows"].items():
        assert row["failures"] == 0, (name, row)
    for name in ("explain_alone", "classify_alone", "classify_beside_burst"):
        row = explain["rows"][name]
        assert row["requests_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0, (name, row)
    assert explain["classify_images_per_s_ratio"] > 0 and explain["classify_p95_ratio"] > 0
    for label in ("explain alone, 1 client", "classify beside the explain burst", "explain burst beside classify"):
        assert label in table

    # The spread of several runs (here the same run twice): median and min-max, targets met per run, copies kept.
    from loadtests import spread

    kept = tmp_path / "kept"
    assert spread.main([str(out / "benchmark.json"), str(out / "benchmark.json"), "--results", str(kept), "--name", "x"]) == 0
    summary = json.loads((kept / "x-spread.json").read_text())
    assert [p.name for p in sorted(kept.iterdir())] == ["x-1.json", "x-2.json", "x-spread.json", "x-spread.md"]
    service_32 = next(r for r in summary["rows"] if r["system"] == "service" and r["clients"] == 32)
    first = next(r for r in result["runs"] if r["system"] == "service" and r["clients"] == 32)
    assert service_32["images_per_s"]["median"] == service_32["images_per_s"]["min"] == first["images_per_s"]
    assert summary["targets"]["service_vs_peer"]["runs"] == 2
    assert "Median (min-max) of 2 runs." in (kept / "x-spread.md").read_text()
    # Runs named in --results itself, in another order: each is read before any copy is written (run 1 was lost).
    second = {**result, "started": "another run"}
    (kept / "x-2.json").write_text(json.dumps(second))
    assert spread.main([str(kept / "x-2.json"), str(kept / "x-1.json"), "--results", str(kept), "--name", "x"]) == 0
    assert json.loads((kept / "x-1.json").read_text()) == second and json.loads((kept / "x-2.json").read_text()) == result


def test_startup_benchmark_times_a_real_start(production_tag: str, tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, "-m", "loadtests.startup", "--runs", "1", "--workers", "1", "--json", str(out)],
                          cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    [run] = result["runs"]
    assert result["workers"] == 1 and run["ready_s"] > 0 and run["cpu_s"] > 0
    assert result["ready_s"]["median"] == run["ready_s"] and result["commit"]
    assert "1 worker(s), 1 run(s), median (min-max): ready after" in proc.stdout


def test_startup_benchmark_refuses_counts_below_one() -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtests.startup", "--runs", "0"], cwd=ROOT, env=server_env(),
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2 and "--runs and --workers must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def script(name: str):
    """scripts/NAME.py as a module, so that its main() runs in this process (bad options: SystemExit 2)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, words", [
    (["--rate", "-5"], "argument --rate: must be > 0, not -5"),
    (["--rate", "0"], "argument --rate: must be > 0, not 0"),  # ran the capacity ramp instead
    (["--minutes", "-1"], "argument --minutes: must be in (0, 10080], not -1"),
    (["--minutes", "0"], "argument --minutes: must be in (0, 10080], not 0"),
    (["--minutes", "1e306"], "argument --minutes: must be in (0, 10080], not 1e306"),  # ran for ever
    (["--fraction", "-1"], "argument --fraction: must be > 0, not -1"),  # above 1: an overload soak, allowed
    (["--max-growth-pct", "nan"], "argument --max-growth-pct: must be >= 0, not nan"),  # failed every soak, silently
    (["--pid", "4194305"], "--pid 4194305: no such process"),  # its memory read as 0 MB throughout
])
def test_soak_refuses_numbers_that_measure_nothing(argv: list[str], words: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Each of these soaked nothing and passed (exit 0); now one line and exit 2 before any request."""
    with pytest.raises(SystemExit) as exit_:
        script("soak").main(["--url", "http://127.0.0.1:1", *argv])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--pid", "1"], "--pid goes with --url"),  # it measured init's process tree instead of the started server
    (["--url", "http://127.0.0.1:1", "--workers", "2"], "--workers sets a started server's workers"),  # ignored
])
@pytest.mark.timeout(120)  # refused at once; without the check a soak of a started server would run
def test_soak_refuses_options_that_do_not_go_together(argv: list[str], words: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        script("soak").main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_a_soak_that_serves_nothing_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against a dead URL the capacity ramp measured 0 req/s (every request refused, retried in a busy loop), the
    soak then sent nothing at 0 req/s and passed; a rate too low to release one request in the time passed too."""
    from harness.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    soak = script("soak")
    assert soak.main(["--url", dead, "--ramp-step-s", "0.2", "--minutes", "0.01", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"error: the capacity ramp got no answer from {dead}: every request failed "
                                            "(ConnectionRefusedError)"), err
    assert err.count("capacity ramp:") == 1, err  # no more connections once every request of a step failed
    assert soak.main(["--url", dead, "--rate", "1", "--minutes", "0.001", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the soak served no request"


def test_a_soak_of_a_server_that_refuses_every_xray_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refusal of the validity gate is an answer, so a server that refused every X-ray soaked clean (exit 0)."""
    from tests.stubs import stub_server

    refusal = json.dumps([{"status": "refused", "label": None, "probability": None,
                           "refusal": {"reason": "not_a_chest_xray", "message": "stub"}}]).encode()
    with stub_server(answer=refusal) as url:
        assert script("soak").main(["--url", url, "--rate", "20", "--minutes", "0.01", "--out", str(tmp_path)]) == 1
    [path] = tmp_path.glob("soak-*.json")
    report = json.loads(path.read_text())
    assert report["failures"] == 0 and report["served"] == report["refused"] == report["requests"] > 0, report
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: the validity gate refused ")


def test_a_soak_of_a_server_that_never_answers_ends_and_counts_every_request(tmp_path: Path) -> None:
    """Against a server that accepts and never answers, the soak's drain raised TimeoutError (a traceback, no JSON)
    and the requests still queued were counted nowhere. Each request here waits its 0.2 s timeout on the one
    connection, so at most (0.6 + 10.2) / 0.2 = 54 of the 60 can end before the drain gives up: the rest are counted."""
    from tests.stubs import stub_server

    with stub_server(silent=True) as url:
        code = script("soak").main(["--url", url, "--rate", "100", "--minutes", "0.01", "--connections", "1",
                                    "--timeout-s", "0.2", "--out", str(tmp_path)])
    assert code == 1
    [path] = tmp_path.glob("soak-*.json")

    def not_json(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")  # what a strict parser (JavaScript's) says of NaN

    report = json.loads(path.read_text(), parse_constant=not_json)
    assert report["served"] == 0 and report["requests"] == report["failures"] == 60, report["failure_kinds"]
    assert report["failure_kinds"]["not_sent_at_end"] >= 5, report["failure_kinds"]
    assert set(report["latency_ms"].values()) == {None}  # nothing answered: no latency, not NaN


def test_a_soak_that_fails_keeps_its_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only Ctrl-C wrote the partial JSON: a soak that failed on anything else lost every sample it had taken."""
    soak = script("soak")

    async def fails_after_a_sample(*args: object) -> None:
        on_sample = args[-1]  # open_loop's last argument
        on_sample({"t_s": 0.0, "served": 0, "failed": 0, "queued": 0,  # type: ignore[operator]
                   "p50_ms": None, "p95_ms": None})
        raise OSError("no space left on device")

    monkeypatch.setattr(soak, "open_loop", fails_after_a_sample)
    with pytest.raises(OSError):
        soak.main(["--url", "http://127.0.0.1:1", "--rate", "1", "--minutes", "1", "--out", str(tmp_path)])
    [path] = tmp_path.glob("soak-*.json")
    report = json.loads(path.read_text())
    assert report["interrupted"] and report["error"] == "OSError: no space left on device"
    assert len(report["samples"]) == 1


def _server_of(pid: int) -> psutil.Process | None:
    """The first process below `pid` that carries a harness server's token (a started server), or None."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if SERVER_TOKEN in child.environ():
                return child
        except psutil.Error:
            continue
    return None


def _carrying(token: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(SERVER_TOKEN) == token:
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("command", [
    "scripts/soak.py --out {tmp}", "scripts/measure_memory.py --out {tmp}/memory.json", "-m loadtests.startup --runs 1",
    "scripts/profile_service.py --out {tmp}", "-m loadtests.grpc_vs_http_latency",
    "scripts/fault_sigterm.py --out {tmp}", "scripts/fault_worker_kill.py --out {tmp}",
    "-m loadtests.benchmark --systems service --out {tmp}", "-m loadtests.run_locust --out {tmp}",
], ids=lambda command: command.split()[1] if command.startswith("-m") else command.split()[0])
def test_sigterm_stops_the_server_a_command_started(command: str, production_tag: str, tmp_path: Path) -> None:
    """SIGTERM (a timeout, `kill`) ended these commands at once and left the `bentoml serve` each had started running
    (in a session of its own), with its /tmp/bentoml-home-* folder. Sent while the server starts, it now unwinds as
    Ctrl-C does: the server and its folder are gone, one line, exit 143. An earlier run's results in the same
    folder are not left beside the interrupted run's logs as if they were its own (a helper's find, benchmark)."""
    stale = tmp_path / ("summary.json" if "run_locust" in command else "benchmark.json")
    stale.write_text("{}")
    proc = subprocess.Popen([sys.executable, *command.format(tmp=tmp_path).split()], cwd=ROOT, env=server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    token = None
    try:
        deadline = time.monotonic() + HANG_S
        while (server := _server_of(proc.pid)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        environ = server.environ()
        token, home = environ[SERVER_TOKEN], Path(environ["BENTOML_HOME"])
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=HANG_S)[1]
        assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("interrupted: ")
        assert not _carrying(token), "the server (or one of its workers) still runs"
        assert home.name.startswith("bentoml-home-") and not home.exists()
        if "benchmark" in command or "run_locust" in command:
            assert not stale.exists(), stale
    finally:
        proc.kill()
        proc.communicate()
        for leftover in _carrying(token) if token else []:
            leftover.kill()


def test_sigterm_during_a_soak_keeps_its_samples(tmp_path: Path) -> None:
    """SIGTERM is an interrupt inside the soak's event loop too: the samples so far are written, as on Ctrl-C."""
    from tests.stubs import stub_server

    with stub_server() as url:
        returncode, stderr = _interrupt_soak([sys.executable, "scripts/soak.py", "--url", url, "--rate", "5",
                                              "--minutes", "5", "--sample-s", "1", "--out", str(tmp_path)],
                                             signal.SIGTERM)
    assert returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    [partial] = tmp_path.glob("soak-*.json")
    report = json.loads(partial.read_text())
    assert report["interrupted"] and report["samples"] and "error" not in report


def test_locust_images_per_second_counts_answered_requests_only(tmp_path: Path) -> None:
    """images/s came from every request's rate, failures included: a run whose requests all failed showed images/s."""
    from harness.payloads import MULTI_COUNT

    def row(name: str, requests: int, failures: int, per_s: float) -> dict:
        return {"type": "POST", "name": name, "requests": requests, "failures": failures, "requests_per_s": per_s,
                "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0}

    stats = tmp_path / "final_stats.json"
    stats.write_text(json.dumps({"by_request": [row("/classify [single]", 10, 4, 5.0),
                                                row(f"/classify [{MULTI_COUNT} images]", 6, 6, 3.0),
                                                row("/classify [full-size]", 0, 0, 0.0)],
                                 "aggregated": row("", 16, 10, 8.0)}))
    summary = run_locust.summarise(stats)
    rows = {r["name"]: r for r in summary["by_request"]}
    assert rows["/classify [single]"]["images_per_s"] == 3.0  # 6 of 10 answered at 5 requests/s
    assert rows[f"/classify [{MULTI_COUNT} images]"]["images_per_s"] == 0  # every one failed
    assert summary["aggregated"]["images_per_s"] == 3.0


def test_locust_failing_at_start_never_reports_an_earlier_runs_statistics(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A reused --out kept the last run's final_stats.json; when Locust failed at start, those were summarised as the
    new run's. Here Locust (a stand-in that exits 1 at once) writes nothing, against a stub answering /readyz."""
    from tests.stubs import stub_server

    out = tmp_path / "out"
    out.mkdir()
    (out / "final_stats.json").write_text(json.dumps({"by_request": [], "aggregated": {
        "type": "", "name": "", "requests": 100, "failures": 0, "requests_per_s": 50.0, "p50_ms": 1.0, "p95_ms": 1.0,
        "p99_ms": 1.0, "max_ms": 1.0}}))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "locust").write_text("#!/bin/sh\nexit 1\n")
    (fake / "locust").chmod(0o755)
    for earlier in ("summary.json", "summary.md", "report.html"):  # the earlier run's reports, as it left them
        (out / earlier).write_text("an earlier run's report")
    monkeypatch.setattr(run_locust, "VENV_BIN", fake)
    with stub_server() as url:
        assert run_locust.main(["--url", url, "-u", "1", "-d", "5", "--out", str(out)]) == 2
    assert "Locust wrote no statistics (exit 1)" in capsys.readouterr().err
    assert not [p.name for p in out.iterdir() if p.name in ("summary.json", "summary.md", "report.html")]


@pytest.mark.parametrize("seconds", ["0", "-1"])
def test_measure_memory_refuses_a_load_of_no_time(seconds: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--seconds 0` (or less) started a server, measured no load, exited 0 and replaced docs/results/memory.json."""
    with pytest.raises(SystemExit) as exit_:
        script("measure_memory").main(["--seconds", seconds])
    assert exit_.value.code == 2 and f"argument --seconds: must be > 0, not {seconds}" in capsys.readouterr().err


def test_measure_memory_fails_a_phase_that_answered_nothing() -> None:
    """A load phase that completed no request (or only failed ones) measured an idle server: the run fails unwritten."""
    unloaded = script("measure_memory").unloaded
    assert unloaded([{"phase": "mix", "requests": 0, "failures": 0}, {"phase": "heavy", "requests": 3, "failures": 0},
                     {"phase": "broken", "requests": 5, "failures": 5}]) == ["mix", "broken"]


def test_benchmark_targets_are_read_at_the_highest_client_count_in_any_order() -> None:
    """The targets stated "at the highest client count" read the last one given: `--concurrency 32,1` judged the
    service against the peer at 1 client, and counted the failures at 1 client as those at the top."""
    from loadtests.benchmark import ratios_and_targets

    def row(system: str, clients: int, images_per_s: float, failures: int = 0) -> dict:
        return {"system": system, "clients": clients, "images_per_s": images_per_s, "failures": failures,
                "server_cpu_cores": 1.0, "p99_ms": 10.0}

    runs = [row("service", 32, 300.0, failures=2), row("peer", 32, 100.0),
            row("service", 1, 50.0), row("peer", 1, 50.0)]
    ratios, targets = ratios_and_targets(None, runs, [32, 1], cores=2)
    assert ratios["service_vs_peer"] == 3.0 and targets["service_vs_peer"]["met"]
    assert targets["zero_failures_at_top"] == {"value": 2, "target": 0, "met": False}


@pytest.mark.parametrize("command, option, kind", [
    ("soak", "--out", "file"), ("fuzz_decode", "--json", "folder"), ("loadtests.benchmark", "--results", "file"),
    ("loadtests.grpc_vs_http_latency", "--json", "folder"), ("loadtests.startup", "--json", "folder"),
    ("measure_memory", "--out", "folder"), ("loadtests.benchmark", "--out", "file"), ("loadtests.run_locust", "--out", "file"),
    ("fault_sigterm", "--out", "file"), ("fault_worker_kill", "--out", "file"), ("loadtests.spread", "--out", "file"),
    ("loadtests.ablations", "--out", "folder"), ("profile_service", "--out", "file"),
])
def test_output_paths_are_checked_before_the_work(command: str, option: str, kind: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A folder given for a file (or a file for a folder) failed with a traceback only after the whole run, its
    figures lost (the soak after its minutes of load, the fuzzer after its rounds); now one line and exit 2 at once."""
    wrong = tmp_path  # a folder
    if kind == "file":
        wrong = tmp_path / "a-file"
        wrong.write_text("")
    main = importlib.import_module(command).main if command.startswith("loadtests.") else script(command).main
    with pytest.raises(SystemExit) as exit_:
        main([option, str(wrong)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: {wrong} is a {kind}; give a " in err, err


@pytest.mark.parametrize("command, argv, words", [
    ("profile_service", ["--rate", "0"], "argument --rate: must be in [1, 10000], not 0"),  # py-spy timed out
    ("profile_service", ["--clients", "0"], "argument --clients: must be >= 1, not 0"),  # "0.0 images/s", exit 0
    ("loadtests.grpc_vs_http_latency", ["--grpc-url", "127.0.0.1:1"], "--grpc-url goes with --url"),  # ignored
])
@pytest.mark.timeout(120)  # refused at once; without the checks a server would start and be loaded
def test_options_that_measure_nothing_or_something_else_are_refused(command: str, argv: list[str], words: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module(command).main if command.startswith("loadtests.") else script(command).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err, err


def test_a_url_that_is_not_one_and_a_model_not_stored_are_one_line(production_tag: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A helper's finds: `run_locust --url 'http://[::1'` and `ablations --model nope` ended in tracebacks."""
    assert run_locust.main(["--url", "http://[::1", "-d", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --url 'http://[::1' is not a URL (Invalid port: ':1')"
    done = subprocess.run([sys.executable, "-m", "loadtests.ablations", "--only", "preprocess", "--model", "nope"],
                          cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: model pneumonia-classifier:nope is not in the store")


@pytest.mark.parametrize("command, option", [
    ("loadtests.run_locust", "--env"), ("loadtests.benchmark", "--service-env"), ("profile_service", "--env"),
])
@pytest.mark.parametrize("text", ["PNEUMONIA_WORKERS", "=2"])
def test_server_environment_options_refuse_text_that_is_not_key_value(command: str, option: str, text: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A KEY=VALUE option without '=' crashed with a ValueError traceback (dict() of a 1-element sequence)."""
    main = importlib.import_module(command).main if command.startswith("loadtests.") else script(command).main
    with pytest.raises(SystemExit) as exit_:
        main([option, text])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: {text!r} is not KEY=VALUE" in err, err


def test_suite_runs_keeps_a_foreign_folder_and_takes_the_median_of_an_even_count(tmp_path: Path) -> None:
    """scripts/suite_runs.sh removed any OUT_DIR given (`rm -rf`), took RUNS 0 (a summary of nothing), and its median
    of two runs was the larger. Run here on a tiny repository whose CI command prints pytest's verdict line, taking
    10 s, then 20 s (a counter); the script is that repository's copy, so it clones and runs only that."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".ci").mkdir()
    (repo / "scripts" / "suite_runs.sh").write_text((ROOT / "scripts" / "suite_runs.sh").read_text())
    (repo / ".ci" / "run").write_text('n=$(( $(cat "$COUNTER" 2>/dev/null || echo 0) + 1 )); echo $n > "$COUNTER"\n'
                                      'sleep 0.1; echo "===== 5 passed in $((n * 10)).0s ====="\n')  # wall > 0
    git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "tiny"]):
        subprocess.run([*git, *step], check=True, capture_output=True)
    env = {**server_env(), "COUNTER": str(tmp_path / "counter")}

    def suite_runs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(repo / "scripts" / "suite_runs.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=HANG_S)

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    done = suite_runs(str(foreign), "1")
    assert done.returncode == 2 and "is not empty and not an earlier output" in done.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    for runs in ("0", "two"):
        done = suite_runs(str(tmp_path / "out"), runs)
        assert done.returncode == 2 and f"RUNS must be a whole number >= 1, not '{runs}'" in done.stderr
    for _ in range(2):  # the second time into the first's output, which it may replace
        done = suite_runs(str(tmp_path / "out"), "2")
        assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [run["pytest_s"] for run in summary["runs"]] == [30.0, 40.0] and summary["pytest_s_median"] == 35.0
    subprocess.run(["rm", "-rf", str(tmp_path / "out" / "clone")], check=True)  # a whole .venv: freed by hand
    assert suite_runs(str(tmp_path / "out"), "1").returncode == 0  # still an earlier output (its logs say so)


@pytest.mark.parametrize("argv, words", [
    (["--utilisation", "0"], "argument --utilisation: must be in (0, 1], not 0"),  # ZeroDivisionError
    (["--utilisation", "-0.5"], "argument --utilisation: must be in (0, 1], not -0.5"),  # a plan of negative pods
    (["--pod-cpus", "0"], "argument --pod-cpus: must be in [0.1, 1024], not 0"),
    (["--pod-cpus", "-2"], "argument --pod-cpus: must be in [0.1, 1024], not -2"),
    (["--pod-cpus", "1e-300"], "argument --pod-cpus: must be in [0.1, 1024], not 1e-300"),  # a 300-digit plan
    (["--images-per-study", "-1"], "argument --images-per-study: must be in (0, 1000], not -1"),
    (["--images-per-study", "1e308"], "argument --images-per-study: must be in (0, 1000], not 1e308"),  # OverflowError
])
def test_capacity_plan_refuses_numbers_it_cannot_plan_with(argv: list[str], words: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        script("capacity").main([*argv, "--json"])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_latency_comparison_refuses_no_calls_and_reports_a_failed_call_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--calls 0` ended in a StatisticsError after the warm-up; an unreachable service in client.errors.Unavailable's
    traceback."""
    from harness.servers import free_port
    from loadtests import grpc_vs_http_latency

    with pytest.raises(SystemExit) as exit_:
        grpc_vs_http_latency.main(["--calls", "0"])
    assert exit_.value.code == 2 and "argument --calls: must be >= 1, not 0" in capsys.readouterr().err
    dead = ["--url", f"http://127.0.0.1:{free_port()}", "--grpc-url", f"127.0.0.1:{free_port()}", "--calls", "1"]
    assert grpc_vs_http_latency.main(dead) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a call failed: Unavailable: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("only, words", [("engine", "unknown engine; choose from preprocess,forward,bf16,"),
                                         ("forward,int4", "unknown int4; choose from"), (",", "unknown ','; choose")])
def test_ablations_refuse_names_they_do_not_measure(only: str, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt --only name measured nothing, exited 0 and wrote `rows: []` as the result."""
    from loadtests import ablations

    with pytest.raises(SystemExit) as exit_:
        ablations.main(["--only", only])
    assert exit_.value.code == 2 and f"argument --only: {words}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [(["--steps", "0"], "argument --steps: must be >= 1, not 0"),
                                         (["--threads", "0"], "argument --threads: must be >= 1, not 0")])
def test_train_step_timer_refuses_counts_below_one(argv: list[str], words: str) -> None:
    """`--steps 0` timed a warm-up step and ended in a StatisticsError, `--threads 0` in torch's RuntimeError."""
    proc = subprocess.run([sys.executable, "scripts/train_step_time.py", *argv], cwd=ROOT, env=server_env(),
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_figure_spread_shows_a_figure_a_run_lacks_as_n_a(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kept run with a figure of None (a SIGTERM drill whose server never exited: no exit time) failed the whole
    summary with TypeError: float(None)."""

    def sigterm_run(exit_after_term_s: float | None) -> dict:
        return {"in_flight_kinds": {"http_200": 4}, "in_flight": 4, "in_flight_finished_after_term_s": 1.5,
                "exit_code": 0, "exit_after_term_s": exit_after_term_s, "late_sent": 3, "late_kinds": {},
                "late_max_s": 0.1}

    for k, exit_s in enumerate((2.0, None, 4.0), start=1):
        (tmp_path / f"fault-sigterm-{k}.json").write_text(json.dumps(sigterm_run(exit_s)))
    assert script("figure_spread").main([str(tmp_path)]) == 0
    assert "| exit after SIGTERM, s | 3 (2-4) | 2, n/a, 4 |" in capsys.readouterr().out


def test_decoder_fuzzing_refuses_no_time_and_runs_at_least_one_round(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--minutes -1` (or a time over before the first round) fuzzed 0 examples and passed: exit 0, 0 failures."""
    fuzz = script("fuzz_decode")
    with pytest.raises(SystemExit) as exit_:
        fuzz.main(["--minutes", "-1"])
    assert exit_.value.code == 2 and "argument --minutes: must be > 0, not -1" in capsys.readouterr().err
    summary = tmp_path / "fuzz.json"
    argv = ["--minutes", "1e-9", "--round", "3", "--out", str(tmp_path / "failing"), "--json", str(summary)]
    assert fuzz.main(argv) == 0
    assert json.loads(summary.read_text())["examples"] >= 1


def test_a_command_whose_server_will_not_start_says_why_in_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A helper's find: benchmark, run_locust, soak and measure_memory printed a 14-frame traceback when the server
    they started refused its configuration. Every such command runs through `answered`: one line and exit 1."""
    from harness.servers import answered, start_server

    assert answered(lambda: start_server(tmp_path / "server.log", PNEUMONIA_FOO="1").stop() or 0) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: the server exited with 1 before it was ready: Error:"), err
    assert "unknown environment variable PNEUMONIA_FOO" in err and str(tmp_path / "server.log") in err


@pytest.mark.parametrize("content, spread_words, capacity_words", [
    ("{bad", "is not JSON", "is not JSON"), ("[]", "holds a JSON list, not the object", "holds a JSON list"),
    ("{}", "no field 'runs'", "has no 'service' rows"),
])
def test_summaries_of_results_files_refuse_a_malformed_one_in_one_line(content: str, spread_words: str,
                                                                       capacity_words: str, tmp_path: Path) -> None:
    """spread and capacity gave JSONDecodeError, TypeError or KeyError tracebacks on such files (a helper's find)."""
    bad = tmp_path / "benchmark-1.json"
    bad.write_text(content)
    for argv, words in ((["-m", "loadtests.spread", str(bad)], spread_words),
                        ([str(ROOT / "scripts" / "capacity.py"), "--benchmark", str(bad)], capacity_words)):
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and words in done.stderr, (argv, done.stderr)


def test_a_sequential_benchmark_whose_server_cannot_start_says_why(production_tag: str, tmp_path: Path) -> None:
    """A helper's find: a failed start under --sequential was reported as "no field 'service' where this command
    expected one" (the clean-up's KeyError replaced the start's error, and a Ctrl-C too)."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.benchmark", "--sequential", "--systems", "service", "--service-env",
         "PNEUMONIA_WORKERS=abc", "--window-s", "1", "--warmup-s", "0", "--concurrency", "1", "--quiet-timeout-s", "0",
         "--out", str(tmp_path / "bench")], cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("error: the server exited with 1 before it was ready"), done.stderr
    assert "workers" in last and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, words", [
    (["--name", "sub/x"], "argument --name: 'sub/x' is not a file name"),  # failed after all runs, nothing copied
    (["--systems", ","], "--systems names no system"),  # measured nothing, exit 0, claimed a plot
    (["--max-other-load", "0"], "argument --max-other-load: must be > 0, not 0"),  # waited out every timeout
    (["--variant", "a=PNEUMONIA_WORKERS=1", "--variant", "a=PNEUMONIA_WORKERS=2"],
     "--variant names a more than once"),  # the first was dropped without a word
])
@pytest.mark.timeout(120)  # refused at once; without the checks a whole benchmark would run
def test_benchmark_refuses_a_name_with_a_folder_and_an_empty_system_list(argv: list[str], words: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.benchmark import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and words in capsys.readouterr().err
