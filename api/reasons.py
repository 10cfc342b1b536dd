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
)
# An image decoded fine but refused per image, in a 200 answer (status "refused"): the model's validity gate.
REFUSAL_REASONS: tuple[str, ...] = ("blank", "not_a_chest_xray", "inverted", "rotated", "cropped")
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
SERVER_REASONS: tuple[str, ...] = ("not_ready", "bad_request", "not_found", "method_not_allowed", "explain_busy")

# Size limits (bytes, pixels, images per request) rather than bad input: RESOURCE_EXHAUSTED over gRPC.
LIMIT_REASONS = frozenset({"too_many_bytes", "too_many_pixels", "too_many_images"})
