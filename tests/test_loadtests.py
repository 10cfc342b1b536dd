"""Smoke runs of the load-test tools: the Locust command and the one-run benchmark, short versions.

They check behaviour (reports written, every answer correct, every table row
present), never speed: figures come from the benchmark itself (docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import run_locust
from harness.paths import ROOT
from harness.servers import HANG_S, server_env

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


def test_locust_command_reports_failures_against_a_dead_url(tmp_path: Path) -> None:
    from harness.servers import free_port

    out = tmp_path / "dead"
    code = run_locust.main(["--url", f"http://127.0.0.1:{free_port()}", "-u", "1", "-d", f"{HANG_S:.0f}", "--stop-after", "2",
                            "--out", str(out)])
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aggregated"]["failures"] == summary["aggregated"]["requests"] >= 8  # 4 request types x 2


def test_benchmark_quick_has_every_row_and_no_failures(production_tag: str, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.benchmark", "--quick", "--window-s", "1.5", "--out", str(out)],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert result["model"] == production_tag
    assert result["bare_model"]["limit_images_per_s"] > 0
    assert {r["batch"] for r in result["bare_model"]["rows"]} == {1, 8, 32}
    points = {(r["system"], r["clients"]) for r in result["runs"]}
    assert points == {(s, c) for s in ("service", "service_nobatch", "baseline") for c in (1, 8, 32)}
    for row in result["runs"]:
        assert row["failures"] == 0, row
        assert row["images_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_cpu_cores"] is not None and row["server_cpu_cores"] > 0
    assert set(result["targets"]) == {
        "service_vs_baseline", "service_vs_bare_model", "batching_vs_nobatch", "service_p99_ms_at_8", "zero_failures_at_top"
    }
    table = (out / "benchmark.md").read_text()
    for label in ("bare model limit", "service, adaptive batching", "service, batching off", "FastAPI baseline"):
        assert label in table and label in proc.stdout
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
