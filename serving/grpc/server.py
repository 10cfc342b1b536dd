"""The `grpc.aio` server of one worker: started from the service's `@bentoml.on_startup` hook (service.py).

BentoML 1.4's service API cannot serve gRPC itself, so each worker starts a
`grpc.aio` server on its own event loop and binds `PNEUMONIA_GRPC__PORT` with
SO_REUSEPORT, which lets all workers share the port the way they share the
HTTP socket. Besides `pneumonia.v1.Classifier` (servicer.py) it serves the
standard health service (NOT_SERVING until the model is warm) and reflection.

`bentoml serve` checks that the port can be bound before any worker starts
(serving.lifecycle.check_grpc_port: exit 1 with one line) and holds it from then
on, so only this server's workers can bind it. A worker that still cannot bind
it does not fail: `WorkerGrpc` logs one line, serves HTTP and tries the port again (after
5 s, then twice as long each time, at most every minute), where an exception from
the start-up hook would crash the worker and circus would restart it every ~10 s
forever, HTTP never ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api.grpc import SERVICE_NAME, pb_grpc
from serving.grpc.interceptors import CallActivity, build_interceptors, grpcio_call_cap
from serving.grpc.servicer import Classifier, ClassifierServicer
from settings import ServingSettings

logger = logging.getLogger("bentoml.pneumonia.grpc")  # "bentoml.": BentoML's log configuration shows it

BIND_RETRY_S = (5.0, 60.0)  # a worker that could not bind the gRPC port tries again after 5 s, then less often


class BindError(RuntimeError):
    """The gRPC port of this worker cannot be bound (taken by another process, or not an address of this host)."""


@dataclass
class GrpcEndpoint:
    """A started gRPC server of one worker and the task that keeps its health status current."""

    server: grpc.aio.Server
    servicer: ClassifierServicer
    health: health.aio.HealthServicer
    address: str
    settings: ServingSettings
    activity: CallActivity
    _watcher: asyncio.Task | None = field(default=None, repr=False)

    async def watch_readiness(self, service: Classifier) -> None:
        """NOT_SERVING until the model is warm and the batched API reachable, then SERVING (re-checked every second)."""
        current = None
        while True:
            status = health_pb2.HealthCheckResponse.SERVING if service.is_serving() else health_pb2.HealthCheckResponse.NOT_SERVING
            if status != current:
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                logger.info("gRPC %s on %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status), self.address)
                current = status
            await asyncio.sleep(1.0 if status == health_pb2.HealthCheckResponse.SERVING else 0.02)

    async def stop(self) -> None:
        """NOT_SERVING first (load balancers drain), then let in-flight calls finish within the grace period:
        calls are still taken until none has started for `shutdown_quiet_s` and none runs (a call whose request
        is still arriving is invisible until it has arrived, and grpcio's stop would cancel it)."""
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
        grpc_settings, stopping = self.settings.grpc, time.monotonic()
        deadline = stopping + grpc_settings.shutdown_grace_s
        while (now := time.monotonic()) < deadline and (self.activity.running or now - max(
                stopping, self.activity.last_started) < grpc_settings.shutdown_quiet_s):  # quiet since the stop
            await asyncio.sleep(0.02)
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        logger.info("gRPC server on %s stopped", self.address)


async def start(service: Classifier, settings: ServingSettings) -> GrpcEndpoint:
    """Bind and start the gRPC server on the running event loop of this worker."""
    options = [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.so_reuseport", 1),  # all workers of this server share the port
    ]
    activity = CallActivity()
    server = grpc.aio.server(
        interceptors=[activity, *build_interceptors(settings, SERVICE_NAME)],
        options=options,
        maximum_concurrent_rpcs=grpcio_call_cap(settings),  # a backstop: the limit is AdmissionInterceptor's
    )
    servicer = ClassifierServicer(service, settings)
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):  # the servicer starts out SERVING for ""; not before the model is
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = settings.grpc.address
    tls = settings.grpc.tls
    try:
        if tls.enabled:  # TLS; with a client CA, mutual TLS (a client without a certificate it signed is refused)
            ca = tls.pem("client_ca_file")
            credentials = grpc.ssl_server_credentials(
                [(tls.pem("keyfile"), tls.pem("certfile"))], root_certificates=ca, require_client_auth=ca is not None
            )
            server.add_secure_port(address, credentials)
        else:
            server.add_insecure_port(address)
    except RuntimeError as exc:
        await server.stop(None)  # never started; lets go of what the server holds
        raise BindError(
            f"cannot bind the gRPC port {address} ({exc}); set PNEUMONIA_GRPC__PORT to a free port "
            "or PNEUMONIA_GRPC__ENABLED=false"
        ) from None
    await server.start()
    endpoint = GrpcEndpoint(server=server, servicer=servicer, health=health_servicer, address=address, settings=settings,
                            activity=activity)
    endpoint._watcher = asyncio.create_task(endpoint.watch_readiness(service), name="grpc-readiness")
    logger.info("gRPC server listening on %s (%s)", address,
                "mutual TLS" if tls.pem("client_ca_file") else "TLS" if tls.enabled else "plaintext")
    return endpoint


class WorkerGrpc:
    """The gRPC endpoint of one worker, started and stopped by the service's start-up and shutdown hooks.

    A port this worker cannot bind is logged once, without a stack trace; the worker serves HTTP meanwhile and
    tries the port again, after `retry_s[0]` seconds and then twice as long each time up to `retry_s[1]`, until
    it binds (the usual "gRPC server listening" line then follows). gRPC's own library logs each failed try.
    """

    def __init__(self, service: Classifier, settings: ServingSettings,
                 retry_s: tuple[float, float] = BIND_RETRY_S) -> None:
        self.service, self.settings, self.retry_s = service, settings, retry_s
        self.endpoint: GrpcEndpoint | None = None
        self._retry: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            self.endpoint = await start(self.service, self.settings)
        except BindError as exc:
            logger.error("%s; worker %d serves HTTP only and tries the gRPC port again in %g s, then less often",
                         exc, os.getpid(), self.retry_s[0])
            self._retry = asyncio.create_task(self._bind_later(), name="grpc-bind-retry")

    async def _bind_later(self) -> None:
        wait_s, most_s = self.retry_s
        while self.endpoint is None:
            await asyncio.sleep(wait_s)
            try:
                self.endpoint = await start(self.service, self.settings)
            except BindError:
                wait_s = min(2 * wait_s, most_s)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self.endpoint is not None:
            await self.endpoint.stop()
