"""Serving configuration in one typed place, read from `PNEUMONIA_*` environment variables.

Nested fields use a double underscore, e.g. `PNEUMONIA_BATCHING__MAX_BATCH_SIZE=16`
or `PNEUMONIA_LIMITS__MAX_PIXELS=40000000`. A JSON file named by
`PNEUMONIA_SETTINGS_FILE` is read first; environment variables override it.
Invalid values stop the server at start-up with a message naming the field, and
so does a `PNEUMONIA_*` variable that is neither a setting nor one of
`OTHER_VARIABLES` (a mistyped name would otherwise be ignored without a word:
`PNEUMONIA_SECURITY_API_KEYS`, with one underscore, left the service open).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import stat
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SecretStr, field_validator,
                      model_validator)
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from core.preprocess import InputLimits


# A file setting left empty (`PNEUMONIA_GRPC__TLS__CERTFILE=`, as a compose file passes an unset variable) is unset:
# as a path it read ".", "cannot be read: Is a directory".
OptionalPath = Annotated[Path | None, BeforeValidator(lambda v: None if isinstance(v, str) and not v.strip() else v)]
SMALL_FILE_BYTES = 1024 * 1024  # a settings or key file is a few lines; /dev/zero was read until memory ran out


def read_small_bytes(path: Path, what: str, kind: str = "a settings or key file") -> bytes:
    """The bytes of a small regular file, or ValueError naming `what`: a FIFO hung the start for good, /dev/zero
    filled the memory, a 300 MB file took 1.2 GB and 9 s."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} cannot be read: {'Is a directory' if stat.S_ISDIR(info.st_mode) else 'not a regular file'}")
    if info.st_size > SMALL_FILE_BYTES:
        raise ValueError(f"{what} {path} is {info.st_size:,} bytes; {kind} holds at most {SMALL_FILE_BYTES:,}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror}") from None


def read_small_text(path: Path, what: str, encoding: str = "utf-8") -> str:
    """`read_small_bytes` as text (UnicodeDecodeError when it is not `encoding`)."""
    return read_small_bytes(path, what).decode(encoding)


MAX_AUTO_WORKERS = 8  # each worker holds a model copy and a torch runtime (about 1 GB resident in the soak run)


def usable_cores() -> int:
    """CPU cores this process may run on (CPU affinity / cpuset), not the host's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class RateLimitSettings(BaseModel):
    """Per-client token bucket, keyed by API key (else client address), counted per worker process."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="true: clients over their rate get 429 with Retry-After")
    # At least one an hour: 1e-320 made the wait infinite and the rate limiter raise in every request it refused.
    # Bounded above: inf let every call through while the limit read enabled, and a burst past a float's range
    # (1e400) crashed every worker in a loop (a helper's find).
    requests_per_minute: float = Field(600.0, ge=1 / 60, le=1e6, description="sustained requests per client")
    burst: int = Field(30, ge=1, le=1_000_000, description="requests a client may send at once before the rate applies")
    max_clients: int = Field(10_000, ge=1, description="buckets kept; the least recently seen client is forgotten")


class CorsSettings(BaseModel):
    """Cross-origin browser access: off unless origins are listed."""

    model_config = ConfigDict(extra="forbid")

    allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="exact origins (scheme://host[:port]), comma separated in env; empty = off"
    )
    max_age_s: int = Field(600, ge=0, description="how long a browser may cache a preflight answer")

    @field_validator("allow_origins", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [o.strip() for o in value.split(",") if o.strip()] if isinstance(value, str) else value

    @field_validator("allow_origins")
    @classmethod
    def _exact(cls, origins: list[str]) -> list[str]:
        """Each origin as a browser sends it: lower case, without its scheme's default port. `https://App.Example.com`
        and `https://a.com:443` never matched a browser's `Origin` header (a helper's find)."""
        normalised = []
        for origin in origins:
            found = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+)(?::(\d{1,5}))?", origin)
            if not found:
                raise ValueError(f"CORS origin {origin!r} is not scheme://host[:port] (wildcards are not allowed)")
            scheme, host, port = found.group(1).lower(), found.group(2).lower(), found.group(3)
            if port is not None and not 1 <= int(port) <= 65535:
                raise ValueError(f"CORS origin {origin!r}: port {port} is not a port (1-65535)")
            default = port is None or int(port) == {"http": 80, "https": 443}[scheme]
            normalised.append(f"{scheme}://{host}" + ("" if default else f":{int(port)}"))
        return normalised


class SecuritySettings(BaseModel):
    """Access control for the HTTP and gRPC endpoints (serving/security.py applies it).

    API keys come from `api_keys` (comma separated, e.g. PNEUMONIA_SECURITY__API_KEYS)
    and/or `api_keys_file` (one per line, # comments on lines of their own); none configured = open service.
    """

    model_config = ConfigDict(extra="forbid")

    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated keys (at least 16 characters each)")
    api_keys_file: OptionalPath = Field(None, description="file with one key per line; read at start-up")
    protect_health: bool = Field(False, description="true: /health needs a key too (when keys are configured)")
    protect_metrics: bool = Field(False, description="true: /metrics needs a key too (when keys are configured)")
    rate_limit: RateLimitSettings = RateLimitSettings()
    cors: CorsSettings = CorsSettings()
    _keys: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _load_keys(self) -> "SecuritySettings":
        listed = self.api_keys.get_secret_value()
        keys = [k.strip() for k in listed.split(",")]
        if listed.strip() and not any(keys):  # "," or " , ": meant to list keys; an open service must be chosen
            raise ValueError("api_keys holds no key (only commas and blanks); give at least one key, or leave it "
                             "unset (empty) for an open service")
        # Where each key came from, for a message that names the place and never the key.
        places = [f"api_keys entry {n}" for n in range(1, len(keys) + 1)]
        if self.api_keys_file is not None:
            try:  # a Windows editor's BOM too
                lines = read_small_text(self.api_keys_file, "api_keys_file", encoding="utf-8-sig").splitlines()
            except UnicodeDecodeError:
                raise ValueError(f"api_keys_file {self.api_keys_file} is not UTF-8 text") from None
            from_file = [(n, line.strip()) for n, line in enumerate(lines, 1)
                         if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:  # an empty Secret must not quietly start an open service
                raise ValueError(f"api_keys_file {self.api_keys_file} holds no key (only blank or # lines); "
                                 "put one key per line, or unset api_keys_file for an open service")
            keys += [key for _, key in from_file]
            places += [f"{self.api_keys_file} line {n}" + (" (a # comment after the key: comments go on lines of "
                       "their own)" if re.search(r"\s#", key) else "") for n, key in from_file]
        # Printable ASCII: keys travel in an HTTP header and in gRPC metadata, which carry nothing else.
        bad = [place for key, place in zip(keys, places)
               if key and (len(key) < 16 or not (key.isascii() and key.isprintable()) or " " in key)]
        if bad:
            raise ValueError("every API key must be at least 16 printable ASCII characters without spaces; not so: "
                             + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
        self._keys = tuple(dict.fromkeys(k for k in keys if k))
        return self

    def keys(self) -> tuple[str, ...]:
        """The configured API keys (empty: authentication is off)."""
        return self._keys


class RequestLogSettings(BaseModel):
    """The service's own JSON-lines request log (serving/request_log.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="one JSON line per HTTP request on standard output")
    client_identifiers: bool = Field(
        False,
        description="also accept and log client-supplied identifiers: X-Request-ID, file names, "
        "client address, User-Agent (off: none of them reaches the logs)",
    )


class BatchingSettings(BaseModel):
    """BentoML adaptive batching bounds for `classify` (images per forward pass, wait budget)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: every request runs its own forward pass (for comparisons)")
    max_batch_size: int = Field(32, ge=2, le=512, description="most images in one forward pass")
    max_latency_ms: int = Field(  # at most 10 min: 1e400 crashed every worker in a loop (a helper's find)
        10_000, ge=10, le=600_000, description="latency bound of the dispatcher; requests that cannot meet it get 503"
    )
    dispatcher: Literal["eager", "bentoml"] = Field(
        "eager",
        description="eager: a batch starts as soon as the model is free, with everything queued, and a request gets "
        "503 only after waiting max_latency_ms (serving/batching.py); bentoml: BentoML's own CorkDispatcher, which "
        "holds batches back by a learned wait and sheds by a learned latency model (for comparisons)",
    )
    slots: int = Field(1, ge=1, le=8, description="batches that may run at once per worker (eager dispatcher)")


class ValiditySettings(BaseModel):
    """What the served model's input-validity gate (core/validity.py) does with an image it flags."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["refuse", "warn", "off"] = Field(
        "refuse",
        description="refuse: no verdict, status 'refused' with the reason; warn: answer anyway and put the reason in "
        "warnings (for sites that want to see everything); off: do not report the gate's findings",
    )


class ExplainSettings(BaseModel):
    """`POST /explain` and the Explain RPC: Grad-CAM heatmaps, computed with gradients off the classify batches.

    Per worker process: `max_concurrency` explanations compute at once, each on a thread
    and a private model copy of its own; `max_waiting` more wait for one; any call beyond
    those is refused at once with 503 (gRPC UNAVAILABLE) and Retry-After, so a burst of
    explanations cannot queue up work that would crowd out `classify`.
    """

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int = Field(
        1, ge=1, le=16, description="explanations computed at once per worker (each holds a model copy, a few MB)"
    )
    max_waiting: int = Field(2, ge=0, le=256, description="explanations waiting per worker before 503")
    retry_after_s: int = Field(2, ge=1, le=600, description="Retry-After of that 503, in seconds")
    nice: int = Field(
        10, ge=0, le=19,
        description="how much lower the explain threads' CPU priority is than classify's (Linux nice steps; "
        "0 = equal): when both want the cores, classify gets most of them (docs/performance.md)",
    )


def _check_tls_files(certfile: Path, keyfile: Path, client_ca_file: Path | None, pem: dict[str, bytes]) -> None:
    """Load the files as gRPC will, so that a certificate and key that do not belong together, or files that only
    look like PEM, stop the start-up here: gRPC itself would only fail to bind, in every worker, while HTTP
    reports the service ready. Python's ssl runs on OpenSSL, gRPC's on BoringSSL; both read the same PEM. `pem`
    holds the files' bytes as read once at start-up."""
    import ssl

    def problem(exc: ssl.SSLError) -> str:  # OpenSSL's reason code, where it gives one
        return f" ({exc.reason})" if exc.reason else ""

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # parses certificates only: tells a bad certfile from a bad keyfile
        probe.load_verify_locations(cafile=str(certfile))
    except ssl.SSLError as exc:
        raise ValueError(f"grpc.tls.certfile {certfile} holds no readable PEM certificate{problem(exc)}") from None
    try:  # an encrypted key meets the empty password instead of a prompt on the terminal
        probe.load_cert_chain(str(certfile), str(keyfile), password=lambda: b"")
    except ssl.SSLError as exc:
        key = pem["keyfile"]
        if exc.reason == "KEY_VALUES_MISMATCH" or (b"PRIVATE KEY-----" in key and b"ENCRYPTED" not in key):
            raise ValueError(f"grpc.tls.keyfile {keyfile} is not the private key of certfile {certfile} (a key of "
                             f"another certificate or of another type, or damaged){problem(exc)}") from None
        raise ValueError(f"grpc.tls.keyfile {keyfile} is not an unencrypted PEM private key{problem(exc)}") from None
    if client_ca_file is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=str(client_ca_file))
        except ssl.SSLError as exc:
            raise ValueError(f"grpc.tls.client_ca_file {client_ca_file} holds no readable PEM CA "
                             f"certificate{problem(exc)}") from None
    _check_not_expired(certfile)
    _check_grpc_takes(certfile, keyfile, client_ca_file, pem)


def _check_not_expired(certfile: Path) -> None:
    """An expired server certificate started without a word, and every client then failed its handshake with
    "certificate has expired" (a helper's find); one not valid yet fails them the same way ("not yet valid")."""
    import ssl
    import time

    try:  # CPython's own certificate decoder (no extra package); where it is missing, the check is skipped
        decoded = ssl._ssl._test_decode_cert(str(certfile))  # type: ignore[attr-defined]
        not_before, not_after = decoded["notBefore"], decoded["notAfter"]
        starts, ends = ssl.cert_time_to_seconds(not_before), ssl.cert_time_to_seconds(not_after)
    except (AttributeError, KeyError, ValueError, ssl.SSLError):
        return
    now = time.time()
    if ends < now:
        raise ValueError(f"grpc.tls.certfile {certfile} expired on {not_after}: every client would refuse it; "
                         "renew the certificate")
    if starts > now:
        raise ValueError(f"grpc.tls.certfile {certfile} is not valid before {not_before}: every client would refuse "
                         "it until then; check this machine's clock or the certificate's dates")


def _check_grpc_takes(certfile: Path, keyfile: Path, client_ca_file: Path | None, pem: dict[str, bytes]) -> None:
    """Hand the files to gRPC itself on a throwaway port: its TLS library (BoringSSL) refuses some that OpenSSL reads
    (brainpool curves, RSA-PSS and Ed448 keys, "TRUSTED CERTIFICATE" blocks), and then every worker served HTTP only,
    retrying a gRPC port it blamed, for good (a helper's find)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    ca = pem.get("client_ca_file")
    credentials = grpc.ssl_server_credentials([(pem["keyfile"], pem["certfile"])], root_certificates=ca,
                                              require_client_auth=ca is not None)
    trial = grpc.server(ThreadPoolExecutor(max_workers=1))
    try:
        trial.add_secure_port("127.0.0.1:0", credentials)
    except RuntimeError:
        raise ValueError(f"gRPC cannot use grpc.tls.certfile {certfile} with keyfile {keyfile}"
                         + (f" and client_ca_file {client_ca_file}" if ca is not None else "")
                         + " (tried on a throwaway 127.0.0.1 port): its TLS library takes RSA keys and EC keys on "
                         "NIST curves (P-256, P-384, P-521) in 'BEGIN CERTIFICATE' blocks, not brainpool curves, "
                         "RSA-PSS or Ed448 keys") from None
    finally:
        trial.stop(None)


class GrpcTlsSettings(BaseModel):
    """TLS of the gRPC port (the HTTP port's TLS is `bentoml serve --ssl-certfile/--ssl-keyfile`).

    Unset: plaintext. `certfile` and `keyfile` (PEM): TLS. Also `client_ca_file`:
    mutual TLS, every client must present a certificate signed by that CA. The
    files are read once at start-up; a missing or unreadable one stops the server.
    """

    model_config = ConfigDict(extra="forbid")

    certfile: OptionalPath = Field(None, description="server certificate chain (PEM); with keyfile: TLS on the gRPC port")
    keyfile: OptionalPath = Field(None, description="private key of certfile (PEM, unencrypted)")
    client_ca_file: OptionalPath = Field(
        None, description="CA certificates (PEM) clients' certificates must chain to: mutual TLS; needs certfile"
    )
    _pem: dict[str, bytes] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _read_files(self) -> "GrpcTlsSettings":
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("grpc.tls needs both certfile and keyfile (or neither)")
        if self.client_ca_file is not None and self.certfile is None:
            raise ValueError("grpc.tls.client_ca_file (mutual TLS) needs certfile and keyfile too")
        for name in ("certfile", "keyfile", "client_ca_file"):
            path = getattr(self, name)
            if path is None:
                continue
            data = read_small_bytes(path, f"grpc.tls.{name}", "a certificate or key file")  # a FIFO hung the start
            if b"-----BEGIN " not in data:
                raise ValueError(f"grpc.tls.{name} {path} is not a PEM file")
            if data.startswith(b"\xef\xbb\xbf"):  # OpenSSL reads past it, gRPC's BoringSSL does not
                raise ValueError(f"grpc.tls.{name} {path} starts with a UTF-8 byte-order mark, which gRPC cannot read; "
                                 "save it without one")
            self._pem[name] = data
        if self.certfile is not None and self.keyfile is not None:
            _check_tls_files(self.certfile, self.keyfile, self.client_ca_file, self._pem)
        return self

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    def pem(self, name: str) -> bytes | None:
        """The bytes of `certfile`, `keyfile` or `client_ca_file` as read at start-up (None when unset)."""
        return self._pem.get(name)


class GrpcSettings(BaseModel):
    """The gRPC endpoint (serving/grpc/), started inside every worker by `bentoml serve`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: HTTP only")
    host: str | None = Field(
        None, description="interface to bind; unset: the HTTP host of `bentoml serve` (its --host), so that "
        "`--host 127.0.0.1` keeps both ports on this machine")

    @field_validator("host")
    @classmethod
    def _no_wildcard(cls, host: str | None) -> str | None:
        # '*' resolves in Python (all interfaces), so the start-up check passed, but gRPC cannot bind it and every
        # worker then retried for good (a helper's find)
        if host is not None and "*" in host:
            raise ValueError(f"grpc.host {host!r}: write 0.0.0.0 (or ::) for every interface, not a wildcard")
        return host
    port: int = Field(3001, ge=1, le=65535, description="shared by all workers (SO_REUSEPORT)")
    shutdown_grace_s: float = Field(5.0, ge=0, le=3600, description="time in-flight calls get to finish on shutdown")
    shutdown_quiet_s: float = Field(
        1.0, ge=0, le=3600, description="on shutdown, calls are taken until none has started for this long (within the grace): "
        "grpcio hands a call over only once its request has arrived, and cancels those still arriving when it stops")
    tls: GrpcTlsSettings = GrpcTlsSettings()

    @property
    def address(self) -> str:
        """host:port as gRPC names it ([host]:port for an IPv6 address). An unset host, which `follow_http_host`
        fills in before the workers start, is BentoML's default HTTP host (all interfaces)."""
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.port}"


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PNEUMONIA_", env_nested_delimiter="__", extra="forbid", hide_input_in_errors=True  # values may be secrets
    )

    model: str = Field("production", description="'production' (resolved at start-up), a version or a full tag")
    workers: int = Field(
        0, ge=0, le=64,
        description="server processes, each with its own copy of the model; 0 = one per usable CPU core, at most "
        f"{MAX_AUTO_WORKERS} (each worker decodes uploads on its own event loop: 2 x 1 thread served 1.3x the "
        "images/s of 1 x 2 threads on 2 cores, docs/performance.md)",
    )
    torch_threads: int = Field(
        0, ge=0, le=256,  # beyond, thread creation fails in every worker, which circus restarts forever
        description="intra-op threads of each forward pass; 0 = cores / (workers x batching.slots), at least 1",
    )
    decode_threads: int = Field(
        0, ge=0, le=32,
        description="threads per worker that decode /classify and /explain uploads (HTTP and gRPC) before BentoML "
        "parses the request. 0 = decode "
        "on the worker's event loop while the request is parsed. Not the default: no measured throughput gain in "
        "three A/B runs (docs/performance.md)",
    )
    engine: Literal["eager", "folded", "torchscript", "onnxruntime"] = Field(
        "onnxruntime",
        description="how the forward pass runs (core/engines.py): onnxruntime = exported to ONNX and run by ONNX "
        "Runtime, measured fastest (docs/performance.md); torchscript = traced and frozen; folded = eager with "
        "BatchNorm folded; eager = as trained",
    )
    max_images_per_request: int = Field(16, ge=1, le=256)
    # gRPC takes both below as C ints: 2**31 or more put every worker in a start-up crash loop (OverflowError).
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, le=2**31 - 1, description="largest accepted request body")
    timeout_s: int = Field(60, ge=1, le=3600, description="request timeout")  # 1e400 crashed every worker in a loop
    max_concurrency: int = Field(
        256, ge=1, le=2**31 - 1,
        description="HTTP calls in flight per server, shared out over the workers, beyond which BentoML answers 429 "
        "(probes and /health are not counted); also the gRPC calls in flight per worker before RESOURCE_EXHAUSTED",
    )
    ready_wait_s: float = Field(
        5.0, ge=0, le=60, description="how long a classify call waits for a worker still warming up before its 503"
    )
    warmup_delay_s: float = Field(
        0.0, ge=0, le=600, description="TEST/OPS KNOB, keep 0: extra seconds before each worker loads its model"
    )
    warmup_release_file: Path | None = Field(
        None, description="TEST KNOB, keep unset: the warm-up delay ends early once this file exists (tests hold a "
        "server in its not-ready state for exactly as long as their checks take, however slow the machine)",
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans for HTTP requests (BentoML's tracing configuration, exporter and sample rate, "
        "then applies); off: BentoML's tracing middleware skips every route. Its default sample rate is 0, so without "
        "an exporter the spans went nowhere at a visible cost per request (docs/performance.md)",
    )
    limits: InputLimits = InputLimits()
    batching: BatchingSettings = BatchingSettings()
    security: SecuritySettings = SecuritySettings()
    request_log: RequestLogSettings = RequestLogSettings()
    grpc: GrpcSettings = GrpcSettings()
    validity: ValiditySettings = ValiditySettings()
    explain: ExplainSettings = ExplainSettings()

    def __init__(self, **values: Any) -> None:
        refuse_unknown_variables(os.environ)  # pydantic-settings skips unknown top-level names without a word
        super().__init__(**values)

    def worker_count(self) -> int:
        return self.workers or min(MAX_AUTO_WORKERS, usable_cores())

    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, usable_cores() // (self.worker_count() * self.batching.slots))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, SettingsFile(settings_cls))


class SettingsFile(JsonConfigSettingsSource):
    """pydantic-settings' JSON source for the file named by PNEUMONIA_SETTINGS_FILE (lowest priority).

    Unlike the library's default, a named file that is missing, unreadable,
    empty or not a JSON object is an error, with one line that says which.
    """

    ENV = "PNEUMONIA_SETTINGS_FILE"

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        path = os.environ.get(self.ENV)
        self._model = settings_cls  # the library reads the file before it keeps settings_cls
        super().__init__(settings_cls, json_file=Path(path) if path else None)

    @staticmethod
    def _existing_files(files: Any) -> list[Any]:
        """The named file, existing or not: reading a missing one says so instead of skipping it."""
        return [] if files is None else [files]

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        path = os.environ.get(self.ENV, str(file_path))
        try:
            values = json.loads(read_small_text(Path(file_path), self.ENV), object_pairs_hook=_distinct_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.ENV} {path} is not valid JSON: {exc}") from None
        except _RepeatedKey as exc:
            raise ValueError(f"{self.ENV} {path} names {exc} twice; keep one") from None
        if not isinstance(values, dict):
            raise ValueError(f"{self.ENV} {path} must hold a JSON object of settings")
        return _paths_beside(values, self._model, Path(file_path).parent)


class _RepeatedKey(Exception):
    """A settings file's object names one key twice (in any case)."""


def _distinct_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys differ even ignoring case: `{"workers": 2, "workers": 3}` read as 3 and
    `{"Workers": 3, "workers": 4}` as 3 (a helper's find), one value of two silently dropped either way."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key.lower() in seen:
            raise _RepeatedKey(repr(key))
        seen.add(key.lower())
    return dict(pairs)


def _paths_beside(values: dict[str, Any], model: type[BaseModel], folder: Path) -> dict[str, Any]:
    """`values` (a settings file's JSON object) with each relative path of a `Path` field made relative to `folder`,
    the file's own: a key file named beside the settings file was looked for in the server's working folder, which
    differs between `./dev.sh serve`, a container and a service manager."""
    fields = {name.lower(): field for name, field in model.model_fields.items()}
    resolved = dict(values)
    for key, value in values.items():
        field = fields.get(key.lower()) if isinstance(key, str) else None
        if field is None:
            continue  # pydantic names an unknown key
        kinds = {field.annotation, *typing.get_args(field.annotation)}
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if isinstance(value, dict) and section is not None:
            resolved[key] = _paths_beside(value, section, folder)
        elif Path in kinds and isinstance(value, str) and value.strip() and not Path(value).is_absolute():
            resolved[key] = str(folder / value)
    return resolved


# --------------------------------------------------------------------------- PNEUMONIA_* names that are not settings

PREFIX = "PNEUMONIA_"
# Every other PNEUMONIA_* variable the project reads (not the server): a server started with one of them in its
# environment (a shell that also runs the client, the tests or a load test) must not refuse it. Keep in step with
# their readers: a name missing here stops `bentoml serve` with "unknown environment variable".
OTHER_VARIABLES: dict[str, str] = {
    SettingsFile.ENV: "the JSON settings file (read by this module)",
    "PNEUMONIA_URL": "client/: default --url of the HTTP client",
    "PNEUMONIA_GRPC_URL": "client/, loadtests/: default gRPC address of the client and the Locust gRPC user",
    "PNEUMONIA_API_KEY": "client/: default --api-key of the client",
    "PNEUMONIA_DATA_DIR": "harness/, tests/, scripts/: the chest X-ray data set",
    "PNEUMONIA_UI_SCREENSHOT": "tests/test_ui.py: where to save the web page's screenshot",
    "PNEUMONIA_LOADTEST_GRPC": "loadtests/: add the gRPC user class",
    "PNEUMONIA_LOADTEST_WAIT_S": "loadtests/: think time between a user's requests",
    "PNEUMONIA_LOADTEST_STATS_JSON": "loadtests/: where Locust's final statistics go",
    "PNEUMONIA_LOADTEST_STOP_AFTER": "loadtests/: end the run after N requests of each type",
    "PNEUMONIA_LOADTEST_EXPLAIN_USERS": "loadtests/: users that call /explain",
    "PNEUMONIA_BASELINE_MODEL": "loadtests/baseline_fastapi.py: the model of the FastAPI baseline",
    "PNEUMONIA_PEER_MODEL": "loadtests/peer_fastapi.py: the model of the benchmark's peer",
    "PNEUMONIA_PEER_ENGINE": "loadtests/peer_fastapi.py: the engine of the benchmark's peer",
    "PNEUMONIA_PEER_NODELAY": "loadtests/peer_fastapi.py: TCP_NODELAY on the peer's sockets",
}


# What Kubernetes sets in every container for each Service of its namespace ("service links", on unless a pod says
# enableServiceLinks: false): NAME_SERVICE_HOST=10.0.0.11, NAME_SERVICE_PORT[_PORTNAME]=3000, NAME_PORT=tcp://...,
# NAME_PORT_3000_TCP[_PROTO|_PORT|_ADDR]. deploy/kubernetes' Service pneumonia-classifier gives PNEUMONIA_CLASSIFIER_*.
_SERVICE_LINK = re.compile(r"SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?")


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def service_links(environ: Mapping[str, str]) -> set[str]:
    """The names in `environ` that Kubernetes set for a Service: those of a NAME whose NAME_SERVICE_HOST is an IP
    address (a mistyped setting has no such companion, e.g. PNEUMONIA_GRPC_PORT=3001 stays unknown)."""
    services = {name.removesuffix("_SERVICE_HOST") for name, value in environ.items()
                if name.endswith("_SERVICE_HOST") and _is_ip_address(value)}
    return {name for name in environ for service in services
            if name == f"{service}_SERVICE_HOST"
            or (name.startswith(service + "_") and _SERVICE_LINK.fullmatch(name[len(service) + 1:]))}


def setting_variables(model: type[BaseModel] = ServingSettings, prefix: str = PREFIX) -> set[str]:
    """Every environment variable that sets a field of `model`: its leaves and, as JSON, its nested sections."""
    names = set()
    for field_name, field in model.model_fields.items():
        name = prefix + field_name.upper()
        names.add(name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= setting_variables(field.annotation, name + "__")
    return names


def suggestion(name: str, settings: set[str], others: frozenset[str] = frozenset(OTHER_VARIABLES)) -> str | None:
    """The known name `name` was most likely meant to be, if one is close enough (`name` in upper case)."""
    squeezed = {known.replace("_", ""): known for known in settings}
    if name.replace("_", "") in squeezed:  # PNEUMONIA_SECURITY_API_KEYS: one underscore where two belong
        return squeezed[name.replace("_", "")]
    nested = [known for known in settings if known.endswith("__" + name.removeprefix(PREFIX))]
    if nested:  # PNEUMONIA_API_KEYS: a nested setting without its section (PNEUMONIA_ENABLED: which one? no guess)
        return nested[0] if len(nested) == 1 else None
    close = difflib.get_close_matches(name, sorted(settings | others), n=1, cutoff=0.8)
    return close[0] if close else None


def refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """A `ValueError` naming every PNEUMONIA_* variable that is neither a setting nor in OTHER_VARIABLES (nor one
    Kubernetes set for a Service named pneumonia-...).

    Names only, never values (they may be secrets). A known name written in other than capitals is refused too:
    pydantic-settings read `pneumonia_workers` as PNEUMONIA_WORKERS, but `pneumonia_settings_file` was accepted
    and its file, API keys included, silently ignored (a helper's find), and two spellings of one setting were
    resolved by their order in the environment.
    """
    settings, links = setting_variables(), service_links(environ)
    unknown = sorted(name for name in environ if name.upper().startswith(PREFIX) and name not in links
                     and name.upper() not in settings and name.upper() not in OTHER_VARIABLES)
    if not unknown:
        _refuse_miscased(environ, links)
        return
    described = []
    for name in unknown:
        meant = suggestion(name.upper(), settings)
        described.append(f"{name} (did you mean {meant}?)" if meant else name)
    raise ValueError(
        f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(described)}: neither a setting "
        "(settings.py; nested ones are spelled with __) nor a variable the project reads elsewhere; rename or unset it"
    )


def _refuse_miscased(environ: Mapping[str, str], links: set[str]) -> None:
    miscased = sorted(name for name in environ if name.upper().startswith(PREFIX) and name != name.upper()
                      and name not in links)
    if miscased:
        raise ValueError(
            f"environment variable{'s' if len(miscased) > 1 else ''} "
            f"{', '.join(f'{name} (write {name.upper()})' for name in miscased)}: PNEUMONIA_* names are read in "
            "capitals only; rename or unset it")
