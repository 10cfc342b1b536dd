"""Seconds per training step (forward, backward, AdamW) of each architecture on this machine's CPU.

    python scripts/train_step_time.py                       # MobileNetV3-Small and ResNet-18, 2 threads
    python scripts/train_step_time.py --arch resnet18 --threads 2 --steps 5

Why: whether a larger network fits the 45-minute training budget is a question of this number
times the steps of a recipe (recipe E: 28 epochs of 69 batches of 64), not of its parameter count.
Augmentation, the weight average and evaluation are left out (recipe E's augmentation adds about 0.15 s a batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from core.cli import bounded
from core.model import ModelSpec, build_model


def step_seconds(arch: str, batch_size: int, image_size: int, steps: int) -> list[float]:
    """Timed steps after one warm-up step, on random images (speed does not depend on their content)."""
    model = build_model(ModelSpec(arch=arch)).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 1, image_size, image_size), torch.rand(batch_size)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", choices=list(ModelSpec.model_fields["arch"].annotation.__args__),
                   help="architecture (repeat; default: mobilenet_v3_small and resnet18)")
    p.add_argument("--threads", type=bounded(int, 1), default=2)
    p.add_argument("--batch-size", type=bounded(int, 1), default=64)
    p.add_argument("--image-size", type=bounded(int, 1), default=224)
    p.add_argument("--steps", type=bounded(int, 1), default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for arch in args.arch or ["mobilenet_v3_small", "resnet18"]:
        times = step_seconds(arch, args.batch_size, args.image_size, args.steps)
        print(json.dumps({"arch": arch, "threads": args.threads, "batch_size": args.batch_size,
                          "median_s": round(statistics.median(times), 3),
                          "min_s": round(min(times), 3), "max_s": round(max(times), 3)}), flush=True)


if __name__ == "__main__":
    main()
