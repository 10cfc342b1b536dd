"""SIGTERM a live service while it holds heavy requests; print how the drain went.

    python scripts/fault_sigterm.py                     # 4 requests of 16 large PNGs in flight
    python scripts/fault_sigterm.py --in-flight 8

It starts `bentoml serve` on free 127.0.0.1 ports (a temporary model store with
the shipped model unless BENTOML_HOME is set), sends the heavy requests, waits
until the worker has accepted all of them, sends SIGTERM to the `bentoml serve`
process (what `docker stop` or Kubernetes does), then opens a new connection
every 0.25 s until the server is gone. Printed and written to
results/faults/sigterm-*.json: how the in-flight requests ended, how each new
request ended and how long it waited, and the exit code and time. Exit 1 when
an in-flight request failed, a new one hung, or the server did not exit 0.
"""

from __future__ import annotations

import argparse
import time

from core.cli import bounded, output_folder
from harness import record
from harness.faults import sigterm_experiment, write_json
from harness.paths import RESULTS
from harness.payloads import large_png
from harness.servers import exit_with, kill_group, model_store, start_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=bounded(int, 1, 64), default=4, help="heavy requests in flight at SIGTERM")
    parser.add_argument("--images", type=bounded(int, 1, 16), default=16, help="large PNGs per heavy request (at most "
                        "the server's 16 per request)")
    parser.add_argument("--side", type=bounded(int, 64, 4096), default=1536, help="side of the large PNGs in pixels")
    parser.add_argument("--out", type=output_folder, default=RESULTS / "faults")
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    provenance = record.provenance(argv)
    heavy = [large_png(args.side, seed=i % 2) for i in range(args.images)]
    with model_store():
        server = start_server(args.out / f"sigterm-{stamp}.log")
        try:
            result = sigterm_experiment(server, heavy, in_flight=args.in_flight).as_dict()
        finally:
            server.stop()
            kill_group(server)
    print(f"\nSIGTERM with {result['in_flight']} requests of {result['images_per_request']} images in flight")
    print(f"  in-flight requests          {result['in_flight_ok']}/{result['in_flight']} answered 200 "
          f"({result['in_flight_kinds']}), the last {result['in_flight_finished_after_term_s']} s after SIGTERM")
    print(f"  server exit                 code {result['exit_code']}, {result['exit_after_term_s']} s after SIGTERM")
    print(f"  new requests after SIGTERM  {result['late_kinds']}, longest wait {result['late_max_s']} s")
    for item in result["late"]:
        print(f"    sent +{item['sent_after_term_s']:5.2f} s  ->  {item['kind']:<20} after {item['took_s']:.2f} s")
    path = write_json(args.out / f"sigterm-{stamp}.json", {**record.finished(provenance), **result})
    print(f"\nJSON: {path}")
    hung = result["exit_after_term_s"] is not None and result["late_max_s"] > result["exit_after_term_s"] + 5
    ok = result["in_flight_ok"] == result["in_flight"] and result["exit_code"] == 0 and not hung
    return 0 if ok else 1


if __name__ == "__main__":
    exit_with(main)
