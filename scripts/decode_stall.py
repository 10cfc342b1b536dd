"""How long one slow-to-decode /explain upload holds concurrent /classify calls, with and without decode threads.

    python scripts/decode_stall.py               # 3 explains of a 7000x7000 16-bit PNG per setting
    python scripts/decode_stall.py --runs 5 --side 5000

For each setting (decoding on the event loop, the default; `PNEUMONIA_DECODE_THREADS=2`) it starts
`bentoml serve` with one worker on free 127.0.0.1 ports (a temporary model store with the shipped model
unless BENTOML_HOME is set), then, `--runs` times, explains the large PNG while classifying one real
X-ray back to back, and prints the slowest of those classify calls per run: median (min-max). An upload
decoded on the loop holds every other request of its worker until it is decoded.
"""

from __future__ import annotations

import argparse
import io
import statistics
import threading
import time

import httpx
import numpy as np
from PIL import Image

from core.cli import bounded, output_folder
from harness.paths import RESULTS
from harness.payloads import sample_xrays
from harness.servers import exit_with, kill_group, model_store, start_server

SETTINGS = {"on the event loop (default)": {}, "PNEUMONIA_DECODE_THREADS=2": {"PNEUMONIA_DECODE_THREADS": "2"}}


def slow_png(side: int) -> bytes:
    """A 16-bit PNG that compresses well (under the 20 MiB upload limit) but takes long to decode and resize."""
    y, x = np.mgrid[0:side, 0:side]
    out = io.BytesIO()
    Image.fromarray(((x * 9 + y * 3) % 65535).astype(np.uint16)).save(out, format="PNG")
    return out.getvalue()


def slowest_classify_during_explain(url: str, png: bytes, xray: bytes) -> float:
    """Seconds of the slowest classify call answered while the PNG was being explained."""
    status: list[int] = []
    explaining = threading.Thread(target=lambda: status.append(
        httpx.post(url + "/explain", files={"image": ("slow.png", png)}, timeout=300).status_code))
    explaining.start()
    slowest = 0.0
    while explaining.is_alive():
        started = time.perf_counter()
        httpx.post(url + "/classify", files=[("images", ("x.jpeg", xray))], timeout=300).raise_for_status()
        slowest = max(slowest, time.perf_counter() - started)
    explaining.join()
    if status != [200]:
        raise RuntimeError(f"the explain call answered {status}")
    return slowest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=bounded(int, 1, 100), default=3, help="explain calls per setting")
    parser.add_argument("--side", type=bounded(int, 64, 7071), default=7000,
                        help="side of the 16-bit PNG in pixels (at most the default 50-megapixel limit)")
    parser.add_argument("--out", type=output_folder, default=RESULTS / "decode-stall", help="folder for the server logs")
    args = parser.parse_args(argv)

    png, xray = slow_png(args.side), sample_xrays(1)[0].read_bytes()
    print(f"{args.side}x{args.side} 16-bit PNG, {len(png):,} bytes; slowest concurrent classify per explain call")
    with model_store():
        for name, env in SETTINGS.items():
            log = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{'threads' if env else 'loop'}.log"
            server = start_server(log, PNEUMONIA_WORKERS="1", **env)
            try:
                server.wait_for_explainers()
                stalls = [slowest_classify_during_explain(server.url, png, xray) for _ in range(args.runs)]
            finally:
                server.stop()
                kill_group(server)
            print(f"  {name:<30} median {statistics.median(stalls):.2f} s ({min(stalls):.2f}-{max(stalls):.2f}), "
                  f"runs: {', '.join(f'{s:.2f}' for s in stalls)}")
    return 0


if __name__ == "__main__":
    exit_with(main)
