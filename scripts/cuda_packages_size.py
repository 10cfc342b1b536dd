"""How much the Bento's CPU-only requirements leave out: the installed size of the CUDA packages.

    python scripts/cuda_packages_size.py                                  # prints the table
    python scripts/cuda_packages_size.py --json docs/results/cuda-packages.json

`requirements/dev.lock` (this environment) pins PyTorch's default wheels, which
pull in the NVIDIA CUDA libraries; `requirements/bento.txt` (the Bento, hence the
container image) leaves those packages out and resolves torch against PyTorch's
CPU index. This sums, from this environment's installed files (their dist-info
RECORD), the size of every package pinned in dev.lock but not in bento.txt. That
is a lower bound of what the image saves: the CUDA kernels inside the default
torch wheel itself (its `+cpu` twin is smaller) are not counted, since the `+cpu`
wheel is not installed here to compare.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from harness import record
from harness.paths import ROOT


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (names normalised as pip does)."""
    out = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            out[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return out


def installed_bytes(name: str) -> int:
    """Bytes of the files an installed distribution recorded (0 when it is not installed)."""
    try:
        files = metadata.distribution(name).files or []
    except metadata.PackageNotFoundError:
        return 0
    total = 0
    for file in files:
        path = Path(file.locate())
        if path.is_file():
            total += path.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures here (with the command and machine)")
    args = parser.parse_args(argv)
    dev, bento = pins(ROOT / "requirements" / "dev.lock"), pins(ROOT / "requirements" / "bento.txt")
    left_out = sorted(set(dev) - set(bento))
    sizes = {name: installed_bytes(name) for name in left_out}
    gib = 2**30
    is_cuda = lambda name: name.startswith(("nvidia-", "triton", "cuda-"))  # noqa: E731
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        if is_cuda(name):
            print(f"{name:<32} {dev[name]:<14} {size / 2**20:>9,.1f} MiB")
    total = sum(sizes.values())
    cuda = sum(size for name, size in sizes.items() if is_cuda(name))
    print(f"\nNVIDIA/CUDA packages and triton, in dev.lock but not in bento.txt: {cuda / gib:.2f} GiB installed here")
    print(f"all {len(left_out)} packages of dev.lock not in bento.txt (test and load-test tools too): "
          f"{total / gib:.2f} GiB")
    torch_dev, torch_bento = dev.get("torch"), bento.get("torch")
    print(f"torch: dev.lock {torch_dev}, bento.txt {torch_bento} (resolved against the CPU index in the Bento)")
    if args.json:
        record.write(args.json, {**record.finished(record.provenance(argv)), "left_out_packages": {
            name: {"version": dev[name], "installed_mib": round(size / 2**20, 1)} for name, size in sizes.items()},
            "left_out_total_gib": round(total / gib, 2), "cuda_and_triton_gib": round(cuda / gib, 2),
            "torch": {"dev_lock": torch_dev, "bento_txt": torch_bento}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
