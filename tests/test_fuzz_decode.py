"""A short property-based fuzz run of the decode-and-validate path (the long run: scripts/fuzz_decode.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from harness.fuzz import ANY_INPUT, LIMITS, check, seeds

# Pillow warns about the corrupt EXIF blocks that mutation produces; the outcome of each input is what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_seeds_are_accepted() -> None:
    """The mutation seeds themselves decode, so mutations start from real files of every format.

    DICOM in every transfer syntax is among them, plus a CT and a lateral view that its tags refuse.
    """
    outcomes = [check(seed) for seed in seeds()]
    refused = sorted(o for o in outcomes if o != "ok")
    assert refused == ["refused:dicom_modality", "refused:dicom_view"], outcomes
    assert sum(seed[128:132] == b"DICM" or seed[:4] == b"DICM" for seed in seeds()) == 14
    assert max(len(seed) for seed in seeds()) < LIMITS.max_bytes  # padding, not the seeds, crosses the byte limit


@FUZZ
@given(ANY_INPUT)
def test_any_bytes_prepare_or_reject(data: bytes) -> None:
    check(data)


def test_fuzz_inputs_reach_the_byte_limit() -> None:
    """The inputs really cross the byte limit (and decode, and fail to): a fixed (derandomized) sample of 300
    of them, each also checked against the property, includes every one of these outcomes."""
    outcomes: Counter[str] = Counter()

    @settings(max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ANY_INPUT)
    def sample(data: bytes) -> None:
        outcomes[check(data)] += 1

    sample()
    assert {"too_many_bytes", "ok", "corrupt", "not_an_image", "empty"} <= set(outcomes), outcomes
