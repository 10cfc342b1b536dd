"""NAIVE PEER FOR COMPARISON ONLY, NOT THE SERVICE: a plain FastAPI pneumonia API in the seeds' style.

The benchmark's "naive peer, seeds' style" rows. Written the way most open-source
pneumonia X-ray APIs (the seeds this project started from) are: one `POST` endpoint,
each upload decoded fully with PIL, torchvision transforms, one image per
forward pass, inference inline in an `async def` handler, a single uvicorn
worker. It serves the same weights with the same label semantics (the stored
temperature and threshold) so the benchmark compares serving, not models. Inference inside
`async def` blocks the event loop, so it serves one request at a time: the
benchmark's honest comparison is the competent peer (`loadtests/peer_fastapi.py`).
It lives under loadtests/, which the Bento excludes.

    PNEUMONIA_BASELINE_MODEL=production uvicorn loadtests.baseline_fastapi:app --port 8000
    curl -F images=@xray.jpeg http://127.0.0.1:8000/classify
"""

from __future__ import annotations

import io
import os

import torch
import torchvision.transforms as T
from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image

import models_registry
from core.preprocess import to_tensor

# The registry is used only to fetch the weights and their calibration; the
# decoding and resizing below deliberately do not use the project's preprocessing.
_loaded = models_registry.load_model(os.environ.get("PNEUMONIA_BASELINE_MODEL", "production"))
model = _loaded.module.to(memory_format=torch.contiguous_format).eval()
card = _loaded.card
size = card.preprocess.image_size
transform = T.Compose([T.Grayscale(num_output_channels=1), T.Resize((size, size)), T.ToTensor()])

app = FastAPI(title="Pneumonia X-ray classifier (naive FastAPI baseline, not the service)")


def normalise(x: torch.Tensor) -> torch.Tensor:
    """The model's own normalisation for a (1, H, W) tensor in [0, 1]: part of what the weights mean, so it is
    the one step taken from the project (decoding and resizing above stay the seeds' own)."""
    return to_tensor(x, card.preprocess)[0]


@app.post("/classify")
async def classify(images: list[UploadFile] = File(...)) -> list[dict]:
    results = []
    for upload in images:
        try:
            image = Image.open(io.BytesIO(await upload.read()))
            image.load()
        except Exception:
            raise HTTPException(status_code=400, detail=f"{upload.filename} is not a readable image") from None
        x = normalise(transform(image)).unsqueeze(0)
        with torch.no_grad():
            logit = model(x).item()
        probability = torch.sigmoid(torch.tensor(logit / card.temperature)).item()
        label = card.class_names[int(probability >= card.threshold)]
        results.append({"label": label, "probability": round(probability, 6), "filename": upload.filename})
    return results
