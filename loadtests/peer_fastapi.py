"""COMPETENT PEER FOR COMPARISON ONLY, NOT THE SERVICE: FastAPI without batching, written with care.

What a careful engineer writes without a serving framework (issue 15):

- one uvicorn worker process per usable core (the benchmark starts it with
  `--workers N`), each with one torch thread (`torch.set_num_threads(1)`), so
  the workers do not fight over the cores;
- a plain `def` handler, which FastAPI runs in its threadpool: while one request
  decodes or runs its forward pass (PIL and torch release the GIL), the worker's
  event loop keeps reading the next requests, and several requests of one worker
  overlap;
- the project's own preprocessing (`core.preprocess.prepare`: validation, JPEG
  draft-mode decoding, the same resize and normalisation) and the model from
  the store (`models_registry.load_model`), with its calibration and validity
  gate (`LoadedModel.assess`); the images of one request go through one forward
  pass together (no batching across requests: that is what it lacks);
- one forward pass at a time per worker (a lock): the model keeps its gate
  features on the module (core/model.py `WithFeatures`), so two threads must not
  run it at once, and with one torch thread per worker a second one could not
  use the core anyway; decoding and the HTTP work still overlap with it;
- TCP_NODELAY on its connections: `uvicorn --workers N` binds its socket
  without a protocol number, so asyncio does not set TCP_NODELAY on the
  connections it accepts, and every answer (headers and body are two writes)
  then waits about 40 ms for the client's delayed ACK: 64 ms for a full-size
  image at 1 client instead of 20 ms (measured). A careful engineer who
  measured would fix it; this peer does (`PNEUMONIA_PEER_NODELAY=0` shows it);
- the engine is the registry's default (`eager`, the model as stored) unless
  `PNEUMONIA_PEER_ENGINE` names another (the benchmark's second peer runs the service's).

It lives under loadtests/, which the Bento excludes.

    PNEUMONIA_PEER_MODEL=production uvicorn loadtests.peer_fastapi:app --workers 2 --port 8000
    curl -F images=@xray.jpeg http://127.0.0.1:8000/classify
"""

from __future__ import annotations

import asyncio.base_events
import logging
import os
import socket
import threading

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, UploadFile

import models_registry
from core.preprocess import ImageRejected, InputLimits, prepare

torch.set_num_threads(1)


def _set_nodelay(sock: socket.socket) -> None:
    """asyncio's own, without its check of `sock.proto`, which is 0 on uvicorn's multi-worker sockets."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


if os.environ.get("PNEUMONIA_PEER_NODELAY", "1") != "0":
    asyncio.base_events._set_nodelay = _set_nodelay  # type: ignore[attr-defined]
model = models_registry.load_model(os.environ.get("PNEUMONIA_PEER_MODEL", "production"),
                                   engine=os.environ.get("PNEUMONIA_PEER_ENGINE", "eager"))  # type: ignore[arg-type]
card = model.card
limits = InputLimits()
model_lock = threading.Lock()
size = card.preprocess.image_size
for batch in (1, 4):  # first-call costs (kernels, buffers) before traffic, as the service does
    model.assess(np.zeros((batch, size, size), dtype=np.uint8))

app = FastAPI(title="Pneumonia X-ray classifier (competent FastAPI peer, not the service)")
logging.getLogger("uvicorn.error").warning("peer worker %d ready: model %s warm (%s)", os.getpid(), model.tag, model.engine)


@app.post("/classify")
def classify(images: list[UploadFile] = File(...)) -> list[dict]:
    """One or more X-rays in the multipart field `images`: one prediction each, in order."""
    prepared = []
    for index, upload in enumerate(images):
        try:
            prepared.append(prepare(upload.file.read(), card.preprocess, limits))
        except ImageRejected as exc:
            raise HTTPException(status_code=400, detail={"type": exc.reason, "loc": ["images", index], "msg": exc.message})
    pixels = np.stack([p.pixels for p in prepared])
    with model_lock:
        assessments = model.assess(pixels)
    results = []
    for assessment in assessments:
        valid = assessment.validity is None or assessment.validity.reason is None
        label = card.class_names[int(assessment.probability >= card.threshold)]
        results.append({"label": label, "probability": round(assessment.probability, 6), "threshold": card.threshold,
                        "valid": valid, "model": model.tag})
    return results
