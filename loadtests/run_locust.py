"""Run the Locust suite headless and write its reports plus a short summary.

    python -m loadtests.run_locust --users 32 --duration 60        # starts `bentoml serve`, stops it afterwards
    python -m loadtests.run_locust --url http://10.0.0.5:3000 -u 8 -d 30
    python -m loadtests.run_locust --users 16 --explain-users 4 -d 60  # classify beside a burst of explanations

Without --url the production model of the current BentoML store is served
(the shipped default model is imported first when the store has none, like
`./dev.sh serve`) on a free 127.0.0.1 port, and the server is stopped at the
end, also when the run fails or is interrupted. Writes to --out (default
results/locust/<time>/): locust_stats.csv, locust_failures.csv,
locust_exceptions.csv, locust_stats_history.csv, report.html, summary.json,
summary.md, final_stats.json, locust.log and server.log. Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from core.cli import bounded, key_value, output_folder
from harness import record
from harness.paths import RESULTS, ROOT, VENV_BIN
from harness.payloads import MULTI_COUNT
from harness.servers import ServerProcess, answered, bentoml_serve, free_port, server_env

IMAGES_PER_REQUEST = {"full-size": 1, "single": 1, f"{MULTI_COUNT} images": MULTI_COUNT, "explained": 1, "busy 503": 0}


def parse_duration(text: str) -> int:
    """'90', '90s', '2m', '1h30m' -> seconds."""
    if re.fullmatch(r"\d+", text):
        seconds = int(text)
    else:
        parts = re.findall(r"(\d+)\s*([hms])", text)
        if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            raise argparse.ArgumentTypeError(f"cannot read duration {text!r}; use e.g. 60, 60s, 2m, 1h30m")
        seconds = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds < 1:  # Locust reads a run time of 0 s as "run until stopped"
        raise argparse.ArgumentTypeError(f"must be at least 1 s, not {text!r}")
    if seconds > 7 * 24 * 3600:  # 10**20 s reached Locust, which crashed on it after a server had started
        raise argparse.ArgumentTypeError(f"must be at most a week (168h), not {text!r}")
    return seconds


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=None, help="service to test; omitted: start one on a free local port")
    p.add_argument("-u", "--users", type=bounded(int, 1), default=32, help="concurrent simulated clients")
    p.add_argument("-r", "--spawn-rate", type=bounded(float, 0, low_open=True), default=None, help="users started per second (default: all at once)")
    p.add_argument("-d", "--duration", type=parse_duration, default=60, help="test length, e.g. 60, 90s, 5m")
    p.add_argument("--out", type=output_folder, default=None, help="results folder (default results/locust/<time>)")
    p.add_argument("--grpc", action="store_true", help="add the gRPC user class (PNEUMONIA_LOADTEST_GRPC=1)")
    p.add_argument("--wait-s", type=bounded(float, 0), default=0.0, help="mean think time per user between requests")
    p.add_argument("--explain-users", type=bounded(int, 0), default=0,
                   help="this many of the users call POST /explain back to back (an explain burst beside classify)")
    p.add_argument("--stop-after", type=bounded(int, 0), default=0, metavar="N",
                   help="end the run once every request type was sent N times (the duration is then an upper bound)")
    p.add_argument("--env", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the started service, e.g. PNEUMONIA_BATCHING__MAX_BATCH_SIZE=16")
    return p


def summarise(stats_json: Path) -> dict:
    """Aggregated and per-request-type figures from the locustfile's final statistics, with images/s added: the images
    of answered requests only (a failed request classified nothing; counting it made a failing run look fast)."""
    raw = json.loads(stats_json.read_text())
    rows = []
    for row in raw["by_request"]:
        kind = re.search(r"\[(.+)\]", row["name"])
        images = IMAGES_PER_REQUEST.get(kind.group(1), 0) if kind else 0
        answered = (row["requests"] - row["failures"]) / row["requests"] if row["requests"] else 0.0
        rows.append({**row, "images_per_s": row["requests_per_s"] * answered * images})
    rows.sort(key=lambda r: (r["type"], r["name"]))
    total = {**raw["aggregated"], "name": "Aggregated", "images_per_s": sum(r["images_per_s"] for r in rows)}
    rounded = [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in [*rows, total]]
    return {"aggregated": rounded[-1], "by_request": rounded[:-1]}


def format_summary(summary: dict, meta: dict) -> str:
    lines = [
        f"Locust, {meta['users']} users, {meta['duration_s']} s against {meta['url']}",
        "",
        "| request | requests | failures | req/s | images/s | p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in [*summary["by_request"], summary["aggregated"]]:
        lines.append(
            f"| {(row['type'] + ' ' + row['name']).strip()} | {row['requests']} | {row['failures']} | {row['requests_per_s']:.1f} | "
            f"{row['images_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    return "\n".join(lines)


def remove_earlier_reports(out: Path) -> None:
    """A reused --out holds the last run's statistics and reports: were Locust to fail at start, the statistics were
    reported as this run's, and the reports stayed beside its log as if they were."""
    for earlier in ("final_stats.json", "summary.json", "summary.md", "report.html"):
        (out / earlier).unlink(missing_ok=True)


def run_locust(url: str, users: int, duration_s: int, out: Path, spawn_rate: float | None = None,
               grpc_url: str | None = None, grpc: bool = False, wait_s: float = 0.0, explain_users: int = 0,
               stop_after: int = 0) -> int:
    """Locust headless against `url`; returns its exit code (1 when requests failed)."""
    env = server_env(PNEUMONIA_LOADTEST_WAIT_S=str(wait_s), PNEUMONIA_LOADTEST_STATS_JSON=str(out / "final_stats.json"),
                     PNEUMONIA_LOADTEST_EXPLAIN_USERS=str(explain_users), PNEUMONIA_LOADTEST_STOP_AFTER=str(stop_after))
    if grpc:
        env["PNEUMONIA_LOADTEST_GRPC"] = "1"
        if grpc_url:
            env["PNEUMONIA_GRPC_URL"] = grpc_url
    args = [
        str(VENV_BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
        "--users", str(users), "--spawn-rate", str(spawn_rate or users), "--run-time", f"{duration_s}s",
        "--host", url, "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--only-summary", "--stop-timeout", "30",
    ]
    remove_earlier_reports(out)
    with open(out / "locust.log", "wb") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=duration_s + 180)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def check_reachable(url: str) -> str | None:
    """Why `url` cannot be load-tested (no answer, or no 200 on /readyz: not this service, or not ready), or None.
    Without this, an unreachable URL ran the whole duration and ended with thousands of failed requests."""
    try:
        status = httpx.get(url.rstrip("/") + "/readyz", timeout=10).status_code
    except httpx.HTTPError as exc:
        return f"cannot reach {url} ({type(exc).__name__}: {exc})"
    except httpx.InvalidURL as exc:  # not an HTTPError: 'http://[::1' gave a traceback
        return f"--url {url!r} is not a URL ({exc})"
    if status != 200:
        return f"{url}/readyz answered {status}, not 200: not this service, or not ready yet"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.explain_users > args.users:
        parser.error(f"argument --explain-users: {args.explain_users} is more than --users {args.users}")
    if args.url is not None and (problem := check_reachable(args.url)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # SIGTERM as Ctrl-C: the finally blocks stop Locust (its own process group) and the started server; a server
    # that does not start, or any other failure, is one line (main() runs on the main thread; tests call it too)
    return answered(lambda: _run(args, argv), "Locust and any server this command started were stopped")


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    provenance = record.provenance(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    out = (args.out or RESULTS / "locust" / time.strftime("%Y%m%d-%H%M%S")).resolve()  # Locust runs in ROOT
    out.mkdir(parents=True, exist_ok=True)
    remove_earlier_reports(out)  # before the server starts: an interrupted run leaves none of them either
    server: ServerProcess | None = None
    grpc_url = None  # with --url, the gRPC user finds the endpoint itself (PNEUMONIA_GRPC_URL or port 3001)
    try:
        url = args.url
        if url is None:
            from models_registry.default import ensure_default

            print(ensure_default(), file=sys.stderr)
            # bentoml_serve gives the gRPC endpoint a free loopback port, never the fixed default.
            extra = dict(args.env)
            server = bentoml_serve("service:PneumoniaClassifier", free_port(), out / "server.log", **extra)
            print(f"starting the service on {server.url} (log: {out / 'server.log'}) ...", file=sys.stderr)
            server.start()
            grpc_url = server.grpc_target  # read after the start, which may have moved it to a free port
            url = server.url
        code = run_locust(url.rstrip("/"), args.users, args.duration, out, args.spawn_rate, grpc_url, args.grpc,
                          args.wait_s, args.explain_users, args.stop_after)
    finally:
        if server is not None:
            server.stop()
    stats = out / "final_stats.json"
    if not stats.exists():
        print(f"Locust wrote no statistics (exit {code}); see {out / 'locust.log'}", file=sys.stderr)
        return 2
    meta = {**record.finished(provenance), "url": url, "users": args.users, "duration_s": args.duration,
            "locust_exit_code": code}
    summary = summarise(stats)
    (out / "summary.json").write_text(json.dumps({**meta, **summary}, indent=2))
    text = format_summary(summary, meta)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"\nreports: {out}/report.html, {out}/locust_stats.csv, summary.json")
    failures = summary["aggregated"]["failures"]
    if failures:
        print(f"{failures} requests failed: see {out / 'locust_failures.csv'}", file=sys.stderr)
        return 1
    return 0 if code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
