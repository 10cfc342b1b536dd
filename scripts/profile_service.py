"""Where a serving worker's time goes under load: py-spy on every worker while the benchmark's mix runs.

    python scripts/profile_service.py --clients 8 --seconds 20                     # the shipped service
    python scripts/profile_service.py --clients 32 --env PNEUMONIA_BATCHING__ENABLED=false
    python scripts/profile_service.py --system peer --clients 32                   # the competent peer

Starts the system on free loopback ports, drives it with `harness.loadgen`
(the benchmark's request mix, closed loop), records each worker with
`py-spy record --threads --format raw` for the window (py-spy keeps only the
samples in which a thread was running, not waiting), stops everything, and
prints per worker and thread the share of the window it was busy and the
frames that took those samples (self and inclusive). Raw stacks
(flamegraph-ready, `inferno-flamegraph` or speedscope) go to --out.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.cli import bounded, key_value, output_folder
from harness.loadgen import encode_requests, run_load
from harness.paths import RESULTS, VENV_BIN
from harness.payloads import build_samples, request_plan
from harness.processes import tree_cpu_probe, worker_pids
from harness.servers import ServerProcess, bentoml_serve, exit_with, free_port, server_env

# Inclusive frames worth naming: (label, regex on "function (file:line)" frames).
MARKERS = (  # frames look like "Class.method (package/module.py:line)"
    ("prepare (decode+resize)", r"^prepare \(core/preprocess"),
    ("  JPEG decode", r"^ImageFile\.load \(PIL/"),
    ("  resize", r"^Image\.resize \(PIL/"),
    ("forward pass (model.assess)", r"^LoadedModel\.assess \(core/inference"),
    ("  to_tensor", r"^to_tensor \(core/preprocess"),
    ("answer() per image", r"^answer \(serving/answers"),
    ("guard: body + multipart canon", r"^read_body \(serving/http/body"),
    ("guard: decode hand-off", r"^Predecoder\.run \(serving/http/decoding"),
    ("bentoml: parse request", r"^IOMixin\.from_http_request"),
    ("bentoml: write response", r"^IOMixin\.to_http_response"),
    ("bentoml: API caller (inspect.signature)", r"^APIMethod\.__get__"),
    ("dispatcher", r"Dispatcher\.(controller|outbound_call)"),
    ("OpenTelemetry middleware", r"^OpenTelemetryMiddleware"),
    ("request log", r"^log_request \(serving/request_log"),
    ("request id", r"^request_id \(serving/request_log"),
    ("h11 (HTTP parsing)", r"h11_impl"),
)


def parse_raw(path: Path) -> dict[str, dict]:
    """py-spy raw output -> {thread: {"busy": samples, "self": Counter, "inclusive": Counter}}."""
    threads: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        body = [f for f in frames if not f.startswith(("process ", "thread "))]
        entry = threads.setdefault(thread, {"busy": 0, "self": collections.Counter(),
                                            "inclusive": collections.Counter()})
        n = int(count)
        entry["busy"] += n
        if not body:
            continue
        entry["self"][_short(body[-1])] += n
        for label in {label for label, pattern in MARKERS for frame in body if re.search(pattern, _short(frame))}:
            entry["inclusive"][label] += n
    return threads


def _short(frame: str) -> str:
    return re.sub(r"/[^ ]*/(site-packages|wt-[^/]+|main|lib/python3\.\d+)/", "", frame)


def report(name: str, threads: dict[str, dict], seconds: float, rate: int) -> str:
    lines = [f"== {name}"]
    for thread, e in sorted(threads.items(), key=lambda kv: -kv[1]["busy"]):
        if e["busy"] == 0:
            continue
        lines.append(f"  {thread}: busy {e['busy'] / (seconds * rate):.0%} of the window ({e['busy']} samples)")
        if e["busy"] < 0.02 * seconds * rate:
            continue
        for label, n in sorted(e["inclusive"].items(), key=lambda kv: -kv[1]):
            lines.append(f"      {n / e['busy']:6.1%}  {label}")
        lines.append("      top self frames:")
        for frame, n in e["self"].most_common(8):
            lines.append(f"      {n / e['busy']:6.1%}  {frame[:140]}")
    return "\n".join(lines)


def start(system: str, env: dict[str, str], out: Path, workers: int) -> ServerProcess:
    port = free_port()
    if system == "service":
        return bentoml_serve("service:PneumoniaClassifier", port, out / "server.log", **env).start()
    args = [str(VENV_BIN / "uvicorn"), "loadtests.peer_fastapi:app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]
    server = ServerProcess(args=args, port=port, env=server_env(**env), log_path=out / "server.log",
                           warm_workers=workers, warm_pattern=r"peer worker (\d+) ready")
    return server.start(ready_path="/openapi.json")


def peer_pids(serve_pid: int) -> list[int]:
    import psutil

    children = psutil.Process(serve_pid).children(recursive=True)
    pids = [c.pid for c in children if "multiprocessing" in " ".join(c.cmdline()) and "spawn_main" in " ".join(c.cmdline())]
    return pids or [serve_pid]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=("service", "peer"), default="service")
    p.add_argument("--clients", type=bounded(int, 1), default=8)
    p.add_argument("--seconds", type=bounded(float, 0, 24 * 3600, low_open=True), default=20.0)
    p.add_argument("--rate", type=bounded(int, 1, 10_000), default=100, help="py-spy samples per second")
    p.add_argument("--env", type=key_value, action="append", default=[], metavar="KEY=VALUE", help="server environment")
    p.add_argument("--workers", type=bounded(int, 0, 64), default=0, help="peer workers (0: one per usable core)")
    p.add_argument("--out", type=output_folder, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from models_registry.default import ensure_default
    from settings import usable_cores

    print(ensure_default(), file=sys.stderr)
    out = args.out or RESULTS / "profile" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(args.env)
    workers = args.workers or usable_cores()
    server = start(args.system, env, out, workers)
    recorders: list[tuple[int, Path, subprocess.Popen]] = []
    try:
        pids = worker_pids(server.process.pid) if args.system == "service" else peer_pids(server.process.pid)
        requests = encode_requests(request_plan(build_samples(), 600, seed=0), server.url)
        run_load(server.url, requests, clients=2, warmup_s=0.0, window_s=2.0)  # first-request costs
        for pid in pids:
            raw = out / f"worker-{pid}.txt"
            recorders.append((pid, raw, subprocess.Popen(
                [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--threads", "--format", "raw",
                 "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--output", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        result: dict = {}
        # A daemon: after an interrupt the process must not wait out the load window against a stopped server.
        loader = threading.Thread(daemon=True, target=lambda: result.update(load=run_load(
            server.url, requests, args.clients, 1.0, args.seconds, cpu_probe=tree_cpu_probe(server.process.pid))))
        loader.start()
        for _, _, recorder in recorders:
            recorder.wait(timeout=args.seconds + 60)
        loader.join()
    finally:
        for _, _, recorder in recorders:  # interrupted: py-spy would otherwise record on until its duration
            if recorder.poll() is None:
                recorder.terminate()
        server.stop()
    summary = result["load"].summary()
    text = [f"{args.system} {env or ''} at {args.clients} clients: {summary['images_per_s']} images/s, "
            f"p50 {summary['p50_ms']} ms, server CPU {summary['server_cpu_cores']} cores, "
            f"other load {summary['other_cpu_cores']} cores, {summary['failures']} failures"]
    for pid, raw, recorder in recorders:
        if raw.exists():
            text.append(report(f"worker {pid}", parse_raw(raw), args.seconds, args.rate))
        else:
            text.append(f"== worker {pid}: py-spy wrote nothing ({recorder.stderr.read().decode()[-300:]})")
    (out / "profile.txt").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"\nraw stacks and this report in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_with(main)
