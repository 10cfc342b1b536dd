"""A short property-based fuzz run of the decode-and-validate path (the long run: scripts/fuzz_decode.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from harness.fuzz import ANY_INPUT, check, seeds

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_seeds_are_accepted() -> None:
    """The mutation seeds themselves decode, so mutations start from real files of every format."""
    assert all(check(seed) == "ok" for seed in seeds())


@FUZZ
@given(ANY_INPUT)
def test_any_bytes_prepare_or_reject(data: bytes) -> None:
    check(data)
