"""Reason codes: the `type` of each `ErrorDetail`, and the gRPC `pneumonia-reject-reasons` trailer.

Stable, machine-readable names; messages may change, these do not.
"""

from __future__ import annotations

# An uploaded image refused by the preprocessing (core.preprocess.RejectReason raises exactly these).
IMAGE_REASONS: tuple[str, ...] = (
    "empty",
    "too_many_bytes",
    "not_an_image",
    "unsupported_format",
    "too_many_pixels",
    "too_small",
    "corrupt",
    # DICOM files: no Pixel Data (7FE0,0010); a transfer syntax without a decoder here (or deflated, refused as
    # unbounded). Truncated or damaged DICOM files are `corrupt`, like any other damaged image.
    "dicom_no_pixel_data",
    "dicom_unsupported_syntax",
)
# An image refused per image, in a 200 answer (status "refused"): by the model's validity gate (blank ... cropped),
# or by its own DICOM tags before anything is decoded (dicom_*: Modality not CR/DX/RG, Body Part Examined not the chest,
# View Position not PA/AP, more than one frame).
REFUSAL_REASONS: tuple[str, ...] = (
    "blank",
    "not_a_chest_xray",
    "inverted",
    "rotated",
    "cropped",
    "dicom_modality",
    "dicom_body_part",
    "dicom_view",
    "dicom_multiframe",
)
# A request refused as a whole before any image is decoded (HTTP guard, service, gRPC servicer).
REQUEST_REASONS: tuple[str, ...] = (
    "no_images",
    "too_many_images",
    "missing",
    "unexpected_field",
    "not_a_file",
    "malformed_multipart",
    "unsupported_media_type",
    "request_too_large",
)
# Refused by access control, or by the state of the server.
ACCESS_REASONS: tuple[str, ...] = ("unauthorized", "rate_limited")
# client_gone: the client left before its upload arrived (an answer nobody reads, sent to end the request).
# explain_unavailable: this worker's explainers failed to build (permanent; /classify still answers).
# too_many_calls: a gRPC worker at PNEUMONIA_MAX_CONCURRENCY calls in flight (RESOURCE_EXHAUSTED, retry-after).
SERVER_REASONS: tuple[str, ...] = ("not_ready", "bad_request", "not_found", "method_not_allowed", "explain_busy",
                                   "explain_unavailable", "internal_error", "client_gone", "too_many_calls")

# Size limits (bytes, pixels, images per request) rather than bad input: RESOURCE_EXHAUSTED over gRPC.
LIMIT_REASONS = frozenset({"too_many_bytes", "too_many_pixels", "too_many_images"})
