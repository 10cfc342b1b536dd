"""One-run serving benchmark: bare model, service with and without batching, a competent and a naive peer.

    python -m loadtests.benchmark             # full run, about 10 minutes on 2 cores
    python -m loadtests.benchmark --repeat 3 --results docs/results --name final   # three runs and their spread
    python -m loadtests.benchmark --quick     # CI smoke: same rows, short windows, 1 worker, servers started together

In one process on one machine, with one load generator (`harness.loadgen`,
a closed-loop asyncio HTTP/1.1 client whose CPU use is measured and printed)
and one image mix (`harness.payloads`: full-size radiographs one per request,
single small images, four-image requests), it measures

- the bare-model limit: preprocessing (`core.preprocess.prepare` from the
  uploaded bytes) plus the forward pass in this process, no HTTP, at each batch
  size, serial and with decoding overlapped with the forward pass; the best is the limit;
- the service (`bentoml serve`) with adaptive batching, as shipped;
- the same service with batching off (PNEUMONIA_BATCHING__ENABLED=false);
- the competent peer (`loadtests.peer_fastapi`): FastAPI without batching as a
  careful engineer writes it: one uvicorn worker per usable core, a sync
  handler in the threadpool, one torch thread per worker, the project's
  preprocessing and the model as the registry loads it (eager); and the same
  peer with the service's inference engine (PNEUMONIA_ENGINE, as the service rows run);
- the naive peer in the seeds' style (`loadtests.baseline_fastapi`: inference in
  an `async def`, one worker, so one request at a time);
- optional service variants (`--variant NAME=KEY=VALUE,...`): the service with other
  settings, measured in the same run for A/B comparisons;

each at 1, 8 and 32 concurrent clients: requests/s, images/s, p50/p95/p99 (and
p50 of the full-size requests alone), failures, server CPU (the server's whole
process tree, in cores) and the load generator's CPU, plus the ratios the targets
are stated in (service / peer and batching on / off at each client count); and,
on the shipped service (system `explain`), what an explanation costs and whether
a burst of them slows `classify` down:

- explain alone: one client calling `POST /explain` back to back (full-size and
  small images), p50/p95 ms;
- classify alone at `--explain-classify-clients` clients (the request mix), and the
  same beside `--explain-burst` clients explaining back to back: classify
  images/s and p50/p95 with and without the burst, and how many explanations
  were answered or turned away (503, the worker's explain slots taken).

Writes benchmark.json, benchmark.md and benchmark.png to --out (default
results/benchmark/<time>/); with --repeat N, one such folder per run (run-1 ...)
and the spread over the runs (median, min-max; loadtests/spread.py), copied into
--results as <name>-<k>.json and <name>-spread.{json,md}. Servers bind free
127.0.0.1 ports and are always stopped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from core.cli import bounded, file_stem, key_value, output_folder, positive_ints
from harness.loadgen import encode_requests, run_load, run_mixed
from harness.paths import RESULTS, ROOT, VENV_BIN
from harness.payloads import IMAGE_KINDS, MIX_WEIGHTS, MULTI_COUNT, build_samples, explain_plan, request_plan
from harness.processes import system_busy_s, tree_cpu_probe, wait_for_quiet
from harness.servers import ServerProcess, _expected_workers, bentoml_serve, exit_with, free_port, server_env
from settings import usable_cores

SYSTEMS = {
    "service": "service, adaptive batching",
    "service_nobatch": "service, batching off",
    "peer": "competent peer (FastAPI, no batching)",
    "peer_engine": "competent peer, the service's engine",
    "baseline": "naive peer, seeds' style (FastAPI baseline)",
}
PEERS = ("peer", "peer_engine")  # the competent peers: the model as stored (eager), and with the service's engine
DEFAULT_SYSTEMS = "bare,service,service_nobatch,peer,peer_engine,baseline,explain"
# At the highest client count unless the name says otherwise.
TARGETS = {
    "service_vs_peer": 2.0,
    "batching_vs_nobatch": 1.5,
    "service_cores_busy_at_8": 0.85,
    "service_vs_bare_model": 0.70,
    "service_vs_baseline": 2.0,
    "service_p99_ms_at_8": 250.0,
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows for CI (the table keeps every row)")
    p.add_argument("--out", type=output_folder, default=None, help="results folder (default results/benchmark/<time>)")
    p.add_argument("--concurrency", type=positive_ints, default="1,8,32", help="comma-separated client counts")
    p.add_argument("--window-s", type=bounded(float, 0, low_open=True), default=None, help="measured seconds per point (default 20, quick 2)")
    p.add_argument("--warmup-s", type=bounded(float, 0), default=None, help="unmeasured seconds before each window (default 3, quick 0.5)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help="which rows to measure")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="also measure the service with these settings, as row 'service (NAME)', e.g. "
                        "one-worker=PNEUMONIA_WORKERS=1 (A/B in the same run)")
    p.add_argument("--peer-workers", type=bounded(int, 0), default=0,
                   help="uvicorn workers of the competent peers (0: one per usable core; --quick: 1)")
    p.add_argument("--sequential", action="store_true",
                   help="measure one system after the other, each server stopped before the next starts (default: "
                        "all servers up, the systems interleaved at each client count)")
    p.add_argument("--rotate", type=int, default=0, help="interleaved order's starting offset (--repeat adds the run index)")
    p.add_argument("--repeat", type=bounded(int, 1), default=1, help="run the whole benchmark this many times and report the spread")
    p.add_argument("--results", type=output_folder, default=None,
                   help="with --repeat: also copy each run's JSON and the spread here (e.g. docs/results)")
    p.add_argument("--name", type=file_stem, default="benchmark", help="file name stem of the copies in --results")
    p.add_argument("--explain-classify-clients", type=bounded(int, 1), default=8,
                   help="classify clients measured with and without the explain burst")
    p.add_argument("--explain-burst", type=bounded(int, 1), default=8, help="clients explaining back to back beside them")
    p.add_argument("--batch-sizes", type=positive_ints, default=None, help="bare-model batch sizes (default 1,4,8,16,32,64; quick 1,8,32)")
    p.add_argument("--service-env", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for both service rows, e.g. PNEUMONIA_WORKERS=2 (for ablations)")
    p.add_argument("--model", default="production", help="model reference served by every row")
    p.add_argument("--threads", type=bounded(int, 0), default=0, help="torch threads of the bare-model measurement (0: all cores)")
    p.add_argument("--max-other-load", type=bounded(float, 0, low_open=True), default=0.25,
                   help="before each point, wait until other processes use fewer cores than this (shared machines)")
    p.add_argument("--quiet-timeout-s", type=bounded(float, 0), default=None,
                   help="longest such wait (default 600; quick 0: a smoke run only reads the other load, since "
                        "beside a test suite the machine is never quiet and waiting measured nothing)")
    return p


# ---------------------------------------------------------------- bare model


def bare_model(tag: str, images: list[bytes], batch_sizes: list[int], seconds: float, threads: int, engine: str) -> dict:
    """Images/s of prepare() + forward pass in this process, per batch size, serial and overlapped.

    Uses the service's inference engine (PNEUMONIA_ENGINE), so the limit is the best the service could do.
    """
    import torch

    from models_registry import load_model
    from core.preprocess import InputLimits, prepare

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model = load_model(tag, engine=engine)
    config, limits = model.card.preprocess, InputLimits()

    def prep(datas: list[bytes]) -> np.ndarray:
        return np.stack([prepare(d, config, limits).pixels for d in datas])

    def batches(size: int):
        k = 0
        while True:
            yield [images[(k * size + j) % len(images)] for j in range(size)]
            k += 1

    rows = []
    for size in batch_sizes:
        model.probabilities(prep(next(batches(size))))  # warm-up: kernels for this shape
        for mode in ("serial", "overlapped"):
            source = batches(size)
            count, prep_s, start, cpu0, busy0 = 0, 0.0, time.perf_counter(), time.process_time(), system_busy_s()
            if mode == "serial":
                while time.perf_counter() - start < seconds or count < 2 * size:
                    t0 = time.perf_counter()
                    pixels = prep(next(source))
                    prep_s += time.perf_counter() - t0
                    model.probabilities(pixels)
                    count += size
            else:  # decode the next batch in a thread while the forward pass runs (PIL releases the GIL)
                with ThreadPoolExecutor(1) as pool:
                    pending = pool.submit(prep, next(source))
                    while time.perf_counter() - start < seconds or count < 2 * size:
                        pixels = pending.result()
                        pending = pool.submit(prep, next(source))
                        model.probabilities(pixels)
                        count += size
                    pending.result()
            elapsed, own = time.perf_counter() - start, time.process_time() - cpu0
            rows.append({
                "batch": size, "mode": mode, "images": count,
                "images_per_s": round(count / elapsed, 1),
                "cpu_cores": round(own / elapsed, 2),
                "other_cpu_cores": round(max(0.0, system_busy_s() - busy0 - own) / elapsed, 2),
                **({"preprocess_ms_per_image": round(1000 * prep_s / count, 2)} if mode == "serial" else {}),
            })
            print(f"  bare model, batch {size:>3}, {mode:<10}: {rows[-1]['images_per_s']:7.1f} images/s", file=sys.stderr)
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"rows": rows, "limit_images_per_s": best["images_per_s"], "best": best, "torch_threads": torch.get_num_threads(),
            "engine": engine}


# ---------------------------------------------------------------- servers


def label(system: str) -> str:
    """The row label of a system; service variants are `variant:NAME`."""
    return f"service ({system.split(':', 1)[1]})" if system.startswith("variant:") else SYSTEMS[system]


def service_engine(service_env: dict[str, str]) -> str:
    """The inference engine of the service rows: they run with this process's environment plus --service-env."""
    from settings import ServingSettings

    return {**os.environ, **service_env}.get("PNEUMONIA_ENGINE") or ServingSettings.model_fields["engine"].default


def start_system(system: str, tag: str, out: Path, service_env: dict[str, str], peer_workers: int = 1,
                 variants: dict[str, dict[str, str]] | None = None) -> ServerProcess:
    port = free_port()
    log = out / f"{system.replace(':', '-')}.log"
    if system == "baseline":
        args = [str(VENV_BIN / "uvicorn"), "loadtests.baseline_fastapi:app", "--host", "127.0.0.1", "--port", str(port)]
        server = ServerProcess(args=args, port=port, env=server_env(PNEUMONIA_BASELINE_MODEL=tag), log_path=log)
        return server.start(ready_path="/openapi.json")
    if system in PEERS:
        args = [str(VENV_BIN / "uvicorn"), "loadtests.peer_fastapi:app", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(peer_workers)]
        engine = "eager" if system == "peer" else service_engine(service_env)
        env = server_env(PNEUMONIA_PEER_MODEL=tag, PNEUMONIA_PEER_ENGINE=engine)
        server = ServerProcess(args=args, port=port, env=env, log_path=log, warm_workers=peer_workers,
                               warm_pattern=r"peer worker (\d+) ready")
        return server.start(ready_path="/openapi.json")
    # The gRPC endpoint (not measured here) gets a free loopback port from bentoml_serve, never the fixed default.
    env = {"PNEUMONIA_MODEL": tag, **service_env}
    if system == "service_nobatch":
        env["PNEUMONIA_BATCHING__ENABLED"] = "false"
    if system.startswith("variant:"):
        env.update((variants or {})[system.split(":", 1)[1]])
    return bentoml_serve("service:PneumoniaClassifier", port, log, **env).start()


def start_all(systems: list[str], tag: str, out: Path, service_env: dict[str, str], peer_workers: int = 1,
              variants: dict[str, dict[str, str]] | None = None) -> dict[str, ServerProcess]:
    """Start the systems concurrently; if any fails, the others are stopped and the error raised."""
    with ThreadPoolExecutor(len(systems)) as pool:
        futures = {system: pool.submit(start_system, system, tag, out, service_env, peer_workers, variants)
                   for system in systems}
        try:
            wait(futures.values())
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): stop each server once its start has returned
            for future in futures.values():
                with contextlib.suppress(Exception):
                    future.result().stop()
            raise
    servers, errors = {}, []
    for system, future in futures.items():
        try:
            servers[system] = future.result()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are stopped
            errors.append(exc)
    if errors:
        for server in servers.values():
            server.stop()
        raise errors[0]
    return servers


# ---------------------------------------------------------------- explain: its cost, and classify beside a burst


EXPLAIN_ROWS = {
    "explain_alone": "explain alone, 1 client",
    "classify_alone": "classify alone",
    "classify_beside_burst": "classify beside the explain burst",
    "explain_burst": "explain burst beside classify",
}


def measure_explain(server: ServerProcess, classify: list, explain: list, classify_clients: int, burst: int,
                    warmup: float, window: float, probe) -> dict:
    """The explain rows on a running service (see the module docstring); every answer checked."""
    server.wait_for_explainers()
    run_load(server.url, explain, clients=1, warmup_s=0.0, window_s=max(1.0, warmup))  # first-call costs
    rows = {}
    rows["explain_alone"] = run_load(server.url, explain, 1, warmup, window, cpu_probe=probe).summary()
    rows["classify_alone"] = run_load(server.url, classify, classify_clients, warmup, window, cpu_probe=probe).summary()
    beside, burst_result = run_mixed(server.url, [(classify, classify_clients), (explain, burst)], warmup, window,
                                     cpu_probe=probe)
    rows["classify_beside_burst"], rows["explain_burst"] = beside.summary(), burst_result.summary()
    for name, row in rows.items():
        print(f"  {EXPLAIN_ROWS[name]:<36} {row['clients']:>3} clients: {row['requests_per_s']:6.1f} answered/s, "
              f"p50 {row['p50_ms']:6.0f} ms, p95 {row['p95_ms']:6.0f} ms, {row['busy']} busy, {row['failures']} failures",
              file=sys.stderr)
    alone, beside_row = rows["classify_alone"], rows["classify_beside_burst"]
    return {
        "classify_clients": classify_clients, "burst_clients": burst, "rows": rows,
        "classify_images_per_s_ratio": round(beside_row["images_per_s"] / max(alone["images_per_s"], 1e-9), 2),
        "classify_p95_ratio": round(beside_row["p95_ms"] / max(alone["p95_ms"], 1e-9), 2),
    }


def format_explain_table(explain: dict) -> str:
    lines = [
        f"Explain: its cost, and classify at {explain['classify_clients']} clients with and without "
        f"{explain['burst_clients']} clients explaining back to back beside it",
        "",
        "| row | clients | answered/s | images/s | p50 ms | p95 ms | p99 ms | turned away (503) | failures "
        "| server CPU (cores) | other load (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in EXPLAIN_ROWS.items():
        r = explain["rows"][name]
        cpu = "-" if r["server_cpu_cores"] is None else f"{r['server_cpu_cores']:.2f}"
        lines.append(f"| {label} | {r['clients']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} "
                     f"| {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['busy']} | {r['failures']} | {cpu} | {r['other_cpu_cores']:.2f} |")
    lines += ["", f"classify beside the burst / alone: images/s x{explain['classify_images_per_s_ratio']}, "
              f"p95 x{explain['classify_p95_ratio']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- report


def _at(runs: list[dict], system: str, clients: int) -> dict | None:
    return next((r for r in runs if r["system"] == system and r["clients"] == clients), None)


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["images_per_s"] / max(b["images_per_s"], 1e-9), 2) if a and b else None


def ratios_and_targets(bare: dict | None, runs: list[dict], concurrency: list[int], cores: int) -> tuple[dict, dict]:
    """The ratios the targets are stated in (at the highest client count unless named), per-client-count ratios
    (service / each peer, batching on / off, service CPU) and the targets with whether each is met."""
    top = max(concurrency)  # the option keeps the order it was given in, e.g. 32,8,1
    service = _at(runs, "service", top)
    at8 = _at(runs, "service", 8)
    ratios: dict[str, float | None] = {
        "service_vs_peer": _ratio(service, _at(runs, "peer", top)),
        "batching_vs_nobatch": _ratio(service, _at(runs, "service_nobatch", top)),
        "service_cores_busy_at_8": at8 and at8["server_cpu_cores"] is not None and round(at8["server_cpu_cores"] / cores, 2),
        "service_vs_bare_model": service and bare and round(service["images_per_s"] / bare["limit_images_per_s"], 2),
        "service_vs_baseline": _ratio(service, _at(runs, "baseline", top)),
        "service_p99_ms_at_8": (at8 or {}).get("p99_ms"),
    }
    for clients in concurrency:
        service_c = _at(runs, "service", clients)
        ratios[f"service_vs_peer_at_{clients}"] = _ratio(service_c, _at(runs, "peer", clients))
        ratios[f"service_vs_peer_engine_at_{clients}"] = _ratio(service_c, _at(runs, "peer_engine", clients))
        ratios[f"service_vs_baseline_at_{clients}"] = _ratio(service_c, _at(runs, "baseline", clients))
        ratios[f"batching_vs_nobatch_at_{clients}"] = _ratio(service_c, _at(runs, "service_nobatch", clients))
        ratios[f"service_cpu_cores_at_{clients}"] = service_c and service_c["server_cpu_cores"]
    targets = {}
    for name, goal in TARGETS.items():
        value = ratios.get(name)
        if value is None or value is False:
            continue
        met = value <= goal if name.endswith("_ms_at_8") else value >= goal
        targets[name] = {"value": value, "target": goal, "met": bool(met)}
    failures = sum(r["failures"] for r in runs if r["clients"] == top)
    targets["zero_failures_at_top"] = {"value": failures, "target": 0, "met": failures == 0}
    return ratios, targets


def target_names(top: int) -> dict[str, str]:
    return {
        "service_vs_peer": f"service / competent peer, images/s at {top} clients",
        "batching_vs_nobatch": f"batching / batching off, images/s at {top} clients",
        "service_cores_busy_at_8": "service CPU at 8 clients / cores",
        "service_vs_bare_model": f"service / bare-model limit, images/s at {top} clients",
        "service_vs_baseline": f"service / naive peer, images/s at {top} clients",
        "service_p99_ms_at_8": "service p99 at 8 clients (ms)",
        "zero_failures_at_top": f"failures at {top} clients",
    }


RATIO_ROWS = {  # the summary's per-client-count ratios: key prefix -> label
    "service_vs_peer_at_": "service / competent peer (images/s)",
    "service_vs_peer_engine_at_": "service / competent peer with the service's engine (images/s)",
    "service_vs_baseline_at_": "service / naive peer (images/s)",
    "batching_vs_nobatch_at_": "batching on / off (images/s)",
    "service_cpu_cores_at_": "service CPU (cores)",
}


def format_table(result: dict) -> str:
    lines = [
        "| system | clients | req/s | images/s | p50 ms | p95 ms | p99 ms | failures | server CPU (cores) "
        "| generator CPU (cores) | other load (cores) | full-size p50 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    bare = result.get("bare_model")
    if bare:
        best = bare["best"]
        lines.append(
            f"| bare model limit (batch {best['batch']}, {best['mode']}, {bare.get('engine', 'eager')}, no HTTP) | - | - | {best['images_per_s']:.1f} "
            f"| - | - | - | - | {best['cpu_cores']:.2f} | - | {best.get('other_cpu_cores', 0):.2f} | - |"
        )
    for r in result["runs"]:
        cpu = "-" if r["server_cpu_cores"] is None else f"{r['server_cpu_cores']:.2f}"
        full = (r.get("by_kind") or {}).get("full")
        full_p50 = "-" if full is None else f"{full['p50_ms']:.0f}"
        lines.append(
            f"| {label(r['system'])} | {r['clients']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['failures']} | {cpu} | {r['client_cpu_cores']:.2f} "
            f"| {r['other_cpu_cores']:.2f} | {full_p50} |"
        )
    lines += ["", format_ratios(result)]
    top = max(result["concurrency"])
    names = target_names(top)
    lines += ["", "| measure | value | target | met |", "| --- | ---: | ---: | --- |"]
    for name, t in result["targets"].items():
        sign = "<=" if name in ("service_p99_ms_at_8", "zero_failures_at_top") else ">="
        lines.append(f"| {names[name]} | {t['value']} | {sign} {t['target']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def format_ratios(result: dict) -> str:
    concurrency = result["concurrency"]
    lines = ["| ratio | " + " | ".join(f"{c} clients" for c in concurrency) + " |",
             "| --- |" + " ---: |" * len(concurrency)]
    for prefix, name in RATIO_ROWS.items():
        values = [result["ratios"].get(f"{prefix}{c}") for c in concurrency]
        if any(v is not None for v in values):
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v}" for v in values) + " |")
    return "\n".join(lines)


STYLES = {"service": ("#1f77b4", "o", "-"), "service_nobatch": ("#ff7f0e", "s", "-"), "peer": ("#d62728", "D", "-"),
          "peer_engine": ("#d62728", "d", "--"), "baseline": ("#7f7f7f", "^", "-")}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = list(dict.fromkeys(r["system"] for r in result["runs"]))
    for i, system in enumerate(systems):
        rows = [r for r in result["runs"] if r["system"] == system]
        colour, marker, line = STYLES.get(system, (f"C{4 + i % 6}", "x", ":"))
        xs = [r["clients"] for r in rows]
        left.plot(xs, [r["images_per_s"] for r in rows], marker=marker, linestyle=line, color=colour, label=label(system))
        right.plot(xs, [r["p95_ms"] for r in rows], marker=marker, linestyle=line, color=colour, label=label(system))
    if result.get("bare_model"):
        left.axhline(result["bare_model"]["limit_images_per_s"], color="#2ca02c", linestyle="--", label="bare-model limit (no HTTP)")
    for ax, title, unit in ((left, "Throughput", "images / s"), (right, "Latency, 95th percentile", "ms (log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["concurrency"], [str(c) for c in result["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7, loc="upper left")
    machine = result["machine"]
    fig.suptitle(f"Pneumonia X-ray serving on {machine['cores']} cores ({machine['cpu']}), mix: {result['mix_text']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------- main


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when the working tree differs from it (what was measured)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"bare", "explain", *SYSTEMS}
    if not systems:  # it measured nothing, printed an empty table and claimed a plot (a helper's find)
        print(f"--systems names no system; choose from bare,{','.join(SYSTEMS)},explain", file=sys.stderr)
        return 2
    if unknown:
        print(f"unknown systems {sorted(unknown)}; choose from bare,{','.join(SYSTEMS)},explain", file=sys.stderr)
        return 2
    try:
        named = [(name, dict(item.split("=", 1) for item in settings.split(",")))
                 for name, settings in (v.split("=", 1) for v in args.variant)]
    except ValueError:
        print("--variant takes NAME=KEY=VALUE[,KEY=VALUE...]", file=sys.stderr)
        return 2
    variants = dict(named)
    if len(variants) < len(named):  # the last of a name replaced the others without a word
        twice = sorted(name for name, count in collections.Counter(name for name, _ in named).items() if count > 1)
        print(f"--variant names {', '.join(twice)} more than once; give each variant its own name", file=sys.stderr)
        return 2
    command = "python -m loadtests.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or RESULTS / "benchmark" / time.strftime("%Y%m%d-%H%M%S")
    if args.repeat <= 1:
        result = run_once(args, systems, variants, out, command)
        print(result["table"])
        written = ", ".join(name for name in ("benchmark.json", "benchmark.md", "benchmark.png") if (out / name).exists())
        print(f"\nwrote {out}/: {written}")
        return 0
    from loadtests import spread

    paths = []
    for k in range(1, args.repeat + 1):
        print(f"=== run {k} of {args.repeat} ===", file=sys.stderr)
        args.rotate = k - 1
        run_once(args, systems, variants, out / f"run-{k}", command)
        paths.append(out / f"run-{k}" / "benchmark.json")
    summary = spread.summarise(paths)
    spread.write(summary, out, "benchmark", paths)
    if args.results:
        spread.write(summary, args.results, args.name, paths)
    print(spread.format_spread(summary))
    print(f"\nwrote {out}/run-1 ... run-{args.repeat} and {out}/benchmark-spread.json, benchmark-spread.md"
          + (f"; copies in {args.results}" if args.results else ""))
    return 0


def run_once(args: argparse.Namespace, systems: list[str], variants: dict[str, dict[str, str]], out: Path,
             command: str) -> dict:
    """One full measurement into `out` (benchmark.json, .md, .png); returns the result with its table."""
    window = args.window_s or (2.0 if args.quick else 20.0)
    warmup = args.warmup_s if args.warmup_s is not None else (0.5 if args.quick else 3.0)
    batch_sizes = args.batch_sizes or ([1, 8, 32] if args.quick else [1, 4, 8, 16, 32, 64])
    concurrency = args.concurrency
    service_env = dict(args.service_env)
    if args.quick:  # a smoke run checks behaviour: one worker per service starts faster on a small CI machine
        service_env.setdefault("PNEUMONIA_WORKERS", "1")
    service_workers = _expected_workers(service_env)
    peer_workers = args.peer_workers or (1 if args.quick else usable_cores())
    out.mkdir(parents=True, exist_ok=True)
    # A reused --out held the last run's results: a run interrupted before writing its own left them beside its
    # logs as if they were this run's (a helper's find), as run_locust's reports once did.
    for earlier in ("benchmark.json", "benchmark.md", "benchmark.png"):
        (out / earlier).unlink(missing_ok=True)

    from models_registry import resolve_tag
    from models_registry.default import ensure_default

    print(ensure_default(), file=sys.stderr)
    tag = resolve_tag(args.model)
    samples = build_samples()
    plan = request_plan(samples, 240 if args.quick else 600, seed=0)
    images_per_request = sum(len(p.images) for p in plan) / len(plan)
    mix_text = ", ".join(f"{k} {MIX_WEIGHTS[k]}" for k in IMAGE_KINDS) + f" (multi = {MULTI_COUNT} images)"
    print(f"model {tag}; samples: {samples.describe()}; request mix {mix_text}", file=sys.stderr)

    result: dict = {
        "command": command,
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cores": os.cpu_count(), "usable_cores": usable_cores(), "cpu": cpu_name(),
                    "python": platform.python_version()},
        "model": tag,
        "samples": samples.describe(),
        "mix": {k: MIX_WEIGHTS[k] for k in IMAGE_KINDS}, "mix_text": mix_text,
        "images_per_request": round(images_per_request, 3),
        "generator": "harness.loadgen: closed-loop asyncio HTTP/1.1 client, one keep-alive connection per client, "
                     "pre-encoded multipart bodies, every answer checked",
        "concurrency": concurrency, "window_s": window, "warmup_s": warmup, "service_env": service_env,
        "service_engine": service_engine(service_env),
        "service_workers": service_workers, "peer_workers": peer_workers, "variants": variants,
        "bare_model": None, "runs": [], "explain": None,
    }
    quiet_timeout = args.quiet_timeout_s if args.quiet_timeout_s is not None else (0.0 if args.quick else 600.0)

    def quiet() -> float:
        """The other processes' load, after waiting (up to the timeout) for it to drop; a short reading when not waiting."""
        return wait_for_quiet(args.max_other_load, quiet_timeout, sample_s=1.0 if quiet_timeout else 0.2)

    if "bare" in systems:
        print("measuring the bare-model limit ...", file=sys.stderr)
        quiet()
        stream = [image.data for request in plan for image in request.images]
        result["bare_model"] = bare_model(tag, stream, batch_sizes, 1.0 if args.quick else 4.0, args.threads,
                                          service_engine(service_env))

    order = [s for s in SYSTEMS if s in systems]
    if "explain" in systems and "service" not in order:  # explain is measured on the shipped service
        order.insert(0, "service")
    after = order.index("service") + 1 if "service" in order else 0  # variants next to the shipped service
    order[after:after] = [f"variant:{name}" for name in variants]
    service_rows = "service" in systems
    explain_requests = explain_plan(samples, 60 if args.quick else 200)
    result["order"] = "sequential" if args.sequential else "interleaved"
    started: dict[str, ServerProcess] = {}
    requests: dict[str, list] = {}
    probes: dict = {}

    def ready(system: str) -> ServerProcess:
        """The system's server, started (and its first-request costs paid) if it is not yet."""
        if system not in started:
            print(f"starting {label(system)} ...", file=sys.stderr)
            started[system] = start_system(system, tag, out, service_env, peer_workers, variants)
        server = started[system]
        if system not in requests:
            requests[system] = encode_requests(plan, server.url)
            probes[system] = tree_cpu_probe(server.process.pid)
            run_load(server.url, requests[system], clients=2, warmup_s=0.0, window_s=max(1.0, warmup))
        return server

    def measure(system: str, clients: int) -> None:
        server = started[system]
        other_before = quiet()
        load = run_load(server.url, requests[system], clients, warmup, window, cpu_probe=probes[system])
        row = {"system": system, **load.summary(), "other_cpu_cores_before": other_before}
        result["runs"].append(row)
        full = row["by_kind"].get("full", {}).get("p50_ms", float("nan"))
        print(f"  {label(system):<44} {clients:>3} clients: {row['images_per_s']:7.1f} images/s, "
              f"p99 {row['p99_ms']:7.0f} ms, full-size p50 {full:5.0f} ms, CPU {row['server_cpu_cores']} "
              f"cores, {row['failures']} failures", file=sys.stderr)

    def explain(system: str) -> None:
        if system == "service" and "explain" in systems:
            print("measuring explain on the service ...", file=sys.stderr)
            quiet()
            server = started[system]
            result["explain"] = measure_explain(
                server, requests[system], encode_requests(explain_requests, server.url, path="/explain"),
                args.explain_classify_clients, args.explain_burst, warmup, window, probes[system])

    measured = [s for s in order if s != "service" or service_rows]
    try:
        if (args.quick or not args.sequential) and order:  # every server up at once
            print(f"starting {', '.join(label(s) for s in order)} ...", file=sys.stderr)
            if args.quick:  # CI smoke: start-ups dominate a short run, so start them concurrently
                started.update(start_all(order, tag, out, service_env, peer_workers, variants))
        if args.sequential:  # one system after the other, each stopped before the next starts
            for system in order:
                try:
                    ready(system)
                    for clients in concurrency if system in measured else ():
                        measure(system, clients)
                    explain(system)
                finally:  # before the next system is measured: an idle server holds memory
                    if (server := started.pop(system, None)) is not None:  # None: its start failed, or was interrupted
                        server.stop()
        else:
            # Interleaved: every point of every system at one client count before the next, in an order that
            # rotates between client counts (and runs), so a slower or faster spell of a shared machine falls on
            # all systems alike instead of on whichever was measured then.
            for system in order:
                ready(system)
            for level, clients in enumerate(concurrency):
                shift = (level + args.rotate) % max(1, len(measured))
                for system in measured[shift:] + measured[:shift]:
                    measure(system, clients)
            for system in order:
                explain(system)
    finally:
        for server in started.values():
            server.stop()
    result["runs"].sort(key=lambda r: (order.index(r["system"]), r["clients"]))

    result["ratios"], result["targets"] = ratios_and_targets(result["bare_model"], result["runs"], concurrency,
                                                             result["machine"]["usable_cores"])
    table = format_table(result)
    if result["explain"]:
        table += "\n\n" + format_explain_table(result["explain"])
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    (out / "benchmark.md").write_text(f"`{result['command']}`\n\n{table}\n")
    if result["runs"]:
        plot(result, out / "benchmark.png")
    return {**result, "table": table}


if __name__ == "__main__":
    exit_with(main)
