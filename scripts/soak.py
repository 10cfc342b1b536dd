"""Soak test: steady load at ~70% of measured capacity for a long time; failures and memory growth.

    python scripts/soak.py                          # start a service, measure capacity, 10 minutes at 70%
    python scripts/soak.py --minutes 60 --workers 2
    python scripts/soak.py --rate 40 --minutes 5    # skip the capacity ramp
    python scripts/soak.py --url http://127.0.0.1:3000 --pid 1234   # a running service (pid: for memory)

Capacity is the best throughput of a closed-loop ramp (1 to 32 connections, one
real X-ray per request). The soak is open-loop: requests are released on a
fixed schedule at `--fraction` of that capacity whatever the answers do, served
by `--connections` keep-alive connections, and each latency counts from the
scheduled release (no coordinated omission). Every `--sample-s` seconds the
resident memory (RSS) of the whole server process tree (the `bentoml serve`
arbiter and its workers) is recorded. Reported, and written to
results/soak-*.json with every sample: requests served, failures by kind,
latency percentiles, RSS at start and end, growth in percent and a fitted
trend. Exit 1 unless requests were served, there were zero failures, the
validity gate refused at most `--max-refused-pct` of the answers (default 10)
and the memory grew by less than `--max-growth-pct` (default 5); also exit 1,
at once, when every request of the capacity ramp failed.

The client is the project's load generator (harness.loadgen: HTTP/1.1 over
asyncio streams, pre-encoded requests): it shares the machine's cores with the
server, so it must cost little. Requests go only to the given URL (by default a
server this script starts on 127.0.0.1), and stop at the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from urllib.parse import urlsplit

import numpy as np
import psutil

from core.cli import bounded, output_folder
from harness import record
from harness.faults import write_json
from harness.loadgen import ANSWERED, answered, encode_request, measure_capacity, open_loop
from harness.paths import RESULTS
from harness.payloads import xray_payloads
from harness.processes import MB, process_rss, tree_rss
from harness.servers import exit_with, kill_group, model_store, start_server


def soak(host: str, port: int, requests: list[bytes], rate: float, seconds: float, sample_s: float,
         pid: int | None, connections: int, max_queue: int, timeout_s: float, samples: list[dict]) -> dict:
    """Open-loop requests at `rate`/s for `seconds`, sampling throughput, latency and server RSS into `samples`
    (the caller's list: an interrupted soak still has them)."""

    def on_sample(figures: dict) -> None:
        samples.append({**figures, "rss_mb": round(tree_rss(pid) / MB, 1) if pid else None})
        s = samples[-1]
        print(f"  t={s['t_s']:7.1f}s  served {s['served']:7d}  failed {s['failed']:3d}  p95 {s['p95_ms']} ms"
              f"  rss {s['rss_mb']} MB", file=sys.stderr)

    rss_start = process_rss(pid)
    t0 = time.monotonic()
    outcomes, latencies = asyncio.run(
        open_loop(host, port, requests, rate, seconds, connections, max_queue, timeout_s, sample_s, on_sample)
    )
    elapsed = time.monotonic() - t0
    lat = np.array(latencies) * 1000
    return {
        "target_rate": round(rate, 2),
        "connections": connections,
        "elapsed_s": round(elapsed, 1),
        "requests": sum(outcomes.values()),
        "served": answered(outcomes),
        "refused": outcomes["refused"],  # answers of the validity gate: served, and bounded by --max-refused-pct
        "failures": sum(outcomes.values()) - answered(outcomes),
        "failure_kinds": {k: v for k, v in outcomes.items() if k not in ANSWERED},
        "achieved_rps": round(answered(outcomes) / elapsed, 2),
        # none when nothing was answered (NaN is not JSON)
        "latency_ms": {q: round(float(np.percentile(lat, p)), 1) if len(lat) else None for q, p in
                       (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
        "rss_by_process_mb": {"start": rss_start, "end": process_rss(pid)},
        "samples": samples,
    }


def memory_summary(samples: list[dict]) -> dict:
    rss = [(s["t_s"], s["rss_mb"]) for s in samples if s["rss_mb"]]  # 0: the process was gone (no growth of 0 MB)
    if len(rss) < 2:
        return {}
    t, mb = np.array(rss).T
    slope = float(np.polyfit(t, mb, 1)[0])
    half = len(mb) // 2
    return {
        "rss_start_mb": float(mb[0]),
        "rss_end_mb": float(mb[-1]),
        "rss_max_mb": float(mb.max()),
        "growth_pct": round(float((mb[-1] - mb[0]) / mb[0] * 100), 2),
        "growth_second_half_pct": round(float((mb[-1] - mb[half]) / mb[half] * 100), 2),
        "trend_mb_per_hour": round(slope * 3600, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive = bounded(float, 0, low_open=True)
    parser.add_argument("--minutes", type=bounded(float, 0, 7 * 24 * 60, low_open=True), default=10.0,
                        help="soak duration (default 10; at most a week)")
    parser.add_argument("--fraction", type=positive, default=0.7, help="share of the measured capacity (default 0.7)")
    parser.add_argument("--rate", type=positive, help="requests per second; skips the capacity ramp")
    parser.add_argument("--ramp-step-s", type=positive, default=10.0, help="seconds per step of the capacity ramp")
    parser.add_argument("--sample-s", type=positive, default=10.0, help="seconds between memory samples")
    parser.add_argument("--url", help="a running service on this machine (default: start one on 127.0.0.1)")
    parser.add_argument("--pid", type=bounded(int, 1), help="with --url: the `bentoml serve` pid, for memory figures")
    parser.add_argument("--workers", type=bounded(int, 1, 64), default=None,
                        help="PNEUMONIA_WORKERS of a started service (default: the service's own)")
    parser.add_argument("--connections", type=bounded(int, 1), default=32, help="keep-alive connections of the soak")
    parser.add_argument("--max-queue", type=bounded(int, 1), default=2000, help="requests waiting for a connection "
                        "before further ones are counted as failures")
    parser.add_argument("--timeout-s", type=positive, default=30.0, help="per-request timeout")
    parser.add_argument("--max-growth-pct", type=bounded(float, 0), default=5.0,
                        help="largest memory growth over the soak, in percent, that passes (default 5)")
    parser.add_argument("--max-refused-pct", type=bounded(float, 0, 100), default=10.0,
                        help="share of the answers the validity gate may refuse (default 10: the shipped gate refuses "
                        "few of the soak's real X-rays; a server refusing them all soaked clean before)")
    parser.add_argument("--out", type=output_folder, default=RESULTS)
    args = parser.parse_args(argv)
    if args.url and urlsplit(args.url).hostname not in ("127.0.0.1", "localhost"):
        parser.error("--url must point at this machine (127.0.0.1 or localhost)")
    if args.url and urlsplit(args.url).scheme != "http":  # the soak speaks plain HTTP/1.1: https went out as http
        parser.error("--url must be an http:// address (the soak sends plain HTTP)")
    if args.pid is not None and not args.url:  # it replaced the started server's pid: init's memory was soaked
        parser.error("--pid goes with --url (the pid of the `bentoml serve` at that address); a server this command "
                     "starts is measured by its own pid")
    if args.workers is not None and args.url:  # the running server's workers are its own
        parser.error("--workers sets a started server's workers; a server given by --url runs with its own")
    if args.pid is not None and not psutil.pid_exists(args.pid):  # its memory read as 0 MB for the whole soak
        parser.error(f"--pid {args.pid}: no such process")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict = {**record.provenance(argv), "started": stamp, "minutes": args.minutes}
    with model_store() if not args.url else contextlib.nullcontext():
        server = None
        if not args.url:
            extra = {} if args.workers is None else {"PNEUMONIA_WORKERS": str(args.workers)}
            server = start_server(args.out / f"soak-{stamp}.log", **extra)
        try:
            url = args.url or server.url  # type: ignore[union-attr]
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            requests = [encode_request(parts.netloc, image) for image in xray_payloads(32)]
            pid = args.pid or (server.process.pid if server and server.process else None)
            if args.rate is not None:
                rate = args.rate
            else:
                print("measuring capacity ...", file=sys.stderr)
                capacity, ramp = asyncio.run(measure_capacity(host, port, requests, args.ramp_step_s))
                if capacity == 0:  # a soak at 0 req/s sends nothing and passed
                    kinds = sorted({kind for step in ramp for kind in step["failure_kinds"]})
                    print(f"error: the capacity ramp got no answer from {url}: every request failed "
                          f"({', '.join(kinds)})", file=sys.stderr)
                    return 1
                rate = capacity * args.fraction
                report.update(capacity_rps=capacity, capacity_ramp=ramp)
            print(f"soak: {rate:.1f} req/s for {args.minutes} min against {url}", file=sys.stderr)
            samples: list[dict] = []
            try:
                result = soak(host, port, requests, rate, args.minutes * 60, args.sample_s, pid,
                              args.connections, args.max_queue, args.timeout_s, samples)
            except BaseException as exc:  # keep what was measured: the samples so far, marked as interrupted
                report.update(interrupted=True, target_rate=round(rate, 2), samples=samples,
                              memory=memory_summary(samples))
                if not isinstance(exc, KeyboardInterrupt):  # a failure, not Ctrl-C: say which
                    report["error"] = f"{type(exc).__name__}: {exc}"
                path = write_json(args.out / f"soak-{stamp}.json", record.finished(report))
                print(f"interrupted after {len(samples)} samples; JSON: {path}", file=sys.stderr)
                raise
        finally:
            if server is not None:
                server.stop()
                kill_group(server)
    report.update(workers=None if args.url else args.workers, fraction=args.fraction, **result)
    report["memory"] = memory_summary(result["samples"])
    path = write_json(args.out / f"soak-{stamp}.json", record.finished(report))
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "capacity_ramp")}, indent=2))
    print(f"JSON: {path}")
    grew = report["memory"].get("growth_pct", 0.0)
    if result["served"] == 0:  # nothing sent (a rate too low for the duration) or nothing answered: not a pass
        print("error: the soak served no request", file=sys.stderr)
        return 1
    refused_pct = 100 * result["refused"] / result["served"]
    if refused_pct > args.max_refused_pct:  # real chest X-rays: refusing them is no answer a client can use
        print(f"error: the validity gate refused {result['refused']} of {result['served']} answers "
              f"({refused_pct:.1f} %, over --max-refused-pct {args.max_refused_pct:g})", file=sys.stderr)
        return 1
    if result["failures"]:
        print(f"error: {result['failures']} of the soak's requests failed", file=sys.stderr)
        return 1
    if grew >= args.max_growth_pct:  # it exited 1 without a word
        print(f"error: memory grew {grew:g} % over the soak, not under --max-growth-pct {args.max_growth_pct:g}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_with(main)
