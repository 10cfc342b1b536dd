#!/usr/bin/env bash
# The CI command N times in a row on a clean clone of this repository's HEAD, each run's log and CPU time kept,
# then one JSON summary (what docs/results/suite-3runs.json holds). Start the load you want beside it yourself.
#   scripts/suite_runs.sh [OUT_DIR (default /tmp/suite-runs; new, empty or an earlier output)] [RUNS (default 3)]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-/tmp/suite-runs}")"; runs="${2:-3}"
clone="$out/clone"
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: RUNS must be a whole number >= 1, not '$runs'" >&2; exit 2
fi
# OUT_DIR is removed and made anew below: only an empty folder or an earlier output (commit.txt with its clone/ or
# its run logs: the clone, a whole .venv, may have been deleted to free the disk) may be.
if [ -n "$(ls -A "$out" 2>/dev/null)" ] && ! { [ -f "$out/commit.txt" ] \
    && { [ -d "$clone/.git" ] || compgen -G "$out/run-*.log" > /dev/null; }; }; then
  echo "error: $out is not empty and not an earlier output of this script; give another OUT_DIR" >&2; exit 2
fi
# The suite reads ../shared next to the repository; the clone lives elsewhere, so point it at this checkout's data.
export PNEUMONIA_DATA_DIR="${PNEUMONIA_DATA_DIR:-$(dirname "$repo")/shared/datasets/chest_xray}"
rm -rf "$out" && mkdir -p "$out" && git clone -q "$repo" "$clone"
git -C "$clone" log --oneline -1 > "$out/commit.txt"
for k in $(seq 1 "$runs"); do
  ( cd "$clone" && /usr/bin/time -f "%U %S %e" -o "$out/time-$k.txt" bash .ci/run > "$out/run-$k.log" 2>&1 ) \
    && echo 0 > "$out/rc-$k.txt" || echo $? > "$out/rc-$k.txt"
  echo "run $k: rc $(cat "$out/rc-$k.txt"), $(tail -1 "$out/run-$k.log")"
done
python3 - "$out" "$runs" <<'PY'
import json, re, statistics, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), int(sys.argv[2])
rows = []
for k in range(1, runs + 1):
    user, system, wall = map(float, (out / f"time-{k}.txt").read_text().split()[-3:])
    log = (out / f"run-{k}.log").read_text()
    verdict = re.findall(r"=+ (.*?) in ([\d.]+)s", log)
    rows.append({"run": k, "rc": int((out / f"rc-{k}.txt").read_text()), "wall_s": wall, "cpu_user_s": user,
                 "cpu_sys_s": system, "cores_busy": round((user + system) / wall, 2),
                 "pytest": verdict[-1][0] if verdict else None, "pytest_s": float(verdict[-1][1]) if verdict else None,
                 "skipped": log.count(" skipped")})
summary = {"commit": (out / "commit.txt").read_text().strip(), "runs": rows}
timed = sorted(r["pytest_s"] for r in rows if r["pytest_s"] is not None)
if timed:  # pytest's own time (the wall time adds the set-up), median and spread as the docs quote them
    summary.update(pytest_s_median=statistics.median(timed), pytest_s_min=timed[0], pytest_s_max=timed[-1])
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
PY
