"""Upload routes: parse the multipart body while it arrives, and hand BentoML a canonical copy.

The copy holds only file parts of the upload field, renamed `image-0, image-1, ...`
under a boundary of our own. BentoML never sees a text value in a file field
(which it would download as a URL: SSRF), a client's file name (which would end
up in temporary paths and logs), a wrong content type, a truncated or malformed
multipart body, or more images than allowed; each of those is refused here with
a precise 400.
"""

from __future__ import annotations

import itertools
import re
import secrets
import urllib.parse
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from serving.answers import REJECTED
from serving.request_log import printable
from serving.http.responses import GuardError


# The canonical body's boundary: a random prefix per process (never sent to clients, 96 bits) and a counter. A fresh
# secrets.token_hex per request read the kernel's random source each time, a visible share of a worker's event loop.
_BOUNDARY_PREFIX = b"pneumonia-" + secrets.token_hex(12).encode()
_BOUNDARY_COUNTER = itertools.count()


_EXTENDED_FILENAME = re.compile(rb";\s*filename\*\s*=\s*([^;]*)", re.IGNORECASE)


def _extended_filename(disposition: bytes | None) -> bytes | None:
    """The name of an RFC 5987 `filename*=UTF-8''...` parameter (percent-decoded), which python-multipart's
    parse_options_header drops: a file part that gave only it was refused as text (`not_a_file`)."""
    match = _EXTENDED_FILENAME.search(disposition or b"")
    if match is None:
        return None
    value = match.group(1).strip().strip(b'"')
    _, _, encoded = value.partition(b"''")  # charset'language'value
    return urllib.parse.unquote_to_bytes(encoded or value)


class MultipartCanon:
    """Streams a multipart body through python-multipart and writes a canonical copy.

    The copy holds only the file parts of `field`, with a boundary and file
    names of our own; anything else is either refused at once (a text value in
    the file field, too many files, unparseable data) or collected as an
    unexpected field and refused when the body ends.
    """

    def __init__(self, boundary: bytes, field_name: str, max_files: int, out: BinaryIO) -> None:
        self.field = field_name.encode()
        self.field_name = field_name
        self.max_files = max_files
        self.out = out
        self.boundary = b"%s-%x" % (_BOUNDARY_PREFIX, next(_BOUNDARY_COUNTER))
        self.count = 0
        self.file_names: list[str] = []
        self.parts: list[tuple[int, int]] = []  # (start, end) offsets of each file's bytes in `out`
        self._start = 0
        self.unexpected: list[str] = []
        self.ended = False
        self._in_file = False
        self._name = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        try:
            self.parser = MultipartParser(
                boundary,
                callbacks={
                    "on_part_begin": self._part_begin,
                    "on_header_field": lambda d, s, e: self._name.extend(d[s:e]),
                    "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
            )
        except Exception:
            raise GuardError(400, "malformed_multipart", "the multipart boundary is not valid") from None

    @property
    def content_type(self) -> bytes:
        return b"multipart/form-data; boundary=" + self.boundary

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except GuardError:
            raise
        except Exception:
            raise GuardError(
                400,
                "malformed_multipart",
                "the multipart body could not be parsed (check its boundary and part headers)",
            ) from None

    def finish(self, received: int) -> None:
        """Refuse what only the end of the body reveals."""
        missing = {
            "type": "missing",
            "loc": [self.field_name],
            "msg": (f"no image: send the X-ray as a file in the multipart field '{self.field_name}'" if self.max_files == 1
                    else f"no images: send the X-rays as files in the multipart field '{self.field_name}'"),
        }
        if received == 0:
            raise GuardError(400, "missing", missing["msg"], (self.field_name,))
        if not self.ended:
            raise GuardError(400, "malformed_multipart", "the multipart body ended before its closing boundary")
        extra = [
            {"type": "unexpected_field", "loc": ["form", name], "msg": f"unexpected form field {name!r}"}
            for name in dict.fromkeys(self.unexpected)
        ][:8]
        if self.count == 0:
            raise GuardError(400, "missing", missing["msg"], (self.field_name,), more=extra)
        if extra:
            first = extra[0]
            message = f"{first['msg']}; send only files in the field '{self.field_name}'"
            raise GuardError(400, "unexpected_field", message, tuple(first["loc"]), more=extra[1:])

    # python-multipart callbacks
    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _header_end(self) -> None:
        self._headers[bytes(self._name).strip().lower()] = bytes(self._value).strip()
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        kind, params = parse_options_header(disposition) if disposition else (b"", {})
        if kind.lower() != b"form-data" or b"name" not in params:
            raise GuardError(400, "malformed_multipart", "a multipart part is not a named form-data field")
        name = params[b"name"]
        if name != self.field:
            self.unexpected.append(printable(name))
            return
        filename = params.get(b"filename")
        if filename is None:  # parse_options_header drops RFC 5987's filename*=: read from the header itself
            filename = _extended_filename(disposition)
        if filename is None:
            raise GuardError(
                400,
                "not_a_file",
                f"'{self.field_name}' values must be uploaded files (multipart parts with a filename), not text",
                (self.field_name,) if self.max_files == 1 else (self.field_name, self.count),  # as the validators
            )
        if self.count >= self.max_files:
            message = (f"send one image per request, in the field '{self.field_name}'" if self.max_files == 1 else
                       f"more than {self.max_files} images in one request; the limit is {self.max_files}")
            REJECTED.labels(reason="too_many_images").inc()  # as gRPC counts it (service.prepare_images)
            raise GuardError(400, "too_many_images", message, (self.field_name,))
        self.file_names.append(printable(filename))
        self.out.write(
            b'--%s\r\nContent-Disposition: form-data; name="%s"; filename="image-%d"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" % (self.boundary, self.field, self.count)
        )
        self.count += 1
        self._in_file = True
        self._start = self.out.tell()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.out.write(data[start:end])

    def _part_end(self) -> None:
        if self._in_file:
            self.parts.append((self._start, self.out.tell()))
            self.out.write(b"\r\n")
            self._in_file = False

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.count:
                self.out.write(b"--%s--\r\n" % self.boundary)
