"""Locust suite: clients sending real chest X-rays to the classification service.

    python -m loadtests.run_locust --users 32 --duration 60         # starts a service, writes reports
    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000  # Locust's own UI against a running one

`ClassifyUser` (HTTP, geventhttpclient-based FastHttpUser: light enough that the
load generator does not eat the cores it measures) sends the request mix of
`harness.payloads.MIX_WEIGHTS`: full-size radiographs, single small images,
four-image requests and health probes. Every answer is checked (status, one
prediction per image, a label from the model's classes), so a wrong answer
counts as a failure, not as a fast success.

`ExplainUser` (POST /explain, one image at a time, back to back) joins the run
when PNEUMONIA_LOADTEST_EXPLAIN_USERS=N is set (`run_locust --explain-users N`):
exactly N of the users explain, the rest classify, which shows whether a burst
of explanations slows classification down. An explanation the server turns away
(503 `explain_busy`, every explain slot taken) is its designed answer to such a
burst: it is recorded as "/explain [busy 503]", not as a failure, and that user
waits the Retry-After the server sent before trying again.

Set PNEUMONIA_LOADTEST_GRPC=1 to add the gRPC user class (`loadtests.grpc_user`)
to the same run; pick classes with Locust's
positional user-class arguments as usual. PNEUMONIA_LOADTEST_WAIT_S sets a think
time per user (default 0: a closed loop that measures capacity).
PNEUMONIA_LOADTEST_STOP_AFTER=N ends the run once every request type was sent N
times (smoke runs; `run_locust --stop-after N`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gevent
from locust import between, constant, events, task
from locust.contrib.fasthttp import FastHttpUser

from harness.payloads import (LABELS, MIX_WEIGHTS, MULTI_COUNT, SampleImage, api_key_headers, build_samples,
                              encode_multipart, well_formed)

SAMPLES = build_samples()
STATS_JSON_ENV = "PNEUMONIA_LOADTEST_STATS_JSON"
PERCENTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}
_WAIT_S = float(os.environ.get("PNEUMONIA_LOADTEST_WAIT_S", "0"))
EXPLAIN_USERS_ENV = "PNEUMONIA_LOADTEST_EXPLAIN_USERS"
_EXPLAIN_USERS = int(os.environ.get(EXPLAIN_USERS_ENV, "0") or 0)


def _check_predictions(response, expected: int) -> None:
    """Mark the Locust response failed unless it holds `expected` well-formed predictions."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {response.text[:200] if response.text else ''}")
        return
    try:
        predictions = response.json()
    except ValueError:
        response.failure("the answer is not JSON")
        return
    if not isinstance(predictions, list) or len(predictions) != expected:
        response.failure(f"expected {expected} predictions, got {predictions!r:.200}")
    elif not all(well_formed(p) for p in predictions):
        response.failure(f"malformed prediction in {predictions!r:.200}")
    else:
        response.success()


class ClassifyUser(FastHttpUser):
    """An HTTP client of POST /classify and POST /health with a realistic request mix."""

    REQUEST_NAMES = ("/classify [full-size]", "/classify [single]", f"/classify [{MULTI_COUNT} images]", "/health")
    wait_time = between(_WAIT_S / 2, _WAIT_S * 1.5) if _WAIT_S > 0 else constant(0)
    network_timeout = 60.0
    connection_timeout = 10.0

    def _classify(self, images: list[SampleImage], name: str) -> None:
        body, content_type = encode_multipart(images)
        with self.client.post(
            "/classify", data=body, headers={"Content-Type": content_type, **api_key_headers()}, name=name,
            catch_response=True
        ) as response:
            _check_predictions(response, len(images))

    @task(MIX_WEIGHTS["full"])
    def full_size(self) -> None:
        self._classify([SAMPLES.full[self._next() % len(SAMPLES.full)]], "/classify [full-size]")

    @task(MIX_WEIGHTS["single"])
    def single(self) -> None:
        self._classify([SAMPLES.small[self._next() % len(SAMPLES.small)]], "/classify [single]")

    @task(MIX_WEIGHTS["multi"])
    def multi(self) -> None:
        start = self._next()
        images = [SAMPLES.small[(start + i) % len(SAMPLES.small)] for i in range(MULTI_COUNT)]
        self._classify(images, f"/classify [{MULTI_COUNT} images]")

    @task(MIX_WEIGHTS["health"])
    def health(self) -> None:
        with self.client.post("/health", json={}, headers=api_key_headers(), name="/health",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif response.json().get("ready") is not True:
                response.failure("service reports not ready")
            else:
                response.success()

    def _next(self) -> int:
        self._counter = getattr(self, "_counter", id(self) % 97) + 1
        return self._counter


class ExplainUser(FastHttpUser):
    """A reviewer's client: POST /explain with one image (full-size and small, alternately), back to back."""

    REQUEST_NAMES = ("/explain [explained]",)  # "/explain [busy 503]" appears only when the slots are taken
    fixed_count = _EXPLAIN_USERS  # exactly this many of the run's users; the others are ClassifyUsers
    wait_time = constant(0)
    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def explain(self) -> None:
        self._counter = getattr(self, "_counter", id(self) % 97) + 1
        pool = SAMPLES.full if self._counter % 2 else SAMPLES.small
        body, content_type = encode_multipart([pool[self._counter % len(pool)]], field="image")
        wait = 0.0
        with self.client.post("/explain", data=body, headers={"Content-Type": content_type, **api_key_headers()},
                              name="/explain [explained]", catch_response=True) as response:
            text = response.text or ""
            if response.status_code == 503 and "explain_busy" in text:
                response.request_meta["name"] = "/explain [busy 503]"
                wait = float(response.headers.get("retry-after", "1") or 1)
                response.success()
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {text[:200]}")
            else:
                try:
                    answer = response.json()
                    ok = answer["prediction"]["status"] == "refused" or (
                        answer["prediction"]["label"] in LABELS and answer["heatmap"]["overlay_png"])
                except (ValueError, KeyError, TypeError):
                    ok = False
                if ok:
                    response.success()
                else:
                    response.failure(f"malformed explanation {text[:200]!r}")
        if wait:
            gevent.sleep(wait)  # honour Retry-After


if not _EXPLAIN_USERS:  # without the variable, the suite is the classify mix alone
    del ExplainUser

if os.environ.get("PNEUMONIA_LOADTEST_GRPC", "").lower() in ("1", "true", "yes"):
    from loadtests.grpc_user import GrpcClassifyUser  # noqa: F401  (Locust collects it from this module)


STOP_AFTER_ENV = "PNEUMONIA_LOADTEST_STOP_AFTER"


@events.test_start.add_listener
def _stop_after_enough_requests(environment, **_kwargs) -> None:
    """With PNEUMONIA_LOADTEST_STOP_AFTER=N, end the run once every request type of the running user classes
    (their REQUEST_NAMES) has been sent N times: a smoke run then ends by what it did, not by the clock
    (`--run-time` stays as the upper bound), so a slow machine makes it longer, never emptier."""
    wanted = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    names = {name for cls in environment.user_classes for name in getattr(cls, "REQUEST_NAMES", ())}
    if wanted <= 0 or not names:
        return

    def watch() -> None:
        while True:
            gevent.sleep(0.2)
            done = {entry.name: entry.num_requests for entry in environment.stats.entries.values()}
            if all(done.get(name, 0) >= wanted for name in names):
                environment.runner.quit()
                return

    gevent.spawn(watch)


@events.init.add_listener
def _refresh_event_loop_clock(**_kwargs) -> None:
    """Resync gevent's cached loop time after the blocking start-up (sample building, imports).

    Without it, `--run-time` is measured from a stale clock and a short run
    ends seconds early (a 2 s run stopped after 35 ms).
    """
    import gevent

    gevent.get_hub().loop.update_now()


def _entry_figures(entry) -> dict:
    return {
        "type": entry.method or "",
        "name": entry.name,
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "requests_per_s": entry.total_rps,
        **{key: entry.get_response_time_percentile(q) if entry.num_requests else 0.0 for key, q in PERCENTILES.items()},
        "max_ms": entry.max_response_time or 0.0,
    }


@events.quitting.add_listener
def _write_final_stats(environment, **_kwargs) -> None:
    """Dump the final statistics as JSON for `run_locust`'s summary.

    Locust's CSV is written by a timer and can miss the last second of a run
    (a short run's CSV even missed every request), so the summary reads the
    final in-memory statistics instead.
    """
    path = os.environ.get(STATS_JSON_ENV)
    if not path:
        return
    stats = environment.stats
    rows = [_entry_figures(entry) for entry in stats.entries.values()]
    Path(path).write_text(json.dumps({"by_request": rows, "aggregated": _entry_figures(stats.total)}, indent=2))
