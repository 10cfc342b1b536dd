#!/usr/bin/env bash
# Re-measure the figures the docs quote outside the benchmark, three runs each, and keep every run's raw JSON
# under docs/results/ (the docs quote the median and min-max of the three):
#
#   ./dev.sh run bash scripts/doc_figures.sh            # about 25 min on the 2-core development VM
#   ./dev.sh run bash scripts/doc_figures.sh latency    # one group: latency | locust | faults | profile
#
# profile (once, not three times): py-spy on every worker at 32 clients, its report kept as docs/results/profile-32-clients.txt.
#
# Run it on a quiet machine: every figure is a latency or a throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true
runs=${RUNS:-3}
work=results/doc-figures
keep=docs/results
mkdir -p "$work" "$keep"
full=$(ls results/samples/*/full-2048x2500-IM-0115-0001.jpeg 2>/dev/null | head -1 || true)
if [ -z "$full" ]; then  # the benchmark's sample cache builds it from the shared training folder
  python -c "from harness.payloads import build_samples; build_samples()"
  full=$(ls results/samples/*/full-2048x2500-IM-0115-0001.jpeg | head -1)
fi
groups=${*:-latency locust faults profile}

latest() { ls -t "$1"/$2 | head -1; }

for k in $(seq 1 "$runs"); do
  for group in $groups; do
    case $group in
      latency)
        python -m loadtests.grpc_vs_http_latency --calls 200 --json "$keep/latency-224px-$k.json"
        python -m loadtests.grpc_vs_http_latency --calls 200 --image "$full" --json "$keep/latency-2048px-$k.json" ;;
      locust)
        python -m loadtests.run_locust --users 32 --duration 60 --out "$work/locust32-$k"
        cp "$work/locust32-$k/summary.json" "$keep/locust-32-users-$k.json" ;;
      faults)
        python scripts/fault_sigterm.py --out "$work/faults-$k"
        cp "$(latest "$work/faults-$k" 'sigterm-*.json')" "$keep/fault-sigterm-$k.json"
        python scripts/fault_worker_kill.py --out "$work/faults-$k"
        cp "$(latest "$work/faults-$k" 'worker-kill-*.json')" "$keep/fault-worker-kill-$k.json" ;;
      profile)
        if [ "$k" = 1 ]; then
          python scripts/profile_service.py --system service --clients 32 --seconds 20 --out "$work/profile"
          cp "$work/profile/profile.txt" "$keep/profile-32-clients.txt"
        fi ;;
      *) echo "unknown group: $group (latency | locust | faults | profile)" >&2; exit 2 ;;
    esac
  done
done
python scripts/figure_spread.py "$keep" >"$keep/doc-figures-spread.md"
cat "$keep/doc-figures-spread.md"
