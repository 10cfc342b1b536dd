"""What both transports share: the default addresses, input normalisation and rejection messages."""

from __future__ import annotations

import math
import numbers
import os
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import LIMIT_REASONS, InvalidInput, LimitExceeded, ServerError
from .models import ImageUpload, Prediction

DEFAULT_HTTP_URL = "http://127.0.0.1:3000"
DEFAULT_GRPC_TARGET = "127.0.0.1:3001"
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 86400.0  # a day: longer is a typo, and 1e10 overflowed the clock

ImageInput = Union[str, os.PathLike, bytes, ImageUpload]


BYTES_LIKE = (bytes, bytearray, memoryview)


def file_name(path: str | os.PathLike) -> str:
    """The name a file is sent and shown under: its last part, with bytes that are not UTF-8 (a name from another
    system's encoding) replaced, since neither HTTP nor gRPC nor a terminal can carry them."""
    return os.fsencode(Path(path).name).decode("utf-8", "replace")


def as_uploads(images: Iterable[ImageInput] | ImageInput) -> list[ImageUpload]:
    """Paths are read (their name kept as filename), bytes sent as they are, uploads passed through."""
    if isinstance(images, (str, os.PathLike, ImageUpload, *BYTES_LIKE)):
        images = [images]
    uploads = []
    for image in images:
        if isinstance(image, ImageUpload):
            uploads.append(image)
        elif isinstance(image, BYTES_LIKE):
            uploads.append(ImageUpload(data=bytes(image)))
        elif isinstance(image, (str, os.PathLike)):
            uploads.append(ImageUpload(data=Path(image).read_bytes(), filename=file_name(image)))
        else:
            raise TypeError(f"cannot send {type(image).__name__} as an image; pass a path, bytes or ImageUpload")
    return uploads


def some_images(images: Iterable[ImageInput] | ImageInput) -> list[ImageUpload]:
    """`as_uploads`, refusing an empty list here, the same way on both transports (the servers' answers differ)."""
    uploads = as_uploads(images)
    if not uploads:
        raise InvalidInput("no images to classify: pass at least one", reasons=("no_images",))
    return uploads


def answered(predictions: Sequence[Prediction], uploads: Sequence[ImageUpload], status: str | int) -> list[Prediction]:
    """The predictions with the names and ids they were sent with, or ServerError unless there is one per image:
    an answer of another count (a proxy, another server) was zipped short, and gRPC's went on as if whole."""
    if len(predictions) != len(uploads):
        raise ServerError(f"{len(predictions)} predictions for {len(uploads)} images", status=status)
    # The HTTP API does not echo them (gRPC does); attached here so that both transports answer alike.
    return [p.model_copy(update={"filename": u.filename, "client_id": u.client_id}) for p, u in zip(predictions, uploads)]


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After value in seconds: delta-seconds (ASCII digits; a decimal is taken too) or an HTTP date (the
    seconds until then, at least 0); None for anything else. At most MAX_TIMEOUT_S: a wait of years is a typo."""
    from email.utils import parsedate_to_datetime
    import time

    value = (value or "").strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):  # str.isdigit() took '²', which float() refuses
        return min(float(value), MAX_TIMEOUT_S)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, round(when - time.time(), 3)), MAX_TIMEOUT_S)


def checked_timeout(seconds: float) -> float:
    """A positive, finite number of seconds, or ValueError: 0 failed at once over HTTP and meant the default over
    gRPC; a huge one overflowed the clock."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or math.isnan(seconds) \
            or not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout {seconds!r}: give a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f}")
    return float(seconds)


def checked_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers (HTTP) or metadata (gRPC), refused with ValueError unless each value is printable ASCII: a key
    read with its line end was printed whole by httpx and called "unreachable", a pasted typographic dash gave an
    encoding error (HTTP) or "Invalid metadata" (gRPC). The message names the header, never its value."""
    headers = dict(headers or {})
    for name, value in headers.items():
        if not isinstance(value, str) or any(not " " <= c <= "~" for c in value):
            raise ValueError(f"the {name} value is not printable ASCII (a line end read with the key, a typographic "
                             "dash or quote?); it was not sent")
    return headers


def rejection(details: Sequence[dict[str, Any]], uploads: Sequence[ImageUpload], status: str | int) -> InvalidInput:
    """The HTTP API's validation details -> the same exception and message the gRPC transport gives."""
    parts, reasons = [], []
    for detail in details:
        reason = str(detail.get("type", "invalid"))
        reasons.append(reason)
        index = next((p for p in detail.get("loc") or [] if isinstance(p, int)), None)
        message = str(detail.get("msg", reason))
        if index is not None and 0 <= index < len(uploads):
            name = uploads[index].filename
            parts.append(f"image {index}" + (f" ({name})" if name else "") + f": {message}")
        else:
            parts.append(message)
    cls = LimitExceeded if reasons and reasons[0] in LIMIT_REASONS else InvalidInput
    return cls("; ".join(parts) or "the server refused the input", status=status, reasons=tuple(reasons))


def redact(url: str) -> str:
    """`url` with the password of its user part (or a user part alone: a token) replaced, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url if "://" in url else f"//{url}")
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***" if parts.password is not None else "***"  # a token alone, as the user name
    shown = urlunsplit(parts._replace(netloc=f"{user}@{host}"))
    return shown if "://" in url else shown.removeprefix("//")


# grpcio's own target syntaxes (a socket, resolved addresses), passed on as they are.
GRPC_NATIVE_SCHEMES = ("unix:", "unix-abstract:", "ipv4:", "ipv6:")


def grpc_target(url: str | None, *, secure: bool = False) -> str:
    """'grpc://host:port' or 'host:port' -> 'host:port' (what grpc channels take); ValueError for anything else.

    A host without a port is refused over plaintext: grpcio would dial 443, the TLS port, where this service
    listens on 3001 by default. Over TLS (`secure`) it means 443, as for any TLS service behind a load balancer.
    """
    if not url:
        return DEFAULT_GRPC_TARGET
    target = url.strip()
    if target.startswith(GRPC_NATIVE_SCHEMES):
        return target
    for prefix in ("grpc://", "dns:///"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    target = target.rstrip("/")
    if "://" in target or "/" in target or not target:
        raise ValueError(f"{url!r} is not a gRPC address; use host:port or grpc://host:port")
    from urllib.parse import urlsplit

    parts = urlsplit(f"//{target}")
    port = _port(parts, url)
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError(f"{redact(url)!r}: a gRPC address is host:port and takes no user or password (give the "
                         "key with --api-key)")
    if port is None and not secure:
        raise ValueError(f"{url!r} has no port: give host:port (the service's gRPC default is 3001; a host alone "
                         "means 443, only with TLS)")
    return target


def _port(parts: Any, url: str) -> int | None:
    """The port of split `url`, or ValueError naming the address (out of range, not a number)."""
    try:
        return parts.port
    except ValueError as exc:
        raise ValueError(f"{redact(url)!r}: {exc}") from None


def http_base_url(url: str | None, secure: bool) -> str:
    """The service's base URL from what people type: `host:port` gets http:// (https:// when `secure`), a
    trailing slash goes; ValueError for an address with no host (`http:/host`), a query or a fragment, which were
    pasted into every request's path, or for a scheme other than http(s)."""
    from urllib.parse import urlsplit

    if not url and secure:  # the default server, over TLS: the TLS files say https
        url = DEFAULT_HTTP_URL.removeprefix("http://")
    url = (url or DEFAULT_HTTP_URL).strip().rstrip("/")
    if "://" not in url and re.match(r"(?i)https?:?/", url):  # `http:/host`, `http//host`: went to the host 'http'
        raise ValueError(f"{redact(url)!r}: a scheme needs '://' (http://host:port)")
    url = url if "://" in url else f"{'https' if secure else 'http'}://{url}"
    parts = urlsplit(url)
    _port(parts, url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{redact(url)!r}: use http:// or https:// (or --grpc for a gRPC address)")
    if not parts.hostname:
        raise ValueError(f"{redact(url)!r} names no host; use http://host:port")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"{redact(url)!r}: give the service's address without a query or fragment")
    if secure and parts.scheme.lower() == "http":  # the CA and client certificate would go unused
        raise ValueError(f"{redact(url)} is plain HTTP: the TLS files (--ca-file, --cert, --key) need an https:// URL")
    return url


@dataclass(frozen=True)
class TLS:
    """How a client trusts the server, and (mutual TLS) proves who it is; PEM files.

    `ca_file`: the CA (or self-signed certificate) the server's certificate must chain to; None = the system's
    trust store. `cert_file` and `key_file`: this client's certificate and key, for a server that requires one.
    HTTP uses it for https:// URLs; gRPC opens a TLS channel instead of a plaintext one.
    """

    ca_file: str | os.PathLike | None = None
    cert_file: str | os.PathLike | None = None
    key_file: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")

    def check(self) -> None:
        """Raise ValueError naming the file that is not what it should be (missing, not PEM, key of another
        certificate): gRPC would otherwise fail only when connecting, with its own words about handshakers."""
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        files = (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file))
        for name, path in files:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"the TLS {name} {path} is not a readable file")
        try:
            if self.ca_file is not None:
                probe.load_verify_locations(cafile=str(self.ca_file))
        except ssl.SSLError as exc:
            raise ValueError(f"the TLS ca_file {self.ca_file} holds no PEM certificate ({exc.reason or exc})") from None
        try:
            if self.cert_file is not None:
                probe.load_cert_chain(str(self.cert_file), str(self.key_file), password=lambda: b"")
        except ssl.SSLError as exc:
            raise ValueError(f"the TLS cert_file {self.cert_file} and key_file {self.key_file} are not a PEM "
                             f"certificate and its unencrypted key ({exc.reason or exc})") from None

    def ssl_context(self) -> ssl.SSLContext:
        """For httpx: verify the server against `ca_file` (or the system store), present the client certificate."""
        context = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), None if self.key_file is None else str(self.key_file))
        return context

    def grpc_credentials(self) -> Any:
        """`grpc.ChannelCredentials` of the same files."""
        import grpc

        def read(path: str | os.PathLike | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))
