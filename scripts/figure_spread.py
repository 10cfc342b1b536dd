"""Median and min-max of the figures the docs quote, over the runs kept by scripts/doc_figures.sh.

    python scripts/figure_spread.py docs/results > docs/results/doc-figures-spread.md

Reads `<group>-<k>.json` (latency-224px, latency-2048px, locust-32-users, fault-sigterm,
fault-worker-kill) and prints one Markdown table per group: each figure as
`median (min-max)` with the runs it came from, and the machine's load while they ran.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from harness.paths import numbered_runs
from harness.record import read_json
from harness.servers import answered
from loadtests.spread import stats, text

Figure = tuple[str, Callable[[dict], float | None]]

GROUPS: dict[str, list[Figure]] = {
    "latency-224px": [
        ("HTTP median ms", lambda d: d["results"]["HTTP"]["median_ms"]),
        ("HTTP p95 ms", lambda d: d["results"]["HTTP"]["p95_ms"]),
        ("HTTP server median ms", lambda d: d["results"]["HTTP"]["server_median_ms"]),
        ("gRPC median ms", lambda d: d["results"]["gRPC"]["median_ms"]),
        ("gRPC p95 ms", lambda d: d["results"]["gRPC"]["p95_ms"]),
        ("gRPC server median ms", lambda d: d["results"]["gRPC"]["server_median_ms"]),
    ],
    "locust-32-users": [
        ("requests/s", lambda d: d["aggregated"]["requests_per_s"]),
        ("images/s", lambda d: d["aggregated"]["images_per_s"]),
        ("p50 ms", lambda d: d["aggregated"]["p50_ms"]),
        ("p95 ms", lambda d: d["aggregated"]["p95_ms"]),
        ("p99 ms", lambda d: d["aggregated"]["p99_ms"]),
        ("failures", lambda d: d["aggregated"]["failures"]),
    ],
    "fault-sigterm": [
        ("in-flight requests answered 200", lambda d: d["in_flight_kinds"].get("http_200", 0)),
        ("in flight", lambda d: d["in_flight"]),
        ("last in-flight answer after SIGTERM, s", lambda d: d["in_flight_finished_after_term_s"]),
        ("exit code", lambda d: d["exit_code"]),
        ("exit after SIGTERM, s", lambda d: d["exit_after_term_s"]),
        ("late requests sent", lambda d: d["late_sent"]),
        ("late requests answered 200", lambda d: d["late_kinds"].get("http_200", 0)),
        ("longest wait of a late request, s", lambda d: d["late_max_s"]),
    ],
    "fault-worker-kill": [
        ("requests before the kill", lambda d: d["runs"][0]["requests_before_kill"]),
        ("failures before the kill", lambda d: d["runs"][0]["failures_before_kill"]),
        ("requests after the kill", lambda d: d["runs"][0]["requests_after_kill"]),
        ("failures after the kill", lambda d: d["runs"][0]["failures_after_kill"]),
        ("first success after the kill, s", lambda d: d["runs"][0]["first_success_after_kill_s"]),
        ("longest time without a success, s", lambda d: d["runs"][0]["longest_gap_s"]),
        ("replacement started after, s", lambda d: d["runs"][0]["replacement_spawned_s"]),
        ("replacement warm after, s", lambda d: d["runs"][0]["replacement_ready_s"]),
        ("served by the survivor while replacing", lambda d: d["runs"][0]["served_while_replacing"]),
    ],
}
GROUPS["latency-2048px"] = GROUPS["latency-224px"]


def table(name: str, runs: list[tuple[Path, dict]]) -> str:
    lines = [f"### {name}: {len(runs)} runs", "", "| figure | median (min-max) | runs |", "| --- | ---: | --- |"]
    for label, read in GROUPS[name]:
        # A run can lack a figure (a server that never exited has no exit time): n/a, left out of the median.
        values = [None if (value := read(data)) is None else float(value) for _, data in runs]
        shown = ", ".join("n/a" if v is None else f"{v:g}" for v in values)
        lines.append(f"| {label} | {text(stats(values), digits=None)} | {shown} |")
    loads = [data.get("load_average_1m_at_start") for _, data in runs]
    commits = sorted({str(data.get("commit", "?")) for _, data in runs})
    lines += ["", f"Files: {', '.join(p.name for p, _ in runs)}; commit {', '.join(commits)}; "
              f"1-minute load average at each start: {', '.join(str(x) for x in loads)}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where scripts/doc_figures.sh kept the runs (docs/results)")
    args = parser.parse_args(argv)
    found = False
    for name in GROUPS:
        files = numbered_runs(args.folder, name)
        if not files:
            continue
        found = True
        print(table(name, [(p, read_json(p)) for p in files]))
    if not found:
        parser.error(f"no runs in {args.folder} (expected files such as latency-224px-1.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(answered(main, "stopped"))
