"""Long property-based fuzz run of the decode-and-validate path (core.preprocess.prepare).

    python scripts/fuzz_decode.py --minutes 10            # prints examples run, outcomes, failures
    python scripts/fuzz_decode.py --minutes 1 --out runs/fuzz
    python scripts/fuzz_decode.py --minutes 3 --json docs/results/fuzz-decode.json   # the figure in docs/hardening.md

Runs the property of harness/fuzz.py in rounds of fresh random examples
until the time is up. A failing input is shrunk by hypothesis, written to
--out as a .bin file and reported; the run goes on. Exit status 1 if any
example failed. The short CI run is tests/test_fuzz_decode.py.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

from core.cli import bounded, output_file
from harness import record
from harness.fuzz import ANY_INPUT, check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=bounded(float, 0, low_open=True), default=10.0,
                        help="how long to fuzz (default 10; at least one round)")
    parser.add_argument("--round", type=bounded(int, 1), default=2000, help="examples per hypothesis round")
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz"), help="where failing inputs are written")
    parser.add_argument("--json", type=output_file, help="also write the summary here (with the command and machine)")
    args = parser.parse_args(argv)
    provenance = record.provenance(argv)

    outcomes: collections.Counter[str] = collections.Counter()
    failures: dict[str, str] = {}
    last_input: list[bytes] = [b""]

    @settings(
        max_examples=args.round,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(ANY_INPUT)
    def property_(data: bytes) -> None:
        last_input[0] = data
        outcomes[check(data)] += 1

    started = time.monotonic()
    deadline = started + args.minutes * 60
    rounds = 0
    while rounds == 0 or time.monotonic() < deadline:  # a run of no example passed, and reported 0 failures
        rounds += 1
        try:
            property_()
        except Exception as exc:  # a property failure, shrunk by hypothesis
            data = last_input[0]
            name = hashlib.sha256(data).hexdigest()[:16]
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.bin").write_bytes(data)
            failures[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            outcomes["FAILED"] += 1
            print(f"FAILURE {name}: {failures[name]}", flush=True)
        total = sum(outcomes.values())
        print(f"round {rounds}: {total:,} examples, {time.monotonic() - started:,.0f} s", flush=True)

    elapsed = time.monotonic() - started
    total = sum(outcomes.values())
    print(f"\nfuzzed prepare() for {elapsed / 60:.1f} min: {total:,} examples ({total / elapsed:,.0f}/s)")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:<18} {count:>9,}")
    print(f"failures: {len(failures)}" + (f" (inputs in {args.out})" if failures else ""))
    for name, error in failures.items():
        print(f"  {name}: {error}")
    if args.json:
        record.write(args.json, {**record.finished(provenance), "minutes": round(elapsed / 60, 2), "examples": total,
                                 "outcomes": dict(outcomes.most_common()), "failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
