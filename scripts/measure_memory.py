"""Memory of a warm `bentoml serve`, per process: what a Kubernetes pod's memory requests and limits come from.

    python scripts/measure_memory.py                      # the service's default workers (one per core), 40 s of load
    python scripts/measure_memory.py --workers 1 --seconds 20 --out docs/results/memory-1w.json

Starts the service (shipped model, default settings) on free 127.0.0.1 ports,
waits until every worker has logged a warm model, samples the memory of each
process of the server tree idle, then drives a closed-loop load for --seconds
(the benchmark's image mix at 32 clients, then 16 full-size radiographs per
request at 8 clients, which fills batches of 32 and holds the most decoded
pixels at once), sampling every second, and samples again after the load.

Per process it records RSS, PSS and USS (MiB, 2^20 bytes). RSS counts pages shared between
processes (the torch libraries, the model file) once per process; PSS splits
them among the sharers, so the PSS of the tree adds up to what the pod's memory
cgroup is charged for those pages, which is the figure requests and limits are
sized from. The process tree is the `bentoml serve` arbiter (it verifies the
model with torch before forking, so it holds a runtime too) and one worker
process per worker. Prints the figures and writes them as JSON to --out
(default docs/results/memory.json). Requests go only to the server it starts,
and stop after --seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time

import httpx
import psutil

from core.cli import bounded, output_file
from harness.loadgen import encode_requests, run_load
from harness.paths import ROOT
from harness.payloads import PlannedRequest, api_key_headers, build_samples, encode_multipart, request_plan
from harness.processes import MB, WORKER_MODULE
from harness.servers import exit_with, kill_group, model_store, start_server

DEFAULT_OUT = ROOT / "docs" / "results" / "memory.json"
HEADROOM = 1.25  # over the high-water mark: heavier images or a longer run than the measured one


def snapshot(serve_pid: int) -> list[dict]:
    """RSS, PSS and USS in MiB of the `bentoml serve` process and each descendant, with its role."""
    try:
        root = psutil.Process(serve_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for process in processes:
        try:
            info = process.memory_full_info()
            cmdline = " ".join(process.cmdline())
        except psutil.Error:
            continue
        role = "arbiter" if process.pid == serve_pid else "worker" if WORKER_MODULE in cmdline else "other"
        out.append({"pid": process.pid, "role": role, "rss_mib": round(info.rss / MB, 1),
                    "pss_mib": round(info.pss / MB, 1), "uss_mib": round(info.uss / MB, 1)})
    return out


def totals(processes: list[dict]) -> dict:
    workers = [p for p in processes if p["role"] == "worker"]
    return {
        "processes": len(processes),
        "workers": len(workers),
        "tree_rss_mib": round(sum(p["rss_mib"] for p in processes), 1),
        "tree_pss_mib": round(sum(p["pss_mib"] for p in processes), 1),
        "arbiter_pss_mib": round(sum(p["pss_mib"] for p in processes if p["role"] == "arbiter"), 1),
        "worker_pss_mib": [p["pss_mib"] for p in workers],
        "worker_rss_mib": [p["rss_mib"] for p in workers],
    }


class Sampler(threading.Thread):
    """Snapshots every `interval` seconds until stopped; keeps the snapshot with the largest tree PSS."""

    def __init__(self, serve_pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.serve_pid, self.interval = serve_pid, interval
        self.peak: list[dict] = []
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            snap = snapshot(self.serve_pid)
            self.samples += 1
            if sum(p["pss_mib"] for p in snap) > sum(p["pss_mib"] for p in self.peak):
                self.peak = snap
            self._stop_event.wait(self.interval)

    def stop(self) -> list[dict]:
        self._stop_event.set()
        self.join()
        return self.peak


def derive(report: dict, workers: int, headroom: float = HEADROOM) -> dict:
    """The pod's memory request and limit for `workers` workers, from the measured high-water marks.

    high water = the arbiter's largest PSS + `workers` x the largest worker PSS seen (idle, under load or after);
    request = limit = high water x `headroom`, rounded up to 256 MiB (Guaranteed QoS: memory is not compressible,
    so a pod allowed to grow past its request is the one the kubelet evicts first).
    """
    states = [report[name] for name in ("idle", "peak_under_load", "after_load")]
    arbiter = max(p["pss_mib"] for state in states for p in state if p["role"] == "arbiter")
    worker = max(p["pss_mib"] for state in states for p in state if p["role"] == "worker")
    high_water = arbiter + workers * worker
    mib = int(-(-high_water * headroom // 256) * 256)
    return {"workers": workers, "arbiter_pss_mib": arbiter, "worker_pss_mib": worker, "high_water_mib": round(high_water, 1),
            "headroom": headroom, "memory_request_limit": f"{mib}Mi",
            "formula": f"ceil(({arbiter} + {workers} x {worker}) MiB x {headroom} / 256 MiB) x 256 MiB = {mib}Mi"}


def unloaded(phases: list[dict]) -> list[str]:
    """The load phases in which no request was answered: their peak is an idle server's, not a measurement."""
    return [phase["phase"] for phase in phases if phase["requests"] - phase["failures"] <= 0]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=bounded(int, 1, 64), default=None, help="PNEUMONIA_WORKERS (default: the service's own, one per core)")
    parser.add_argument("--seconds", type=bounded(float, 0, low_open=True), default=40.0,
                        help="seconds of load, split over the two phases")
    parser.add_argument("--out", type=output_file, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    command = "python scripts/measure_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"command": command.strip(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "machine": {"cores": psutil.cpu_count(), "python": platform.python_version(),
                                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}}
    with model_store():
        env = {} if args.workers is None else {"PNEUMONIA_WORKERS": str(args.workers)}
        log = ROOT / "results" / "memory" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.log"
        server = start_server(log, **env)
        try:
            assert server.process is not None
            pid = server.process.pid
            # What the server runs, as it reports it: PNEUMONIA_WORKERS or a settings file may set it (the count
            # derived here from --workers alone recorded 2 workers for a 1-worker server, and sized the pod by it).
            health = httpx.post(server.url + "/health", headers=api_key_headers(), timeout=60)
            if health.status_code != 200:  # PROTECT_HEALTH with keys: the load's key ($PNEUMONIA_API_KEY) opens it
                print(f"error: /health answered {health.status_code}; with API keys on, set PNEUMONIA_API_KEY to "
                      "one of them", file=sys.stderr)
                return 1
            workers = health.json()["workers"]
            report["settings"] = {"workers": workers, "env": env}
            time.sleep(2.0)
            report["idle"] = snapshot(pid)

            samples = build_samples()
            mix = encode_requests(request_plan(samples, 400, seed=0), server.url)
            body, content_type = encode_multipart([samples.full[i % len(samples.full)] for i in range(16)])
            heavy = encode_requests([PlannedRequest("full16", tuple(samples.full[:1]) * 16, body, content_type)],
                                    server.url)
            sampler = Sampler(pid)
            sampler.start()
            phases = []
            try:
                for name, requests, clients in (("mix", mix, 32), ("16 full-size per request", heavy, 8)):
                    load = run_load(server.url, requests, clients, warmup_s=1.0, window_s=args.seconds / 2)
                    summary = load.summary()
                    phases.append({"phase": name, "clients": clients, **{k: summary[k] for k in (
                        "requests", "images", "failures", "images_per_s", "p99_ms")}})
                    print(f"  load {name}: {clients} clients, {summary['images_per_s']} images/s, "
                          f"{summary['failures']} failures", file=sys.stderr)
            finally:
                peak = sampler.stop()
            if idle := unloaded(phases):  # an idle server's figures would replace the kept ones (docs/results)
                print(f"error: no request was answered in the load phase(s) {', '.join(idle)}; {args.out} not written",
                      file=sys.stderr)
                return 1
            report["load"] = phases
            report["peak_under_load"] = peak
            report["peak_samples"] = sampler.samples
            time.sleep(2.0)
            report["after_load"] = snapshot(pid)
        finally:
            server.stop()
            kill_group(server)

    report["summary"] = {name: totals(report[name]) for name in ("idle", "peak_under_load", "after_load")}
    report["derived"] = derive(report, workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'state':<16} {'tree RSS':>9} {'tree PSS':>9} {'arbiter PSS':>12}  worker PSS (RSS) MiB")
    for name, row in report["summary"].items():
        per_worker = ", ".join(f"{p:.0f} ({r:.0f})" for p, r in zip(row["worker_pss_mib"], row["worker_rss_mib"]))
        print(f"{name:<16} {row['tree_rss_mib']:>9.0f} {row['tree_pss_mib']:>9.0f} {row['arbiter_pss_mib']:>12.0f}  {per_worker}")
    print(f"pod memory request = limit for {workers} workers: {report['derived']['formula']}")
    print(f"JSON: {args.out}")
    failures = sum(p["failures"] for p in phases)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    exit_with(main)
