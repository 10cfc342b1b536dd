"""SIGKILL one worker of a live service under load; print what clients saw and how long recovery took.

    python scripts/fault_worker_kill.py                  # 2 workers, 4 closed-loop clients
    python scripts/fault_worker_kill.py --workers 1      # one worker: callers wait for its replacement
    python scripts/fault_worker_kill.py --repeat 3       # three kills, one after the other

It starts `bentoml serve` on free 127.0.0.1 ports (a temporary model store with
the shipped model unless BENTOML_HOME is set), waits until every worker's model
is warm, runs the load, kills a worker, and measures: failed requests, the time
until circus started a replacement, the time until that replacement's model was
warm, and the longest stretch in which no request succeeded. The figures are
printed and written to results/faults/worker-kill-*.json. Exit 1 when a bound of
tests/test_faults.py is broken (failures > clients, or no recovery in time).
"""

from __future__ import annotations

import argparse
import time

from core.cli import bounded, output_folder
from harness import record
from harness.faults import worker_kill_experiment, write_json
from harness.paths import RESULTS
from harness.payloads import xray_payloads
from harness.processes import wait_until_workers_warm
from harness.servers import exit_with, kill_group, model_store, start_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=bounded(int, 1, 64), default=2, help="PNEUMONIA_WORKERS of the server (default 2)")
    parser.add_argument("--clients", type=bounded(int, 1, 256), default=4, help="closed-loop clients, one image per request")
    parser.add_argument("--repeat", type=bounded(int, 1, 100), default=1, help="kills, one after the other (same server)")
    parser.add_argument("--warm-s", type=bounded(float, 0, 3600), default=5.0, help="seconds of load before the kill")
    parser.add_argument("--recover-timeout-s", type=bounded(float, 1, 3600), default=120.0)
    parser.add_argument("--out", type=output_folder, default=RESULTS / "faults")
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    provenance = record.provenance(argv)
    results = []
    with model_store():
        server = start_server(args.out / f"worker-kill-{stamp}.log", PNEUMONIA_WORKERS=str(args.workers))
        try:
            for _ in range(args.repeat):
                wait_until_workers_warm(server, args.workers)
                result = worker_kill_experiment(
                    server, xray_payloads(16), workers=args.workers, clients=args.clients,
                    warm_s=args.warm_s, recover_timeout_s=args.recover_timeout_s, probe_replacement=True,
                )
                results.append(result.as_dict())
                print(format_result(result.as_dict()))
        finally:
            server.stop()
            kill_group(server)
    path = write_json(args.out / f"worker-kill-{stamp}.json", {**record.finished(provenance), "runs": results})
    print(f"\nJSON: {path}")
    broken = [r for r in results if r["failures_after_kill"] > r["clients"] or r["replacement_ready_s"] is None]
    return 1 if broken else 0


def format_result(r: dict) -> str:
    return "\n".join(
        [
            f"\nSIGKILL of worker {r['killed_pid']} ({r['workers']} workers, {r['clients']} clients)",
            f"  requests before the kill      {r['requests_before_kill']} ({r['failures_before_kill']} failed)",
            f"  requests after the kill       {r['requests_after_kill']} ({r['failures_after_kill']} failed: "
            f"{r['failure_kinds'] or 'none'})",
            f"  replacement process started   {r['replacement_spawned_s']} s after the kill (pid {r['replacement_pid']})",
            f"  replacement model warm        {r['replacement_ready_s']} s after the kill",
            f"  first success after the kill  {r['first_success_after_kill_s']} s",
            f"  longest time without success  {r['longest_gap_s']} s (of {r['window_s']} s observed)",
            f"  served while replacing        {r['served_while_replacing']} requests (by the surviving workers)",
            f"  replacement alone (others stopped): {r['replacement_probe_kinds']}",
        ]
    )


if __name__ == "__main__":
    exit_with(main)
