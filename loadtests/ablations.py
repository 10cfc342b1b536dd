"""In-process measurements behind each "make it fast" decision (no HTTP).

    python -m loadtests.ablations [--only preprocess,forward,bf16,engines,int8,mirror,compile]

- preprocess: `prepare()` per image for the full-size and the small samples,
  with JPEG draft-mode decoding (as shipped) and without (draft disabled here only);
  and `to_tensor()` on a batch of 32 grids, on one thread as in a service worker: the
  uint8 route serving takes against the float route training's augmented batches take;
- forward: ms per image of the forward pass by memory layout (channels-last or
  not), torch threads and batch size;
- bf16 / engines / int8 / mirror / compile: bfloat16 autocast, the serving engines of
  core/engines.py (BatchNorm folded, TorchScript, ONNX Runtime), ONNX Runtime on an int8
  (statically quantised) model, the model without its test-time
  mirror view, and torch.compile: speed, and the largest
  probability difference to eager float32 plus label changes on real X-rays.

Prints a table and writes results/ablations.json. Service-level settings
(workers, threads, batching bounds) are measured with
`python -m loadtests.benchmark --systems service --service-env KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from core.cli import bounded, output_file
from harness import record
from harness.paths import DATA_DIR, RESULTS
from harness.payloads import build_samples
from harness.servers import answered


def per_call_ms(fn, min_s: float = 1.5, min_calls: int = 3) -> float:
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s or calls < min_calls:
        fn()
        calls += 1
    return 1000 * (time.perf_counter() - start) / calls


@contextmanager
def draft_disabled():
    """Make `Image.draft` a no-op, so JPEGs decode at full size (what prepare() avoids)."""
    from PIL import JpegImagePlugin

    original = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = original  # type: ignore[method-assign]


def preprocess_rows(samples, config) -> list[dict]:
    from core.preprocess import prepare

    rows = []
    for kind, items in (("full-size", samples.full), ("small 224 px", samples.small)):
        for draft in (True, False):
            with nullcontext() if draft else draft_disabled():
                ms = per_call_ms(lambda: [prepare(s.data, config) for s in items]) / len(items)
                pixels = np.stack([prepare(s.data, config).pixels for s in items])
            rows.append({"what": f"prepare() {kind}", "variant": "draft decode" if draft else "full decode",
                         "ms_per_image": round(ms, 2), "pixels": pixels})
    for kind in ("full-size", "small 224 px"):
        a, b = (r for r in rows if r["what"] == f"prepare() {kind}")
        diff = np.abs(a["pixels"].astype(int) - b["pixels"].astype(int))
        a["note"] = f"{b['ms_per_image'] / a['ms_per_image']:.1f}x faster than full decode; pixel diff mean {diff.mean():.2f}, max {diff.max()}"
    grids = np.resize(np.concatenate([r["pixels"] for r in rows if r["variant"] == "draft decode"]), (32, config.image_size, config.image_size))
    for r in rows:
        r.pop("pixels")
    return rows + to_tensor_rows(grids, config)


def to_tensor_rows(grids: np.ndarray, config) -> list[dict]:
    """ms per image of normalising 32 uint8 grids (serving's route) and the same grids as floats (training's)."""
    from core.preprocess import to_tensor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        floats = torch.from_numpy(grids).float() / 255
        uint8_ms = per_call_ms(lambda: to_tensor(grids, config)) / len(grids)
        float_ms = per_call_ms(lambda: to_tensor(floats, config)) / len(grids)
        delta = float((to_tensor(grids, config) - to_tensor(floats, config)).abs().max())
    finally:
        torch.set_num_threads(threads)
    return [{"what": "to_tensor() batch of 32", "variant": "uint8 grids (serving)", "ms_per_image": round(uint8_ms, 3),
             "note": f"{float_ms / uint8_ms:.1f}x faster than the float route; largest difference {delta:.1e}"},
            {"what": "to_tensor() batch of 32", "variant": "float grids (training)", "ms_per_image": round(float_ms, 3)}]


def real_pixels(samples, config, extra: int) -> np.ndarray:
    """The sample set plus `extra` more training images per class, through prepare()."""
    from core.preprocess import load_file, prepare

    pixels = [prepare(s.data, config).pixels for s in (*samples.small, *samples.full)]
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((DATA_DIR / "train" / name).iterdir())[1::max(1, 1000 // extra)][:extra]
        pixels.extend(load_file(p, config).pixels for p in files)
    return np.stack(pixels)


def forward_rows(model, pixels: np.ndarray) -> list[dict]:
    rows = []
    cores = os.cpu_count() or 1
    for layout in (torch.channels_last, torch.contiguous_format):
        model.module.to(memory_format=layout)
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            for batch in (1, 8, 32, 64):
                x = pixels[:batch] if len(pixels) >= batch else np.resize(pixels, (batch, *pixels.shape[1:]))
                ms = per_call_ms(lambda: model.probabilities(x)) / batch
                rows.append({"what": "forward", "variant": f"{'channels-last' if layout is torch.channels_last else 'contiguous'}, "
                             f"{threads} thread(s), batch {batch}", "ms_per_image": round(ms, 3)})
    model.module.to(memory_format=torch.channels_last)
    torch.set_num_threads(cores)
    return rows


def variant_rows(model, pixels: np.ndarray, which: list[str]) -> list[dict]:
    """bf16 autocast, the serving engines, no mirror view and torch.compile against eager float32, speed and accuracy."""
    from core.preprocess import to_tensor

    rows = []
    reference = np.concatenate([model.probabilities(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    labels = reference >= model.card.threshold
    x32 = pixels[:32]
    eager_ms = per_call_ms(lambda: model.probabilities(x32)) / 32
    rows.append({"what": "variant", "variant": "eager float32 (shipped)", "ms_per_image": round(eager_ms, 3)})

    def compare(name: str, fn) -> None:
        probs = np.concatenate([fn(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
        ms = per_call_ms(lambda: fn(x32)) / 32
        flips = int(((probs >= model.card.threshold) != labels).sum())
        delta = float(np.abs(probs - reference).max())
        rows.append({"what": "variant", "variant": name, "ms_per_image": round(ms, 3), "max_abs_prob_diff": delta,
                     "label_changes": flips, "images": len(pixels),
                     "note": f"{eager_ms / ms:.2f}x eager speed; max |dp| {delta:.2e}; {flips} label changes on {len(pixels)} real X-rays"})

    if "bf16" in which:
        def bf16(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.probabilities(x)
        compare("bfloat16 autocast", bf16)
    def scored(logits_of):
        """uint8 grids -> calibrated probabilities, through `logits_of` (normalised batch -> pneumonia logits)."""
        def run(x):
            with torch.inference_mode():
                return model.calibrated(logits_of(to_tensor(x, model.card.preprocess)).float())
        return run

    if "engines" in which:
        from core.engines import build_runner

        for engine in ("folded", "torchscript", "onnxruntime"):
            runner = build_runner(model.module, engine, model.card.preprocess.image_size)
            # A runner answers (logits, pooled features): the classifier's answer and what the validity gate reads.
            compare(f"engine {engine} (PNEUMONIA_ENGINE)", scored(lambda t, runner=runner: runner(t)[0]))
    if "int8" in which:
        compare("ONNX Runtime int8 (static, per-channel, QDQ; 100 calibration X-rays)", scored(lambda t, r=int8_runner(model): r(t)[0]))
    if "mirror" in which:  # the test-time mirror view (ModelSpec.tta_hflip): docs/model.md, framing views
        import copy

        single = copy.deepcopy(model.module)
        single.spec = single.spec.model_copy(update={"tta_hflip": False})
        compare("no mirror view (tta_hflip off; threshold not refitted)", scored(single))
    if "compile" in which:
        run_compiled = scored(torch.compile(model.module, dynamic=False))
        start = time.perf_counter()
        run_compiled(x32)
        rows.append({"what": "variant", "variant": "torch.compile (first call)", "ms_per_image": None,
                     "note": f"compilation took {time.perf_counter() - start:.0f} s"})
        compare("torch.compile (inductor)", run_compiled)
    return rows


def int8_runner(model):
    """The ONNX Runtime engine on an int8 model: weights per channel, activations calibrated on 100 training X-rays
    that the accuracy check does not use (every 20th from the 4th; `real_pixels` takes every 10th from the 2nd with the
    default --extra-images)."""
    import copy
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    from core.engines import onnx_export, onnxruntime_runner
    from core.model import WithFeatures
    from core.preprocess import load_file, to_tensor

    config = model.card.preprocess
    calibration = np.stack([load_file(p, config).pixels for name in ("NORMAL", "PNEUMONIA")
                            for p in sorted((DATA_DIR / "train" / name).iterdir())[3:1000:20]])

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": to_tensor(calibration[i:i + 8], config).numpy()}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    tapped = WithFeatures(copy.deepcopy(model.module)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        plain, prepared, quantised = (Path(tmp) / f"{name}.onnx" for name in ("plain", "prepared", "int8"))
        plain.write_bytes(onnx_export(tapped, torch.zeros(2, 1, config.image_size, config.image_size)))
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantised), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnxruntime_runner(quantised.read_bytes())


ABLATIONS = ("preprocess", "forward", "bf16", "engines", "int8", "mirror", "compile")


def ablation_names(text: str) -> list[str]:
    """An argparse `type=` for --only: a misspelt name measured nothing and wrote `rows: []` as a result."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {','.join(unknown) or repr(text)}; choose from {','.join(ABLATIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=ablation_names, default="preprocess,forward,bf16", help=",".join(ABLATIONS))
    p.add_argument("--model", default="production")
    p.add_argument("--extra-images", type=bounded(int, 1, 1300), default=100, help="training images per class added to the accuracy check")
    p.add_argument("--out", type=output_file, default=RESULTS / "ablations.json")
    p.add_argument("--threads", type=bounded(int, 0, 256), default=0,
                   help="torch (and ONNX Runtime) threads for the variant rows; 0: all cores (a service worker has 1)")
    args = p.parse_args(argv)
    provenance = record.provenance(argv)
    which = args.only
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from models_registry import load_model
    from models_registry.default import ensure_default

    print(ensure_default(), file=sys.stderr)
    model = load_model(args.model)
    samples = build_samples()
    rows: list[dict] = []
    if "preprocess" in which:
        rows += preprocess_rows(samples, model.card.preprocess)
    if {"forward", "bf16", "engines", "int8", "mirror", "compile"} & set(which):
        pixels = real_pixels(samples, model.card.preprocess, args.extra_images)
        if "forward" in which:
            rows += forward_rows(model, pixels)
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        rows += variant_rows(model, pixels, which)
    for r in rows:
        ms = "-" if r.get("ms_per_image") is None else f"{r['ms_per_image']:.3f}"
        print(f"{r['what']:<24} {r['variant']:<44} {ms:>9} ms/image  {r.get('note', '')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**record.finished(provenance), "model": model.tag, "cores": os.cpu_count(),
                                    "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(answered(main, "stopped"))  # a model not in the store, no sample folder: one line, not a traceback
