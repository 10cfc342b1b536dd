"""The adaptive batcher of `classify`: a batch starts as soon as the model is free, with everything that waits.

BentoML's `CorkDispatcher` (bentoml/_internal/marshal/dispatcher.py) decides when to
release a batch from a model it fits while serving: the seconds a batch takes per
image (`o_a`, `o_b`) and the average time requests have waited. Under load that
average includes the time spent behind the running batch, so the dispatcher learns
to hold the next batch back for about as long as a batch runs: the model idles
while requests queue (measured: 8 clients kept 1.2 of 2 cores busy). It also
refuses requests (503 "process is overloaded") whenever that model predicts a
missed `max_latency_ms`; before it has seen any traffic its guess is 0.67 s per
image, so a burst of 15 or more images right after start-up was shed.

`EagerDispatcher` keeps BentoML's queue, job splitting, outbound call (so the
`bentoml_service_adaptive_batch_size` histogram and every error path stay as
they are) and its 503 fallback, and changes only the policy:

- a batch is released the moment an inference slot is free, with every queued
  image up to `max_batch_size`: while a batch runs, arrivals queue up and form
  the next one, so batches grow with the load and nothing waits on purpose;
- `slots` batches may run at once (default 1: one forward pass at a time per
  worker, whose torch threads use the worker's share of the cores);
- a request is refused (503) only when it has waited `max_latency_ms` without
  its batch starting: shedding follows the observed queue, never a prediction.

service.py installs it as the dispatcher of its batchable API (`install`).
"""

from __future__ import annotations

import functools
import logging
import time
import typing as t

from bentoml._internal.marshal.dispatcher import CorkDispatcher, Job, NonBlockSema

logger = logging.getLogger("bentoml.pneumonia.batching")


class EagerDispatcher(CorkDispatcher):
    """`CorkDispatcher` with the release policy described in the module docstring."""

    def __init__(self, max_latency_in_ms: int, max_batch_size: int, *, slots: int = 1, **kwargs: t.Any) -> None:
        kwargs.pop("shared_sema", None)
        super().__init__(max_latency_in_ms, max_batch_size, shared_sema=NonBlockSema(slots), **kwargs)
        self.slots = slots

    async def controller(self) -> None:
        while True:
            try:
                async with self._wake_event:  # until something waits and a slot is free
                    await self._wake_event.wait_for(lambda: bool(self._queue) and not self._sema.is_locked())
                now = time.time()
                while self._queue and now - self._queue[0].enqueue_time >= self.max_latency:
                    self._queue.popleft().future.cancel()  # waited too long: 503 (the fallback)
                if not self._queue:
                    continue
                self._sema.acquire()
                self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))
            except Exception:  # noqa: BLE001 - as BentoML's controller: log and keep dispatching
                logger.exception("error dispatching a batch")

    async def outbound_call(self, inputs_info: tuple[Job, ...], training: bool = False) -> None:
        try:
            await super().outbound_call(inputs_info, training)  # releases the slot when done
        finally:
            async with self._wake_event:  # a slot is free: the controller may release the next batch
                self._wake_event.notify_all()


def install(slots: int = 1) -> None:
    """Make BentoML build `EagerDispatcher`s for batchable APIs in this process.

    BentoML's app factory (`_bentoml_impl.server.app.ServiceAppFactory`) creates one
    dispatcher per batchable API by calling the `CorkDispatcher` name of its module
    when a worker builds its app, after importing the service: service.py calls
    this at import, so every worker's `classify` gets this policy.
    """
    import _bentoml_impl.server.app as app

    app.CorkDispatcher = functools.partial(EagerDispatcher, slots=slots)  # type: ignore[attr-defined]
