"""The classify batcher (serving/batching.py): its release policy in-process, and bursts against a live server.

In-process, with a fake model call that records the batches it gets: a batch starts at once
when the model is free, arrivals during a batch form the next one, at most `slots` batches
run at once, a request is shed (the 503 fallback) only after waiting `max_latency_ms`, a job
larger than the batch limit is split. Against a server: a burst of HTTP and gRPC calls right
after start-up is answered in full (BentoML's own dispatcher shed such bursts with 503
"process is overloaded" while its latency model was still untrained), and the service runs
the eager dispatcher unless told otherwise.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest

from api._proto.pneumonia.v1 import classifier_pb2 as pb
from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc
from harness.payloads import sample_xrays
from harness.servers import ServerProcess, start_server
from serving.batching import EagerDispatcher


class Overloaded(Exception):
    pass


def overloaded() -> None:
    raise Overloaded()


def dispatcher(max_batch: int = 8, slots: int = 1, max_latency_ms: int = 60_000) -> EagerDispatcher:
    return EagerDispatcher(max_latency_ms, max_batch, slots=slots, fallback=overloaded,
                           get_batch_size=lambda data: len(data), batch_dim=(0, 0))


def gated_model(batches: list[list[int]], gate: asyncio.Event | None = None, seconds: float = 0.0):
    """An async batch function that records its batches, waits for `gate` (the first batch only) or `seconds`,
    and answers each item doubled."""
    async def model(jobs: tuple[list[int], ...]) -> list[list[int]]:
        batches.append([x for job in jobs for x in job])
        if gate is not None and len(batches) == 1:
            await gate.wait()
        await asyncio.sleep(seconds)
        return [[2 * x for x in job] for job in jobs]
    return model


async def until(condition, steps: int = 1000) -> None:
    """Let the loop run until `condition()` holds (the dispatcher works in loop steps, not in wall-clock time)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_a_lone_request_starts_at_once_and_arrivals_during_a_batch_form_the_next() -> None:
    batches: list[list[int]] = []

    async def scenario() -> list:
        gate = asyncio.Event()
        call = dispatcher()(gated_model(batches, gate))
        first = asyncio.create_task(call([1]))
        await until(lambda: batches == [[1]])  # started without waiting for company
        rest = [asyncio.create_task(call([k])) for k in (2, 3, 4)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert batches == [[1]]  # one batch at a time (one slot): the others queue behind it
        gate.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == [[2], [4], [6], [8]]
    assert batches == [[1], [2, 3, 4]]  # everything that queued went in the next batch


def test_batches_respect_the_size_limit_and_split_a_large_job() -> None:
    batches: list[list[int]] = []

    async def scenario() -> list:
        gate = asyncio.Event()
        call = dispatcher(max_batch=4)(gated_model(batches, gate))
        blocker = asyncio.create_task(call([0]))
        await until(lambda: bool(batches))
        waiting = [asyncio.create_task(call([1, 2, 3])), asyncio.create_task(call([4, 5, 6]))]
        for _ in range(20):
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(blocker, *waiting)

    assert asyncio.run(scenario()) == [[0], [2, 4, 6], [8, 10, 12]]
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]  # the second job split across two batches of at most 4


def test_slots_bound_the_batches_running_at_once() -> None:
    running, peak = [0], [0]

    async def model(jobs: tuple[list[int], ...]) -> list[list[int]]:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1
        return list(jobs)

    for slots in (1, 2, 3):
        running[0] = peak[0] = 0

        async def scenario(slots: int = slots) -> list:
            call = dispatcher(max_batch=1, slots=slots)(model)
            return await asyncio.gather(*(call([k]) for k in range(8)))

        assert asyncio.run(scenario()) == [[k] for k in range(8)]
        assert peak[0] == slots


def test_a_request_is_shed_only_after_waiting_max_latency() -> None:
    batches: list[list[int]] = []

    async def scenario() -> list:
        gate = asyncio.Event()
        call = dispatcher(max_latency_ms=150)(gated_model(batches, gate))
        first = asyncio.create_task(call([1]))
        await until(lambda: bool(batches))
        late = asyncio.create_task(call([2]))
        await asyncio.sleep(0.3)  # it waits behind the first batch for longer than 150 ms
        gate.set()
        return await asyncio.gather(first, late, return_exceptions=True)

    first, late = asyncio.run(scenario())
    assert first == [2] and isinstance(late, Overloaded)  # the fallback: 503 "process is overloaded"
    assert batches == [[1]]

    async def burst() -> list:  # 400 images at once into a fresh dispatcher: none is shed on a guess
        call = dispatcher(max_batch=32)(gated_model([], seconds=0.001))
        return await asyncio.gather(*(call([k]) for k in range(400)))

    assert asyncio.run(burst()) == [[2 * k] for k in range(400)]


# ---------------------------------------------------------------- against a live server


@pytest.fixture(scope="module")
def fresh_server(production_tag: str, tmp_path_factory: pytest.TempPathFactory):
    """A two-worker server started for this module, measured right after readiness."""
    proc = start_server(tmp_path_factory.mktemp("batching") / "server.log", PNEUMONIA_WORKERS="2")
    try:
        yield proc
    finally:
        proc.stop()


def test_a_burst_right_after_start_up_is_answered_in_full(fresh_server: ServerProcess) -> None:
    datas = [p.read_bytes() for p in sample_xrays(4, offset=60)]  # 4 per class: 8 X-rays

    async def burst() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(fresh_server.grpc_target) as channel, \
                httpx.AsyncClient(timeout=120) as http:
            stub = pb_grpc.ClassifierStub(channel)
            grpc_calls = [stub.Classify(pb.ClassifyRequest(images=[pb.Image(data=d) for d in datas[:4]]), timeout=120)
                          for _ in range(16)]
            http_calls = [http.post(fresh_server.url + "/classify", files=[("images", ("x.jpeg", d)) for d in datas[4:]])
                          for _ in range(16)]
            results = await asyncio.gather(*grpc_calls, *http_calls, return_exceptions=True)
        return results[:16], results[16:]

    over_grpc, over_http = asyncio.run(burst())  # 128 images at once into freshly started workers
    problems = [r for r in over_grpc if isinstance(r, BaseException)]
    problems += [r.status_code if isinstance(r, httpx.Response) else r for r in over_http
                 if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert not problems, problems[:3]
    assert all(len(r.predictions) == 4 for r in over_grpc) and all(len(r.json()) == 4 for r in over_http)
    assert "overloaded" not in fresh_server.logs()


def test_decoded_on_threads_equals_decoded_on_the_loop(fresh_server: ServerProcess, tmp_path: Path) -> None:
    """The default (uploads decoded on the event loop) and PNEUMONIA_DECODE_THREADS=2 answer alike, refusals too,
    for /classify and /explain (whose uploads the decode threads took only since stop 41) and gRPC Explain."""
    xrays = sample_xrays(2, offset=70)
    files = [("images", (p.name, p.read_bytes())) for p in xrays]
    broken = b"\xff\xd8\xff not really a jpeg"
    files.append(("images", ("bad.jpeg", broken)))
    good = files[:-1]
    on_threads = start_server(tmp_path / "threads.log", PNEUMONIA_WORKERS="1", PNEUMONIA_DECODE_THREADS="2")
    try:
        answers = []
        for server in (fresh_server.wait_for_explainers(), on_threads.wait_for_explainers()):
            ok = httpx.post(server.url + "/classify", files=good, timeout=60)
            bad = httpx.post(server.url + "/classify", files=files, timeout=60)
            assert ok.status_code == 200 and bad.status_code == 400, (ok.text, bad.text)
            explained = httpx.post(server.url + "/explain", files={"image": ("x.jpeg", xrays[0].read_bytes())}, timeout=60)
            refused = httpx.post(server.url + "/explain", files={"image": ("bad.jpeg", broken)}, timeout=60)
            assert explained.status_code == 200 and refused.status_code == 400, (explained.text, refused.text)
            heatmap, prediction = explained.json()["heatmap"], explained.json()["prediction"]
            with grpc.insecure_channel(server.grpc_target) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                reply = stub.Explain(pb.ExplainRequest(image=pb.Image(data=xrays[0].read_bytes())), timeout=60)
                with pytest.raises(grpc.RpcError) as grpc_refusal:
                    stub.Explain(pb.ExplainRequest(image=pb.Image(data=broken)), timeout=60)
            assert reply.prediction.label == prediction["label"] and reply.heatmap.image_png.startswith(b"\x89PNG")
            assert grpc_refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            answers.append(([(i["label"], i["probability"], i["image"], i["warnings"]) for i in ok.json()], bad.json(),
                            (prediction["probability"], heatmap["grid"], heatmap["image_png"]), refused.json(),
                            reply.heatmap.image_png, grpc_refusal.value.details()))
    finally:
        on_threads.stop()
    assert answers[0] == answers[1]
    assert answers[0][1]["detail"][0]["loc"] == ["images", 4] and answers[0][1]["detail"][0]["type"] == "not_an_image"
    assert answers[0][3]["detail"][0]["loc"] == ["image"] and answers[0][3]["detail"][0]["type"] == "not_an_image"


def test_the_eager_dispatcher_is_installed(fresh_server: ServerProcess) -> None:
    health = httpx.post(fresh_server.url + "/health", json={}, timeout=30).json()
    assert health["batching"]["dispatcher"] == "eager" and health["batching"]["slots"] == 1
