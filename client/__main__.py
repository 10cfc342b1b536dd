"""Command line: classify or explain X-rays, or check the service, over HTTP (default) or gRPC.

    python -m client classify xray.jpeg [more.png study.dcm ...] [--grpc] [--url URL] [--json] [--timeout S]
    python -m client explain xray.jpeg --out heatmap.png [--grid grid.json] [--grpc] [--url URL] [--json]
    python -m client health [--grpc] [--url URL] [--json]
    ... [--api-key KEY] [--ca-file ca.pem] [--cert client.pem --key client-key.pem]   # a secured service

Every file gets its own result: files go in requests of at most 16 images and 48 MiB (fewer where the server
takes fewer), read a request at a time, and a file the server refuses (its input checks or its input-validity
gate), or that cannot be read, is reported on stderr while the others are still answered. `explain` removes
--out and --grid first (regular files only; a device or pipe is written to as it is), so that an answer without
a heatmap never leaves an earlier one there.

--url defaults to http://127.0.0.1:3000 (HTTP) or 127.0.0.1:3001 (gRPC), or to $PNEUMONIA_URL /
$PNEUMONIA_GRPC_URL when set. Exit status: 0 success, 1 not ready, 2 usage error or unreadable file,
3 input refused by the server (4xx, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, or a `refused` answer of the
input-validity gate), 4 server unreachable, busy or too slow (or no classifier at that URL), 5 authentication or
server error.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from api.reasons import IMAGE_REASONS

from . import ClassifierClient, connect
from ._common import MAX_TIMEOUT_S, TLS, file_name, grpc_target, http_base_url, redact
from .errors import ClientError, InvalidInput
from .models import DicomInfo, ImageUpload, ModelInfo, Prediction

# Refusals of single images: a request refused for these is sent again one image at a time, so that the other
# images are still answered. `request_too_large`: the whole request was over the server's byte limit.
PER_IMAGE_REASONS = frozenset(IMAGE_REASONS) | {"request_too_large"}
# Files are read one request at a time, so memory holds one request's files whatever their number (a day of DICOM
# studies read at once took gigabytes): at most the server's default images per request (a server that takes
# fewer says so, and gets smaller requests) and a byte budget under the default request limit and the gRPC
# channel's 64 MiB, with room for the framing; a single larger file goes alone and gets the server's answer.
BATCH_IMAGES = 16
BATCH_BYTES = 48 * 1024 * 1024


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    if value > MAX_TIMEOUT_S:  # 1e10 overflowed httpx's clock and was an instant deadline over gRPC
        raise argparse.ArgumentTypeError(f"{text!r} is more than a day ({MAX_TIMEOUT_S:.0f} s)")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--grpc", action="store_true", help="use the gRPC endpoint instead of HTTP")
    common.add_argument("--url", help="http://host:port (HTTP) or host:port (gRPC); default $PNEUMONIA_URL or "
                        "http://127.0.0.1:3000, with --grpc $PNEUMONIA_GRPC_URL or 127.0.0.1:3001")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to wait for an answer (default 60)")
    common.add_argument("--api-key", default=os.environ.get("PNEUMONIA_API_KEY"),
                        help="API key of a secured service (default: $PNEUMONIA_API_KEY)")
    common.add_argument("--ca-file", type=Path, help="CA (PEM) the server's certificate must chain to (HTTPS, gRPC TLS)")
    common.add_argument("--cert", type=Path, help="client certificate (PEM), for a server that requires one")
    common.add_argument("--key", type=Path, help="private key of --cert (PEM)")
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", parents=[common],
                                   help="classify one or more chest X-ray images (DICOM, JPEG, PNG, ...)")
    classify.add_argument("images", nargs="+", type=Path,
                          help="image files: DICOM Part 10 (.dcm, uncompressed, JPEG, JPEG-LS, JPEG 2000 or RLE), "
                          "JPEG, PNG, TIFF, BMP, GIF, WebP")
    classify.add_argument("--client-id", action="append", help="an identifier per image, echoed in the result")
    explain = commands.add_parser("explain", parents=[common],
                                  help="one X-ray's prediction and Grad-CAM heatmap (for review: not a localisation)")
    explain.add_argument("image", type=Path, help="one image file")
    explain.add_argument("--out", type=Path, help="write the heatmap drawn over the image here (PNG)")
    explain.add_argument("--grid", type=Path, help="write the heatmap grid here (JSON: rows of values in [0, 1])")
    commands.add_parser("health", parents=[common], help="is the service ready, and which model does it serve")
    return parser


def _format_prediction(p: Prediction, name: str | None = None) -> str:
    """`name`: what the user called the file (its path); else the name the server answered with."""
    name = name or p.filename or "image"
    if p.refusal is not None:
        verdict = f"{name}: REFUSED ({p.refusal.reason}) {p.refusal.message}"
    else:
        verdict = (f"{name}: {p.label}  probability of pneumonia {p.probability:.4f} (threshold {p.threshold:.4f}), "
                   f"confidence {p.confidence:.1%}")
    lines = [
        verdict,
        f"    {p.image.width}x{p.image.height} {p.image.format} {p.image.mode}; "
        f"batch of {p.batch_size}, {p.processing_ms:.1f} ms on the server"
        + (f"; client id {p.client_id}" if p.client_id else ""),
    ]
    if p.image.dicom is not None:
        lines.append(_format_dicom(p.image.dicom))
    lines += [f"    warning: {w}" for w in p.warnings]
    return "\n".join(lines)


def _format_dicom(d: DicomInfo) -> str:
    """One line of what the DICOM file said, e.g. 'DICOM DX PA CHEST, MONOCHROME1 12/16 bits, ...'."""
    what = " ".join(v for v in (d.modality, d.view_position, d.body_part) if v)
    parts = [f"DICOM {what or '(no modality)'}", f"{d.photometric_interpretation} {d.bits_stored}/{d.bits_allocated} bits",
             d.transfer_syntax]
    if d.pixel_spacing_mm:
        parts.append(f"spacing {d.pixel_spacing_mm[0]:g} x {d.pixel_spacing_mm[1]:g} mm")
    if d.voi == "window":
        parts.append(f"window {d.window_center:g}/{d.window_width:g}")
    elif d.voi:
        parts.append({"voi_lut": "VOI LUT", "min_max": "full range", "identity": "as stored"}.get(d.voi, d.voi))
    if d.sop_instance_uid:
        parts.append(f"SOP instance {d.sop_instance_uid}")
    return "    " + "; ".join(parts)


def _format_info(info: ModelInfo, api: ClassifierClient) -> str:
    """One line; each sensitivity names the threshold it was measured at (a site-calibrated model serves another
    threshold than the one its validation figures were measured at)."""
    metrics = info.validation_metrics
    recall = metrics.get("per_class", {}).get("PNEUMONIA", {}).get("recall")
    quality = f"validation ROC-AUC {metrics['roc_auc']:.4f}" if isinstance(metrics.get("roc_auc"), float) else ""
    if recall is not None:
        measured_at = metrics.get("threshold")
        quality += f", sensitivity {recall:.4f}" + (f" at {measured_at:.4f}" if isinstance(measured_at, float) else "")
    site = info.site_calibration or {}
    after = site.get("after_cross_validated", {})
    if after:
        images = site.get("images", {})
        quality += (f"; site-calibrated on {sum(images.values()):.0f} images (data {str(site.get('data_fingerprint'))[:8]}): "
                    f"sensitivity {after['sensitivity']:.3f}, specificity {after['specificity']:.3f} at "
                    f"{after['threshold']:.4f}, cross-validated")
    gate = info.validity.get("mode")
    return (
        f"{'ready' if info.ready else 'NOT ready'} at {redact(api.url)} ({api.transport}): model {info.model} ({info.arch}), "
        f"threshold {info.threshold:.4f}{'; ' + quality if quality else ''}; "
        + (f"validity gate {gate}{'' if info.validity.get('fitted') else ' (no gate fitted)'}; " if gate else "")
        + f"{info.workers} worker(s), up {info.uptime_s:.0f} s"
    )


class Unreadable(ClientError):
    """A file the CLI could not read (missing, a folder, no permission, not a regular file): never sent."""

    exit_code = 2


def _read(path: Path, client_id: str | None) -> ImageUpload | Unreadable:
    """The file's upload, or why it cannot be read. Only regular files are opened: a FIFO blocked the run."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            kind = "a folder" if path.is_dir() else "not a regular file"
            return Unreadable(f"cannot read {_on_one_line(_shown(path))}: {kind}")
        return ImageUpload(data=path.read_bytes(), filename=file_name(path), client_id=client_id)
    except OSError as exc:
        return Unreadable(f"cannot read {_on_one_line(_shown(path))}: {exc.strerror or exc}")


def _shown(path: Path) -> str:
    """A path as messages print it: bytes that are not UTF-8 replaced (a terminal cannot take them)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _on_one_line(name: str) -> str:
    """A name for a line of text output: control characters escaped as Python writes them (a newline in a file name
    split the file's line in two, a carriage return overwrote it; --json escapes them itself)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _batches(paths: list[Path]) -> Iterator[list[int]]:
    """The files' indices, a request's worth at a time (BATCH_IMAGES, BATCH_BYTES by their size on disk)."""
    batch: list[int] = []
    size = 0
    for i, path in enumerate(paths):
        try:
            length = path.stat().st_size
        except OSError:  # reported when it is read
            length = 0
        if batch and (len(batch) == BATCH_IMAGES or size + length > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(i)
        size += length
    if batch:
        yield batch


class NotSent(ClientError):
    """A file the CLI did not send (or whose request failed as a whole) after an earlier request failed."""

    def __init__(self, cause: ClientError) -> None:
        super().__init__(cause.message, status=cause.status, reasons=cause.reasons, retry_after_s=cause.retry_after_s)
        self.exit_code = cause.exit_code


@dataclass
class ServerLimit:
    """The server's `max_images_per_request` once a refusal made the CLI ask for it: asked once, not per batch."""

    images: int | None = None


def classify_each(api: ClassifierClient, uploads: list[ImageUpload],
                  server: ServerLimit | None = None) -> list[Prediction | ClientError]:
    """A result for every upload, in order: its prediction, or why it has none.

    More images than the server takes in one request are sent in several (its `max_images_per_request`, asked
    only when it refuses, then kept in `server` for later calls); a request refused for one image is sent again
    image by image, so that one bad file does not cost the others their answers. A failure of the first request
    that is not about an image (unreachable, key, rate limit) is raised; one in a later request ends the
    sending, and the files not answered get that error, while the answers already received are kept.
    """
    server = server if server is not None else ServerLimit()
    limit = server.images if server.images is not None and server.images < len(uploads) else None
    if limit is None:
        try:
            return list(api.classify(uploads))
        except InvalidInput as refused:
            reasons = set(refused.reasons)
            limit = len(uploads)
            if "too_many_images" in reasons and len(uploads) > 1:
                limit = server.images = int(api.model_info().limits.get("max_images_per_request") or 1)
            if limit >= len(uploads):
                if not reasons or not reasons <= PER_IMAGE_REASONS:
                    raise
                if len(uploads) == 1:
                    return [refused]
                limit = 1
    results: list[Prediction | ClientError] = []
    for start in range(0, len(uploads), limit):
        chunk = uploads[start:start + limit]
        try:
            results += classify_each(api, chunk, server)
        except ClientError as failed:  # a one-file request refused as a whole is that file's own refusal
            own = [failed] if len(chunk) == 1 and isinstance(failed, InvalidInput) else []
            return results + own + [NotSent(failed)] * (len(uploads) - len(results) - len(own))
    return results


def _own_message(text: str) -> str:
    """The refusal of one file sent alone, without the server's "image 0 (name): ", which names its place in that
    one-file request, not in the caller's list (the file is named beside it)."""
    return re.sub(r"^image 0( [(].*?[)])?: ", "", text)


def _classify(api: ClassifierClient, args: argparse.Namespace) -> int:
    """Every file gets an entry, in order; a file that cannot be read is reported and the others still sent. A
    failure of the first request that is not about an image is raised; one of a later request leaves the files
    after it unsent (`NotSent`), the answers already received kept."""
    paths: list[Path] = args.images
    ids = args.client_id or [None] * len(paths)
    results: list[Prediction | ClientError] = []
    stopped: NotSent | None = None
    server = ServerLimit()
    for batch in _batches(paths):
        if stopped is not None:
            results += [stopped] * len(batch)
            continue
        read = [_read(paths[i], ids[i]) for i in batch]
        uploads = [u for u in read if isinstance(u, ImageUpload)]
        try:
            answers = iter(classify_each(api, uploads, server) if uploads else [])
        except ClientError as failed:
            if not results and not args.json:  # one line says it; --json gives every file its entry instead
                raise
            answers = iter([NotSent(failed)] * len(uploads))
        results += [next(answers) if isinstance(u, ImageUpload) else u for u in read]
        stopped = next((r for r in results if isinstance(r, NotSent)), None)
    # shown as given: two files of one name in two folders were told apart only by their order
    names = [_shown(path) for path in paths]
    failed = [(_on_one_line(name), r) for name, r in zip(names, results) if isinstance(r, ClientError)]
    refused = [(_on_one_line(name), r) for name, r in zip(names, results)
               if isinstance(r, Prediction) and r.refusal is not None]
    if args.json:
        print(json.dumps([{**r.model_dump(), "path": name} if isinstance(r, Prediction)
                          else _error_entry(name, client_id, r) for name, client_id, r in zip(names, ids, results)],
                         indent=2))
    else:
        answered = [(_on_one_line(name), r) for name, r in zip(names, results) if isinstance(r, Prediction)]
        if answered:
            print("\n".join(_format_prediction(p, name) for name, p in answered))
            print(f"model {answered[0][1].model} via {api.transport} {redact(api.url)}")
    for name, error in failed:
        if isinstance(error, InvalidInput):
            print(f"error: {name}: {_own_message(str(error))}", file=sys.stderr)
        elif isinstance(error, Unreadable):
            print(f"error: {error}", file=sys.stderr)
    for name, prediction in refused:  # answered, but with no verdict: a refusal like the server's 4xx
        print(f"error: {name}: refused ({prediction.refusal.reason}): {prediction.refusal.message}", file=sys.stderr)
    unsent = [name for name, error in failed if isinstance(error, NotSent)]
    if unsent:  # one error for the files it left unanswered, not one line each
        error = next(e for _, e in failed if isinstance(e, NotSent))
        listed = ", ".join(unsent[:5]) + (f" and {len(unsent) - 5} more" if len(unsent) > 5 else "")
        print(f"error: {len(unsent)} file(s) not answered ({listed}): {error}", file=sys.stderr)
    return max([error.exit_code for _, error in failed] + [InvalidInput.exit_code for _ in refused[:1]], default=0)


def _failure(error: ClientError) -> dict[str, object]:
    """A failed call as `--json` prints it: `status` is "error"; the server's answer is in `http_status` (a number)
    or `grpc_status` (a code name), both null when none came."""
    status = error.status
    return {"status": "error", "error": _own_message(error.message), "reasons": list(error.reasons),
            "http_status": status if isinstance(status, int) else None,
            "grpc_status": status if isinstance(status, str) else None,
            "retry_after_s": error.retry_after_s}


def _error_entry(path: str, client_id: str | None, error: ClientError) -> dict[str, object]:
    """A file's `--json` entry when it has no prediction (`_failure`; a prediction's `status` is "ok" or
    "refused"). `filename` is the name the file is sent under, `path` the file as given (as in a prediction's
    entry), `sent` whether it reached the server."""
    return {"filename": file_name(path), "path": path, "client_id": client_id, **_failure(error),
            "sent": not isinstance(error, (NotSent, Unreadable))}


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same path, or links to it); a path that does not exist yet is none."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _explain(api: ClassifierClient, args: argparse.Namespace) -> int:
    """--out and --grid are removed before the request: an answer without a heatmap (a refusal, an error) left an
    earlier image's heatmap there, for a script to attach to this one."""
    targets = [t for t in (args.out, args.grid) if t is not None]
    for i, target in enumerate(targets):  # removed below: never the X-ray itself, nor one file for both
        for other, what in ((args.image, "the image"), *((t, "--out") for t in targets[:i])):
            if _same_file(target, other):
                return _usage_error(args, f"{'--grid' if target is args.grid else '--out'} {target} is {what}; "
                                          "write the heatmap elsewhere")
    upload = _read(args.image, None)
    for target in targets:
        try:
            _clear(target)
        except OSError as exc:
            return _usage_error(args, f"cannot replace {target}: {exc.strerror or exc}")
    try:
        if isinstance(upload, Unreadable):
            raise upload
        explanation = api.explain(upload)
    except ClientError as failed:  # named by its path, as classify names a file it refuses
        if args.json:  # "sent": false unless the server answered about the file, as classify says it
            entry = failed if isinstance(failed, (InvalidInput, Unreadable)) else NotSent(failed)
            print(json.dumps(_error_entry(_shown(args.image), None, entry), indent=2))
        said = (str(failed) if isinstance(failed, Unreadable)
                else f"{_on_one_line(_shown(args.image))}: {_own_message(str(failed))}")
        print(f"error: {said}", file=sys.stderr)
        return failed.exit_code
    heatmap = explanation.heatmap
    if heatmap is not None:
        for target, data in ((args.out, heatmap.overlay_png), (args.grid, json.dumps(heatmap.grid).encode())):
            try:
                if target is not None:
                    target.write_bytes(data)
            except OSError as exc:  # named here: a failed write (a full disk) has no `filename` ("cannot write None")
                return _usage_error(args, f"cannot write {target}: {exc.strerror}")
    refusal = explanation.prediction.refusal
    if refusal is not None:
        print(f"error: {_on_one_line(_shown(args.image))}: refused ({refusal.reason}): {refusal.message}",
              file=sys.stderr)
    status = 0 if refusal is None else InvalidInput.exit_code
    if args.json:
        print(json.dumps(explanation.model_dump(mode="json", exclude={"heatmap": {"overlay_png", "image_png"}}), indent=2))
        return status
    print(_format_prediction(explanation.prediction, _on_one_line(_shown(args.image))))
    if heatmap is None:
        print(f"    {explanation.note}")
        if args.out or args.grid:
            print(f"    no heatmap written: {', '.join(str(p) for p in (args.out, args.grid) if p)} removed or absent")
    else:
        written = [f"overlay {args.out} ({heatmap.width}x{heatmap.height} PNG)" if args.out else "",
                   f"grid {args.grid}" if args.grid else ""]
        where = "; ".join(w for w in written if w) or "not written (use --out heatmap.png)"
        print(f"    heatmap: {heatmap.method} of {heatmap.target}, {len(heatmap.grid)}x{len(heatmap.grid[0])} grid; {where}")
        print(f"    {explanation.note}")
    print(f"model {explanation.prediction.model} via {api.transport} {redact(api.url)}")
    return status


def _clear(target: Path) -> None:
    """Remove an earlier output: a regular file, a link to one, or a broken link. A device, pipe or socket (or a
    link to one: `--out /dev/stdout`) is left to be written to: removing it replaced /dev/null with a file."""
    try:
        kind = target.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(kind):
        try:
            kind = target.stat().st_mode
        except FileNotFoundError:  # a broken link
            kind = stat.S_IFREG
    if stat.S_ISDIR(kind):  # a folder, or a link to one: never removed
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    if stat.S_ISREG(kind):
        target.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.url is not None and not args.url.strip():
        parser.error("argument --url: empty (leave it out for the default)")
    if args.command == "classify" and args.client_id and len(args.client_id) != len(args.images):
        parser.error(f"{len(args.client_id)} --client-id for {len(args.images)} images; give one per image or none")
    url = args.url or os.environ.get("PNEUMONIA_GRPC_URL" if args.grpc else "PNEUMONIA_URL")
    if url:
        url = url.strip()
        secure = bool(args.ca_file or args.cert or args.key)
        try:  # a port out of range, a typo'd scheme, a query: refused here, not reported as "connection refused"
            grpc_target(url, secure=secure) if args.grpc else http_base_url(url, secure=secure)
        except ValueError as exc:
            parser.error(f"argument --url: {exc}")
    try:
        headers = {"x-api-key": args.api_key} if args.api_key else None
        tls = TLS(args.ca_file, args.cert, args.key) if (args.ca_file or args.cert or args.key) else None
        if tls is not None:
            tls.check()
        with connect(url, transport="grpc" if args.grpc else "http", timeout=args.timeout, headers=headers,
                     tls=tls) as api:
            if args.command == "explain":
                return _explain(api, args)
            if args.command == "classify":
                return _classify(api, args)
            ready = api.ready()
            if not ready:
                said = f"{redact(api.url)} ({api.transport}) answers but the model is not serving yet"
                if args.json:
                    print(json.dumps({"status": "not_ready", "ready": False, "error": said}, indent=2))
                print(f"not ready: {said}", file=sys.stderr)
                return 1
            info = api.model_info()
            print(info.model_dump_json(indent=2) if args.json else _format_info(info, api))
            return 0
    except ClientError as exc:
        if args.json:  # stdout stays JSON for a script, whatever failed
            print(json.dumps(_failure(exc), indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a malformed --url, --cert without --key
        return _usage_error(args, str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:  # an unreadable --ca-file, --cert or --key (ssl.SSLError included)
        return _usage_error(args, f"cannot use the TLS files: {exc}")


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """Exit 2 with `message` on stderr, and as JSON on stdout with --json."""
    if args.json:  # as a failed call prints it, with no server answer
        print(json.dumps(_failure(ClientError(message)), indent=2))
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of the output left (`| head`): stop quietly, as a pipeline expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(141)  # 128 + SIGPIPE, the status of a tool the signal stops
