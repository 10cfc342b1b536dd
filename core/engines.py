"""Inference engines: how a loaded model's forward pass is executed (same weights, same float32 maths).

- `eager`: the PyTorch module as trained (the reference; training and evaluation use it).
- `folded`: eager PyTorch with every BatchNorm folded into the convolution before it.
- `torchscript`: the module traced and frozen by TorchScript: BatchNorm folded, the
  graph run by the C++ interpreter, which also frees the GIL for the whole forward
  pass (the serving process decodes uploads on another thread meanwhile).
- `onnxruntime` (the service's default): the module exported to ONNX in memory when
  it is loaded (under a second) and run by ONNX Runtime's CPU provider, which fuses
  the MobileNet blocks further and also frees the GIL. It runs a batch in chunks of
  `ONNX_CHUNK` images, where its cost per image is lowest on this CPU; TorchScript
  is cheapest per image at large batches (docs/performance.md).

All are float32 and agree with eager to about 1e-6 in probability (tests/test_engines.py
holds them to 1e-4 on real X-rays, and the gate's features too); reduced-precision options were measured and
rejected: bfloat16 autocast moves probabilities by ~1e-2, and an int8 model (ONNX Runtime static quantisation)
by up to 0.13 while running slower than float32 here (docs/performance.md).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from core.model import PneumoniaNet, WithFeatures

Engine = Literal["eager", "folded", "torchscript", "onnxruntime"]
ENGINES: tuple[str, ...] = ("eager", "folded", "torchscript", "onnxruntime")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode module in which each Conv2d -> BatchNorm2d pair is one Conv2d."""
    module = copy.deepcopy(module).eval()
    for parent in module.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats):
                continue
            with torch.no_grad():
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
                fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
            parent._modules[first] = fused
            parent._modules[second] = nn.Identity()
    return module.to(memory_format=torch.channels_last)


Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# ONNX Runtime runs a batch as chunks of this many images: on one thread its cost per image rises with the batch
# (the activations leave the cache), and its memory arena keeps the largest activations it has seen. Measured through
# the service against whole batches of 32: 276 against 262 images/s at 32 clients, a worker's peak PSS 707 against
# 1,111 MiB (docs/performance.md).
ONNX_CHUNK = 4


def build_runner(module: PneumoniaNet, engine: Engine, image_size: int) -> Runner:
    """The callable that maps a normalised (N, 1, H, W) batch (what `to_tensor` makes) to
    (logits, pooled features): the classifier's answer and what the validity gate reads."""
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}; choose one of {', '.join(ENGINES)}")
    # A copy of its own: the feature hooks stay off the module that training or explanations call.
    tapped = WithFeatures(fold_batchnorm(module) if engine == "folded" else copy.deepcopy(module)).eval()
    if engine in ("eager", "folded"):
        return tapped
    example = torch.zeros(2, 1, image_size, image_size)  # grayscale grids; the module expands channels itself
    if engine == "onnxruntime":
        return onnxruntime_runner(onnx_export(tapped, example))
    with warnings.catch_warnings(), torch.inference_mode():
        # torch.jit is deprecated upstream in favour of torch.compile/export, which measured
        # slower here (and need a compiler at start-up); PNEUMONIA_ENGINE=folded avoids it.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(tapped, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def onnx_export(tapped: nn.Module, example: torch.Tensor) -> bytes:
    """The tapped module as an ONNX model (logits and gate features) with a dynamic batch axis."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(tapped, example, buffer, input_names=["pixels"], output_names=["logits", "features"],
                          dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
                          opset_version=17, dynamo=False)
    return buffer.getvalue()


def _onnxruntime():  # -> the onnxruntime module
    """ONNX Runtime, imported with its usage telemetry off. Its Linux wheels (1.29 on) record events about the
    process, CPU, models and sessions, with a device id, in ~/.cache/Microsoft/DeveloperTools and upload them to
    Microsoft; a hospital's server must not. The variable is read once, when the library initialises, and
    `ORT_DISABLE_TELEMETRY=1` then creates none of it (the runtime call `disable_telemetry_events()` still records
    a ProcessInfo event). An operator's own value of the variable stands."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def onnxruntime_runner(model: bytes) -> Runner:
    """An ONNX Runtime session of `model` on as many threads as torch has (the service sets them per worker), its
    thread pool sleeping between calls instead of spinning, fed in chunks of `ONNX_CHUNK` images."""
    onnxruntime = _onnxruntime()

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [session.run(None, {"pixels": chunk.contiguous().numpy()}) for chunk in pixels.split(ONNX_CHUNK)]
        return (torch.from_numpy(np.concatenate([logits for logits, _ in outputs])),
                torch.from_numpy(np.concatenate([features for _, features in outputs])))

    return run
