"""Locust user class for the gRPC endpoint: `pneumonia.v1.Classifier/Classify` with the HTTP suite's request mix.

How it is used: `loadtests/locustfile.py` imports `GrpcClassifyUser` into its own namespace when
PNEUMONIA_LOADTEST_GRPC=1, and Locust then runs it next to the HTTP `ClassifyUser`, so one tool
load-tests both protocols and reports them side by side (request type "gRPC", names like
"Classify [full-size]"). Pick one protocol with Locust's positional class arguments:

    PNEUMONIA_LOADTEST_GRPC=1 locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 GrpcClassifyUser

The gRPC address is PNEUMONIA_GRPC_URL (host:port) when set, else the Locust host's name with the port
PNEUMONIA_GRPC__PORT (the server's setting, default 3001). Each simulated user keeps one channel (one
HTTP/2 connection), like a real integration engine. A wrong answer (not one prediction per image, or a
label outside the model's classes) counts as a failure, as in the HTTP user.

grpcio needs `grpc.experimental.gevent.init_gevent()` under Locust's gevent before any channel exists;
importing this module does it.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, between, constant, task  # noqa: E402

from client import ClientError, GrpcClient, ImageUpload, Prediction  # noqa: E402
from harness.payloads import (  # noqa: E402
    MIX_WEIGHTS, MULTI_COUNT, SampleImage, api_key_headers, build_samples, well_formed)

_WAIT_S = float(os.environ.get("PNEUMONIA_LOADTEST_WAIT_S", "0"))


def grpc_target(host: str | None) -> str:
    """PNEUMONIA_GRPC_URL, else the Locust --host's name with the server's gRPC port."""
    explicit = os.environ.get("PNEUMONIA_GRPC_URL")
    if explicit:
        return explicit
    name = (urlparse(host).hostname if host and "://" in host else host) or "127.0.0.1"
    return f"{name}:{os.environ.get('PNEUMONIA_GRPC__PORT', '3001')}"


class GrpcClassifyUser(User):
    """A gRPC client of Classify (full-size, single and multi-image requests) and of the health check."""

    REQUEST_NAMES = ("Classify [full-size]", "Classify [single]", f"Classify [{MULTI_COUNT} images]", "Health/Check")
    wait_time = between(_WAIT_S / 2, _WAIT_S * 1.5) if _WAIT_S > 0 else constant(0)
    timeout_s = 60.0
    _samples = None

    def on_start(self) -> None:
        if GrpcClassifyUser._samples is None:
            GrpcClassifyUser._samples = build_samples()
        self.samples = GrpcClassifyUser._samples
        self.api = GrpcClient(grpc_target(self.host), timeout=self.timeout_s, headers=api_key_headers())
        self._counter = id(self) % 97

    def on_stop(self) -> None:
        self.api.close()

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def _call(self, name: str, images: list[SampleImage]) -> None:
        uploads = [ImageUpload(data=s.data, filename=s.name) for s in images]
        started = time.perf_counter()
        exception: Exception | None = None
        predictions: list[Prediction] = []
        try:
            predictions = self.api.classify(uploads)
            if len(predictions) != len(images):
                raise AssertionError(f"expected {len(images)} predictions, got {len(predictions)}")
            if not all(well_formed(p.model_dump()) for p in predictions):
                raise AssertionError(f"malformed prediction in {[p.model_dump() for p in predictions]!r:.200}")
        except (ClientError, AssertionError) as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="gRPC",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=sum(len(u.data) for u in uploads),
            exception=exception,
            context={},
        )

    @task(MIX_WEIGHTS["full"])
    def full_size(self) -> None:
        self._call("Classify [full-size]", [self.samples.full[self._next() % len(self.samples.full)]])

    @task(MIX_WEIGHTS["single"])
    def single(self) -> None:
        self._call("Classify [single]", [self.samples.small[self._next() % len(self.samples.small)]])

    @task(MIX_WEIGHTS["multi"])
    def multi(self) -> None:
        start = self._next()
        images = [self.samples.small[(start + i) % len(self.samples.small)] for i in range(MULTI_COUNT)]
        self._call(f"Classify [{MULTI_COUNT} images]", images)

    @task(MIX_WEIGHTS["health"])
    def health(self) -> None:
        started = time.perf_counter()
        exception: Exception | None = None
        try:
            if not self.api.ready():
                raise AssertionError("health check says NOT_SERVING")
        except (ClientError, AssertionError) as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="gRPC",
            name="Health/Check",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=exception,
            context={},
        )
