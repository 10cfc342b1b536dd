"""What one image gets back: its prediction, or its refusal, and the Prometheus metrics that count them.

A refusal comes from the file itself (`PreparedImage.refusal`, e.g. a DICOM object
that is not a frontal chest radiograph) or from the model's validity gate
(core/validity.py); the `validity` setting decides whether the gate's findings
refuse the image, only warn, or are ignored. A refused image gets no label and no
probability, so nothing downstream can read it as a diagnosis.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Literal

import bentoml

from api.models import DicomInfo, ImageInfo, Prediction, Refusal, Validity
from core.card import ModelCard
from core.inference import Assessment
from core.preprocess import PreparedImage

PREDICTIONS = bentoml.metrics.Counter(
    name="pneumonia_predictions_total", documentation="Classified images by predicted label (classify, HTTP and gRPC; not explanations)", labelnames=["label", "model"]
)
PROBABILITY = bentoml.metrics.Histogram(
    name="pneumonia_probability",
    documentation="Calibrated pneumonia probabilities served (watch for drift)",
    labelnames=["model"],
    buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)),
)
REJECTED = bentoml.metrics.Counter(
    name="pneumonia_rejected_inputs_total",
    documentation="Images refused, by reason: bad uploads (before inference) and images the validity gate refused",
    labelnames=["reason"],
)
OUTLIER_SCORE = bentoml.metrics.Histogram(
    name="pneumonia_validity_outlier_score",
    documentation="The validity gate's outlier score of every image that reached the model (watch for input drift)",
    labelnames=["model"],
    buckets=(-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0),
)
# BentoML's own bentoml_service_adaptive_batch_size observes the number of CALLS in each forward pass: a call of 16
# images counted as 1, so multi-image traffic looked unbatched on the dashboard (a helper's find).
BATCH_IMAGES = bentoml.metrics.Histogram(
    name="pneumonia_batch_images",
    documentation="Images in each forward pass of classify (calls of several images and adaptive batching together)",
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256),
)
MODEL_INFO = bentoml.metrics.Gauge(  # one series per live worker: a dead worker's goes with it
    name="pneumonia_model_info", documentation="The served model (value 1)", labelnames=["model", "arch", "threshold"],
    multiprocess_mode="liveall",
)



def _image_info(item: PreparedImage) -> ImageInfo:
    dicom = DicomInfo(**asdict(item.dicom)) if item.dicom is not None else None
    return ImageInfo(width=item.width, height=item.height, mode=item.mode, format=item.format, dicom=dicom)


def _validity(assessment: Assessment, card: ModelCard) -> Validity | None:
    outcome, limits = assessment.validity, card.validity
    if outcome is None or limits is None:
        return None
    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    return Validity(outlier_score=round(outcome.outlier_score, 4), outlier_limit=round(limits.outlier_limit, 4),
                    upright_probability=round(outcome.upright_probability, 6),
                    upright_limit=round(limits.orientation_limit, 6),
                    grey_level_spread=round(outcome.pixel_std, 2), blank_limit=round(limits.blank_std_limit, 2),
                    partial_probability=rounded(outcome.partial_probability, 6),
                    partial_limit=rounded(limits.partial_limit, 6) if outcome.partial_probability is not None else None,
                    level_share=rounded(outcome.level_share, 4),
                    level_share_limit=rounded(limits.level_share_limit, 4) if outcome.level_share is not None else None)


def answer(item: PreparedImage, assessment: Assessment, card: ModelCard, tag: str,
           mode: Literal["refuse", "warn", "off"], batch_size: int, done: float | None = None,
           counted: bool = True) -> Prediction:
    """The prediction for one image, or its refusal; counts it in the classification metrics unless `counted` is
    False (an explanation: it repeats a classification, and counting it again skewed the drift histograms and
    made a 2-second explanation one cheap image in the autoscaler's images per second)."""
    done = time.perf_counter() if done is None else done
    refusal, refused_by_file = item.refusal, item.refusal is not None
    # An image its own file refuses (DICOM tags) was never decoded: the gate's figures of its blank grid mean nothing.
    outcome = None if refused_by_file else assessment.validity
    if outcome is not None and counted:
        OUTLIER_SCORE.labels(model=tag).observe(outcome.outlier_score)
    if refusal is None and outcome is not None and outcome.reason is not None and mode != "off":
        refusal = (outcome.reason, outcome.message)
    warnings = list(item.warnings)
    common = dict(threshold=card.threshold, model=tag, validity=None if refused_by_file else _validity(assessment, card),
                  image=_image_info(item),
                  processing_ms=round((done - getattr(item, "received", done)) * 1000, 2), batch_size=batch_size)
    if refusal is not None and (refused_by_file or mode == "refuse"):
        if counted:
            REJECTED.labels(reason=refusal[0]).inc()
        return Prediction(status="refused", label=None, probability=None, confidence=None,
                          refusal=Refusal(reason=refusal[0], message=refusal[1]), warnings=warnings, **common)
    if refusal is not None:  # warn-only mode: answered, with the gate's finding first among the warnings
        warnings.insert(0, f"{refusal[0]}: {refusal[1]} (answered anyway: validity mode is 'warn')")
    probability = assessment.probability
    pneumonia = probability >= card.threshold
    label = card.class_names[int(pneumonia)]
    if counted:
        PREDICTIONS.labels(label=label, model=tag).inc()
        PROBABILITY.labels(model=tag).observe(probability)
    shown = rounded_on_its_side(probability, card.threshold)
    return Prediction(label=label, probability=shown, warnings=warnings,
                      confidence=shown if pneumonia else round(1 - shown, 6), **common)


def rounded_on_its_side(probability: float, threshold: float, digits: int = 6) -> float:
    """`probability` to `digits` decimals, rounded away from the threshold (up for PNEUMONIA, down for NORMAL), so
    that a caller's `probability >= threshold` agrees with the label: nearest rounding served 0.512607 labelled
    PNEUMONIA beside a threshold of 0.51260704, and the web page said "below it: NORMAL" under that verdict."""
    pneumonia = probability >= threshold
    scale = 10**digits
    shown = (math.ceil if pneumonia else math.floor)(probability * scale) / scale
    return shown if (shown >= threshold) == pneumonia else probability  # float edge: keep the exact value
