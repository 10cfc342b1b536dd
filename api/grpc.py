"""The generated protobuf stubs and their conversion to and from `api.models`.

The stubs (`api/_proto`) are built from `api/proto/pneumonia/v1/classifier.proto`
by scripts/gen_proto.py, which `./dev.sh setup` runs.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from api.models import Explanation, ImageInfo, ModelInfo, Prediction, Validity

try:
    from api._proto.pneumonia.v1 import classifier_pb2 as pb
    from api._proto.pneumonia.v1 import classifier_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - a checkout that skipped ./dev.sh setup
    raise ImportError(
        f"the generated gRPC stubs are missing ({exc}); run `./dev.sh setup` or `python scripts/gen_proto.py`"
    ) from exc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "pneumonia.v1.Classifier"

__all__ = ["SERVICE_NAME", "explanation_fields", "explanation_message", "image_info_fields", "image_info_message",
           "model_info_fields", "model_info_message", "pb",
           "pb_grpc", "prediction_fields", "prediction_message"]

# The Validity fields a gate fitted before 2026-11-28 lacks (optional proto fields: absent on the wire, null over
# HTTP), and the limits among them, which GetModelInfo's gate section carries.
OPTIONAL_VALIDITY = tuple(name for name, field in Validity.model_fields.items() if not field.is_required())
OPTIONAL_GATE_LIMITS = tuple(name for name in OPTIONAL_VALIDITY if name.endswith("_limit"))


def prediction_message(prediction: Prediction, image: Any) -> Any:
    """`pb.Prediction` for one result; `filename` and `client_id` are echoed from the request's `pb.Image`."""
    info = prediction.image
    message = pb.Prediction(
        status=prediction.status,
        label=prediction.label or "",
        threshold=prediction.threshold,
        model=prediction.model,
        image=image_info_message(info),
        warnings=prediction.warnings,
        processing_ms=prediction.processing_ms,
        batch_size=prediction.batch_size,
    )
    if prediction.probability is not None:
        message.probability = prediction.probability
    if prediction.confidence is not None:
        message.confidence = prediction.confidence
    if prediction.refusal is not None:
        message.refusal.CopyFrom(pb.Refusal(**prediction.refusal.model_dump()))
    if prediction.validity is not None:
        message.validity.CopyFrom(pb.Validity(**prediction.validity.model_dump(exclude_none=True)))
    if image.HasField("filename"):
        message.filename = image.filename
    if image.HasField("client_id"):
        message.client_id = image.client_id
    return message


_DICOM_OPTIONAL = ("modality", "view_position", "body_part", "pixel_spacing_source", "sop_instance_uid",
                   "study_instance_uid", "voi", "window_center", "window_width")


def image_info_message(info: ImageInfo) -> Any:
    """`pb.ImageInfo` of an `api.models.ImageInfo` (the DICOM part only for DICOM uploads)."""
    message = pb.ImageInfo(width=info.width, height=info.height, mode=info.mode, format=info.format)
    if info.dicom is not None:
        fields = info.dicom.model_dump(exclude_none=True)
        fields["pixel_spacing_mm"] = list(fields.get("pixel_spacing_mm") or ())
        message.dicom.CopyFrom(pb.DicomInfo(**fields))
    return message


def image_info_fields(message: Any) -> dict[str, Any]:
    """A `pb.ImageInfo` as the fields of `api.models.ImageInfo`."""
    fields: dict[str, Any] = {"width": message.width, "height": message.height, "mode": message.mode,
                              "format": message.format, "dicom": None}
    if message.HasField("dicom"):
        dicom = message.dicom
        fields["dicom"] = {
            "photometric_interpretation": dicom.photometric_interpretation,
            "bits_allocated": dicom.bits_allocated,
            "bits_stored": dicom.bits_stored,
            "transfer_syntax": dicom.transfer_syntax,
            "transfer_syntax_uid": dicom.transfer_syntax_uid,
            "pixel_spacing_mm": tuple(dicom.pixel_spacing_mm) if len(dicom.pixel_spacing_mm) == 2 else None,
            **{name: getattr(dicom, name) if dicom.HasField(name) else None for name in _DICOM_OPTIONAL},
        }
    return fields


def prediction_fields(message: Any) -> dict[str, Any]:
    """A `pb.Prediction` as the fields of `api.models.Prediction`, plus `filename` and `client_id` (or None)."""

    def optional(name: str) -> Any:
        return getattr(message, name) if message.HasField(name) else None

    return {
        "status": message.status or "ok",
        "label": message.label or None,
        "probability": optional("probability"),
        "threshold": message.threshold,
        "confidence": optional("confidence"),
        "model": message.model,
        "image": image_info_fields(message.image),
        "refusal": MessageToDict(message.refusal, preserving_proto_field_name=True) if message.HasField("refusal") else None,
        # the optional checks an older gate lacks are null, as in the HTTP answer
        "validity": {**dict.fromkeys(OPTIONAL_VALIDITY),
                     **MessageToDict(message.validity, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)} if message.HasField("validity") else None,
        "warnings": list(message.warnings),
        "processing_ms": message.processing_ms,
        "batch_size": message.batch_size,
        "filename": optional("filename"),
        "client_id": optional("client_id"),
    }


def explanation_message(explanation: Explanation, image: Any) -> Any:
    """`pb.ExplainResponse` for one explanation; `image` is the request's `pb.Image` (names are echoed)."""
    message = pb.ExplainResponse(prediction=prediction_message(explanation.prediction, image), note=explanation.note)
    heatmap = explanation.heatmap
    if heatmap is not None:
        rows = len(heatmap.grid)
        message.heatmap.CopyFrom(pb.Heatmap(
            method=heatmap.method, target=heatmap.target, layer=heatmap.layer,
            grid=[value for row in heatmap.grid for value in row], grid_rows=rows,
            grid_cols=len(heatmap.grid[0]) if rows else 0, overlay_png=heatmap.overlay_png,
            image_png=heatmap.image_png, width=heatmap.width, height=heatmap.height,
        ))
    return message


def explanation_fields(message: Any) -> dict[str, Any]:
    """A `pb.ExplainResponse` as the fields of `api.models.Explanation` (prediction as `prediction_fields`)."""
    heatmap = None
    if message.HasField("heatmap"):
        h = message.heatmap
        values = list(h.grid)
        grid = [values[r * h.grid_cols:(r + 1) * h.grid_cols] for r in range(h.grid_rows)]
        heatmap = {"method": h.method, "target": h.target, "layer": h.layer, "grid": grid,
                   "overlay_png": h.overlay_png, "image_png": h.image_png, "width": h.width, "height": h.height}
    return {"prediction": prediction_fields(message.prediction), "heatmap": heatmap, "note": message.note}


def model_info_message(info: ModelInfo, max_message_bytes: int) -> Any:
    """`pb.ModelInfo` from the HTTP `/health` answer; `max_message_bytes` is the gRPC request limit."""
    metrics = struct_pb2.Struct()
    metrics.update(info.validation_metrics)
    site = None
    if info.site_calibration is not None:
        site = struct_pb2.Struct()
        site.update(info.site_calibration)
    limits = info.limits
    return pb.ModelInfo(
        ready=info.ready,
        model=info.model,
        arch=info.arch,
        threshold=info.threshold,
        temperature=info.temperature,
        target_sensitivity=info.target_sensitivity,
        validation_metrics=metrics,
        preprocess=pb.Preprocess(**{k: info.preprocess[k] for k in ("image_size", "normalization", "mean", "std",
                                                                    "dicom_window")}),
        uptime_s=info.uptime_s,
        workers=info.workers,
        torch_threads=info.torch_threads,
        batching=pb.Batching(**{k: info.batching[k] for k in ("enabled", "max_batch_size", "max_latency_ms",
                                                              "dispatcher", "slots")}),
        limits=pb.Limits(
            max_bytes=limits["max_bytes"],
            max_pixels=limits["max_pixels"],
            min_side=limits["min_side"],
            max_images_per_request=limits["max_images_per_request"],
            max_message_bytes=max_message_bytes,
        ),
        engine=info.engine,
        validity=pb.ValidityGate(**{k: v for k, v in info.validity.items() if v is not None}),
        site_calibration=site,
    )


def model_info_fields(message: Any) -> dict[str, Any]:
    """A `pb.ModelInfo` as the fields of `api.models.ModelInfo` (int64 values back to ints)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    limits = data.get("limits", {})
    for key in ("max_bytes", "max_pixels", "max_message_bytes"):  # int64 travels as a JSON string
        if key in limits:
            limits[key] = int(limits[key])
    gate = data.get("validity")
    if isinstance(gate, dict) and not gate.get("fitted"):  # no gate: no limits, as HTTP says it (proto3 sends 0.0)
        data["validity"] = {key: value for key, value in gate.items() if key in ("mode", "fitted")}
    elif isinstance(gate, dict):  # the checks an older gate lacks: null, as HTTP says it
        data["validity"] = {**dict.fromkeys(OPTIONAL_GATE_LIMITS), **gate}
    return data
