"""How long `bentoml serve` takes from launch to ready, and the CPU it spends getting there.

    python -m loadtests.startup [--runs 3] [--workers 2] [--json results/startup.json]

A replica's cold start is what a scale-out waits for (the Kubernetes start-up probe,
a replacement after a crash) and what every server in the test suite pays. Each run
starts the service on free loopback ports, waits until every worker has a warm model
(/readyz), reads the CPU time of the whole process tree (the serving process checks
the model once, then each worker loads, compiles (ONNX export or TorchScript trace) and
warms it), and stops it. Prints
the median and spread of the runs: a 2-core VM moves by 10-20 % from one run to the next.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.cli import output_file
from harness import record
from harness.paths import RESULTS
from harness.processes import tree_cpu_probe
from harness.servers import exit_with, model_store, start_server
from loadtests.spread import stats, text


def one_start(workers: int, logs: Path, run: int) -> dict[str, float]:
    """Seconds from launch to ready and the CPU seconds the server's process tree spent on it."""
    launched = time.monotonic()
    server = start_server(logs / f"startup-{run}.log", PNEUMONIA_WORKERS=str(workers))
    try:
        ready_s = time.monotonic() - launched
        assert server.process is not None
        cpu_s = tree_cpu_probe(server.process.pid)()
        return {"ready_s": round(ready_s, 2), "cpu_s": round(cpu_s or 0.0, 2)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="starts to measure, one after another")
    parser.add_argument("--workers", type=int, default=2, help="PNEUMONIA_WORKERS of the started service")
    parser.add_argument("--json", type=output_file, help="also write the runs and their medians here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.workers < 1:
        parser.error("--runs and --workers must be at least 1")
    result = record.provenance(argv)
    # Kept (results/ is git-ignored): a start that fails names its log, which a temporary folder had already removed.
    logs = RESULTS / "startup" / time.strftime("%Y%m%d-%H%M%S")
    with model_store():
        runs = []
        for run in range(1, args.runs + 1):
            runs.append(one_start(args.workers, logs, run))
            print(f"run {run}: ready after {runs[-1]['ready_s']:.1f} s, {runs[-1]['cpu_s']:.1f} s of CPU", flush=True)
    ready, cpu = stats([r["ready_s"] for r in runs]), stats([r["cpu_s"] for r in runs])
    print(f"{args.workers} worker(s), {args.runs} run(s), median (min-max): ready after {text(ready)} s, "
          f"CPU to ready {text(cpu)} s")
    if args.json:
        record.write(args.json, record.finished({**result, "workers": args.workers, "runs": runs,
                                                 "ready_s": ready, "cpu_s": cpu}))
    return 0


if __name__ == "__main__":
    exit_with(main)
