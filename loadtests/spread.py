"""The spread of several benchmark runs: median and min-max of every figure, and how often each target was met.

    python -m loadtests.spread results/benchmark/a/benchmark.json results/benchmark/b/benchmark.json ...
    python -m loadtests.spread RUN.json ... --results docs/results --name final   # also keep the runs and the spread

One run of the benchmark on a shared 2-core VM moves by 10-20 % from the next;
a ratio or a target met in one run says little. `python -m loadtests.benchmark
--repeat 3` runs it three times and calls this; on a shared machine the runs can
also be taken one at a time (each in a quiet window) and summarised here.
Writes <name>-spread.json and <name>-spread.md (and, with --results, copies of
each run's benchmark.json as <name>-<k>.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from core.cli import file_stem, output_folder
from harness.record import read_json
from harness.servers import answered
from loadtests.benchmark import RATIO_ROWS, label, target_names

FIGURES = ("images_per_s", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "full_p50_ms", "server_cpu_cores")


def stats(values: list[float | None]) -> dict | None:
    """Median, min, max (and the values, in run order) of the figures that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": round(statistics.median(present), 2), "min": min(present), "max": max(present), "values": values}


def text(s: dict | None, digits: int | None = 1) -> str:
    """`median (min-max)`, or `-`; `digits` None: each number as short as it reads (`:g`)."""
    if s is None:
        return "-"
    spec = "g" if digits is None else f".{digits}f"
    if s["min"] == s["max"]:
        return format(s["median"], spec)
    return f"{format(s['median'], spec)} ({format(s['min'], spec)}-{format(s['max'], spec)})"


def summarise(paths: list[Path]) -> dict:
    results = [read_json(p) for p in paths]
    first = results[0]
    keys = list(dict.fromkeys((r["system"], r["clients"]) for result in results for r in result["runs"]))
    rows = []
    for system, clients in keys:
        found = [next((r for r in result["runs"] if r["system"] == system and r["clients"] == clients), None)
                 for result in results]
        row = {"system": system, "label": label(system), "clients": clients, "runs": sum(f is not None for f in found),
               "failures": sum(f["failures"] for f in found if f)}
        for figure in FIGURES:
            if figure == "full_p50_ms":
                values = [((f or {}).get("by_kind") or {}).get("full", {}).get("p50_ms") for f in found]
            else:
                values = [(f or {}).get(figure) for f in found]
            row[figure] = stats(values)
        rows.append(row)
    ratio_names = list(dict.fromkeys(name for result in results for name in result.get("ratios", {})))
    ratios = {name: stats([result.get("ratios", {}).get(name) for result in results]) for name in ratio_names}
    targets = {}
    for name in dict.fromkeys(n for result in results for n in result.get("targets", {})):
        found = [result.get("targets", {}).get(name) for result in results]
        targets[name] = {"target": next(f["target"] for f in found if f),
                         "value": stats([f["value"] if f else None for f in found]),
                         "met_runs": sum(1 for f in found if f and f["met"]), "runs": sum(1 for f in found if f)}
    bare = stats([(result.get("bare_model") or {}).get("limit_images_per_s") for result in results])
    explain = None
    if all(result.get("explain") for result in results):
        explain = {
            "classify_images_per_s_ratio": stats([r["explain"]["classify_images_per_s_ratio"] for r in results]),
            "classify_p95_ratio": stats([r["explain"]["classify_p95_ratio"] for r in results]),
            "explain_alone_p50_ms": stats([r["explain"]["rows"]["explain_alone"]["p50_ms"] for r in results]),
            "explain_alone_p95_ms": stats([r["explain"]["rows"]["explain_alone"]["p95_ms"] for r in results]),
        }
    return {
        "runs": [{"file": str(p), "command": r.get("command"), "commit": r.get("commit"), "started": r.get("started"),
                  "other_cpu_cores_max": max((x.get("other_cpu_cores", 0.0) for x in r["runs"]), default=0.0)}
                 for p, r in zip(paths, results)],
        "machine": first.get("machine"), "model": first.get("model"), "mix_text": first.get("mix_text"),
        "concurrency": first["concurrency"], "window_s": first.get("window_s"),
        "bare_model_limit_images_per_s": bare, "rows": rows, "ratios": ratios, "targets": targets, "explain": explain,
    }


def format_spread(summary: dict) -> str:
    n = len(summary["runs"])
    concurrency = summary["concurrency"]
    lines = [
        f"Median (min-max) of {n} runs.",
        "",
        "| system | clients | images/s | req/s | p50 ms | p99 ms | full-size p50 ms | server CPU (cores) | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if summary["bare_model_limit_images_per_s"]:
        lines.append(f"| bare model limit (no HTTP) | - | {text(summary['bare_model_limit_images_per_s'])} | - | - | - | - | - | - |")
    for r in summary["rows"]:
        lines.append(f"| {r['label']} | {r['clients']} | {text(r['images_per_s'])} | {text(r['requests_per_s'])} "
                     f"| {text(r['p50_ms'], 0)} | {text(r['p99_ms'], 0)} | {text(r['full_p50_ms'], 0)} "
                     f"| {text(r['server_cpu_cores'], 2)} | {r['failures']} |")
    lines += ["", "| ratio | " + " | ".join(f"{c} clients" for c in concurrency) + " |",
              "| --- |" + " ---: |" * len(concurrency)]
    for prefix, name in RATIO_ROWS.items():
        values = [summary["ratios"].get(f"{prefix}{c}") for c in concurrency]
        if any(v is not None for v in values):
            lines.append(f"| {name} | " + " | ".join(text(v, 2) for v in values) + " |")
    names = target_names(max(concurrency))
    lines += ["", "| target | median (min-max) | goal | met in |", "| --- | ---: | ---: | ---: |"]
    for name, t in summary["targets"].items():
        sign = "<=" if name in ("service_p99_ms_at_8", "zero_failures_at_top") else ">="
        lines.append(f"| {names.get(name, name)} | {text(t['value'], 2)} | {sign} {t['target']} "
                     f"| {t['met_runs']} of {t['runs']} runs |")
    if summary.get("explain"):
        e = summary["explain"]
        lines += ["", f"Explain: alone p50 {text(e['explain_alone_p50_ms'], 0)} ms, p95 {text(e['explain_alone_p95_ms'], 0)} "
                      f"ms; classify beside the explain burst / alone: images/s x{text(e['classify_images_per_s_ratio'], 2)}, "
                      f"p95 x{text(e['classify_p95_ratio'], 2)}"]
    lines += ["", "Runs: " + "; ".join(f"{Path(r['file']).parent.name or r['file']} ({r['started']}, commit {r['commit']}, "
                                          f"other load up to {r['other_cpu_cores_max']:.2f} cores)" for r in summary["runs"])]
    return "\n".join(lines)


def write(summary: dict, folder: Path, name: str, paths: list[Path] | None = None) -> None:
    """<name>-spread.json and .md in `folder`; with `paths`, copies of the runs as <name>-<k>.json (outside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    if paths:
        # Every run read before any copy is written: runs given as <name>-2.json <name>-1.json in --results itself
        # had run 1 overwritten by run 2 before it was copied (a helper's find).
        runs = [Path(path).read_bytes() for path in paths]
        copies = [folder / f"{name}-{k}.json" for k in range(1, len(runs) + 1)]
        for run, target in zip(runs, copies, strict=True):
            target.write_bytes(run)
        summary = {**summary, "copies": [str(target) for target in copies]}
    (folder / f"{name}-spread.json").write_text(json.dumps(summary, indent=2))
    commands = sorted({r["command"] for r in summary["runs"] if r.get("command")})
    (folder / f"{name}-spread.md").write_text("".join(f"`{c}`\n" for c in commands) + "\n" + format_spread(summary) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmark.json files of the runs")
    parser.add_argument("--results", type=output_folder, default=None, help="also copy the runs and write the spread here")
    parser.add_argument("--name", type=file_stem, default="benchmark", help="file name stem in --results")
    parser.add_argument("--out", type=output_folder, default=None, help="write <name>-spread.{json,md} here (without copies)")
    args = parser.parse_args(argv)
    summary = summarise(args.runs)
    if args.out:
        write(summary, args.out, args.name)
    if args.results:
        write(summary, args.results, args.name, args.runs)
    print(format_spread(summary))
    return 0


if __name__ == "__main__":
    sys.exit(answered(main, "stopped"))
