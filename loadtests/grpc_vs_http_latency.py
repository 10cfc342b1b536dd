"""Single-call latency of the same image over gRPC and over HTTP, one call in flight at a time.

    python -m loadtests.grpc_vs_http_latency                       # starts a service on free ports, 200 calls each
    python -m loadtests.grpc_vs_http_latency --url http://127.0.0.1:3000 --grpc-url 127.0.0.1:3001 --calls 500

Both transports use the typed clients of `client/` with a kept-alive connection (what an integration
does); calls alternate HTTP, gRPC, HTTP, ... so drift in machine load hits both alike. Prints, per
transport, the client-side median / p95 / mean and the server's own `processing_ms` median, so the
difference between the two is the protocol's cost (gRPC adds the in-process hop to the batched API).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from client import ClientError, GrpcClient, HttpClient, ImageUpload
from core.cli import bounded, output_file
from harness import record
from harness.paths import DATA_DIR, RESULTS
from harness.payloads import api_key_headers
from harness.servers import bentoml_serve, exit_with, free_port


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _wait_grpc_serving(target: str, timeout_s: float = 30.0) -> None:
    """The gRPC health check turns SERVING just after HTTP /readyz; wait for it."""
    deadline = time.monotonic() + timeout_s
    with GrpcClient(target, timeout=5) as api:
        while not api.ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"gRPC endpoint {target} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.1)


def measure(url: str, grpc_url: str, image: Path, calls: int, warmup: int = 10) -> dict[str, dict[str, float]]:
    upload = ImageUpload(data=image.read_bytes(), filename=image.name)
    clients = {"HTTP": HttpClient(url, headers=api_key_headers()), "gRPC": GrpcClient(grpc_url, headers=api_key_headers())}
    client_ms: dict[str, list[float]] = {name: [] for name in clients}
    server_ms: dict[str, list[float]] = {name: [] for name in clients}
    labels: dict[str, set[tuple[str, float]]] = {name: set() for name in clients}
    try:
        for i in range(warmup + calls):
            for name, api in clients.items():
                started = time.perf_counter()
                (prediction,) = api.classify([upload])
                elapsed = (time.perf_counter() - started) * 1000
                if i >= warmup:
                    client_ms[name].append(elapsed)
                    server_ms[name].append(prediction.processing_ms)
                    labels[name].add((prediction.label, prediction.probability))
    finally:
        for api in clients.values():
            api.close()
    if labels["HTTP"] != labels["gRPC"]:
        raise SystemExit(f"the transports disagree: HTTP {labels['HTTP']} vs gRPC {labels['gRPC']}")
    return {
        name: {
            "median_ms": statistics.median(values),
            "p95_ms": _percentile(values, 0.95),
            "mean_ms": statistics.fmean(values),
            "min_ms": min(values),
            "server_median_ms": statistics.median(server_ms[name]),
        }
        for name, values in client_ms.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="HTTP base URL of a running service (default: start one)")
    parser.add_argument("--grpc-url", help="host:port of its gRPC endpoint (required with --url)")
    parser.add_argument("--calls", type=bounded(int, 1), default=200, help="measured calls per transport (default 200)")
    parser.add_argument("--image", type=Path, help="image to send (default: a real X-ray from the data set)")
    parser.add_argument("--json", type=output_file, help="also write the figures here (with the command and machine)")
    args = parser.parse_args(argv)
    if args.grpc_url and not args.url:  # it started a server of its own and measured that, without a word
        parser.error("--grpc-url goes with --url (the HTTP address of the same server)")
    if args.image is not None and not args.image.is_file():  # found only after a server had started
        parser.error(f"--image {args.image}: no such file")
    provenance = record.provenance(argv)
    image = args.image or sorted((DATA_DIR / "train" / "PNEUMONIA").iterdir())[0]
    server = None
    try:
        if args.url is None:
            os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
            from models_registry.default import ensure_default

            ensure_default()
            out = RESULTS / "latency"
            out.mkdir(parents=True, exist_ok=True)
            server = bentoml_serve("service:PneumoniaClassifier", free_port(), out / "server.log")
            print(f"starting the service on {server.url}, gRPC {server.grpc_target} ...", file=sys.stderr)
            server.start()
            url, grpc_url = server.url, server.grpc_target
            _wait_grpc_serving(grpc_url)
        elif not args.grpc_url:
            parser.error("--grpc-url is required with --url")
        else:
            url, grpc_url = args.url, args.grpc_url
        results = measure(url, grpc_url, image, args.calls)
    except ClientError as failed:  # e.g. an unreachable --grpc-url: one line, not the client's traceback
        print(f"error: a call failed: {type(failed).__name__}: {' '.join(str(failed).split())}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    print(f"{args.calls} sequential single-image calls per transport, image {image.name} ({image.stat().st_size:,} bytes)")
    print(f"{'transport':<10}{'median ms':>11}{'p95 ms':>9}{'mean ms':>9}{'min ms':>8}{'server median ms':>18}")
    for name, row in results.items():
        print(
            f"{name:<10}{row['median_ms']:>11.2f}{row['p95_ms']:>9.2f}{row['mean_ms']:>9.2f}"
            f"{row['min_ms']:>8.2f}{row['server_median_ms']:>18.2f}"
        )
    if args.json:
        record.write(args.json, {**record.finished(provenance), "calls": args.calls, "image": image.name,
                                 "image_bytes": image.stat().st_size,
                                 "results": {name: {k: round(v, 2) for k, v in row.items()} for name, row in results.items()}})
    return 0


if __name__ == "__main__":
    exit_with(main)
