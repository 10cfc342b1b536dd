"""The access-control building blocks (serving/security.py) and their settings, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.grpc.interceptors import peer_address
from serving.security import AccessPolicy, KeyRing, RateLimiter, presented_key
from settings import SecuritySettings, ServingSettings

KEY_1, KEY_2 = "k1-" + "x" * 20, "k2-" + "y" * 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_refill_and_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)  # empty: one token per second
    assert limiter.acquire("b") == 0.0  # another client has its own bucket
    clock.now += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    clock.now += 3600
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0  # refills to the burst, not beyond


def test_forgotten_clients_bound_memory() -> None:
    limiter = RateLimiter(per_minute=60, burst=1, max_clients=100)
    for i in range(1000):
        limiter.acquire(f"ip:10.0.{i // 256}.{i % 256}")
    assert len(limiter._buckets) == 100


def test_keys_and_how_they_are_presented() -> None:
    ring = KeyRing([KEY_1, KEY_2])
    assert ring.authenticate(KEY_1) and ring.authenticate(KEY_2)
    assert not any(ring.authenticate(k) for k in (None, "", KEY_1[:-1], KEY_1 + "z", KEY_1.upper()))
    assert not KeyRing([]).enabled and not KeyRing([]).authenticate("")
    assert presented_key(KEY_1, None) == KEY_1
    assert presented_key(None, f"Bearer {KEY_2}") == KEY_2 and presented_key(None, f"bearer  {KEY_2} ") == KEY_2
    assert presented_key(None, f"Basic {KEY_2}") is None and presented_key(None, "Bearer ") is None


def test_policy_keys_buckets_by_key_then_address() -> None:
    policy = AccessPolicy(SecuritySettings(api_keys=KEY_1, rate_limit={"enabled": True, "burst": 2}))
    assert policy.check(None, "10.0.0.1", protected=True).outcome == "unauthenticated"
    assert policy.check("wrong-key-0123456789", "10.0.0.1", protected=True).outcome == "unauthenticated"
    assert policy.check(None, "10.0.0.1", protected=True).outcome == "rate_limited"  # guesses spend tokens
    assert policy.check(KEY_1, "10.0.0.1", protected=True).allowed  # a valid key has its own bucket
    assert policy.check(None, "10.0.0.1", protected=False, limited=False).allowed  # probes: never refused
    assert AccessPolicy(SecuritySettings()).check(None, "10.0.0.1", protected=True).allowed  # no keys: open


def test_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n{KEY_2}\n\n")
    monkeypatch.setenv("PNEUMONIA_SECURITY__API_KEYS", f" {KEY_1} ,")
    monkeypatch.setenv("PNEUMONIA_SECURITY__API_KEYS_FILE", str(keys))
    monkeypatch.setenv("PNEUMONIA_SECURITY__CORS__ALLOW_ORIGINS", "https://a.example, http://localhost:8080")
    settings = ServingSettings()
    assert settings.security.keys() == (KEY_1, KEY_2)
    assert settings.security.cors.allow_origins == ["https://a.example", "http://localhost:8080"]
    assert KEY_1 not in repr(settings)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"PNEUMONIA_SECURITY__API_KEYS": "short-secret-1"}, "at least 16"),
        ({"PNEUMONIA_SECURITY__API_KEYS_FILE": "/nonexistent/keys"}, "cannot be read"),
        ({"PNEUMONIA_SECURITY__CORS__ALLOW_ORIGINS": "*"}, "wildcards are not allowed"),
    ],
)
def test_bad_security_settings_stop_start_up_without_echoing_them(env, message, monkeypatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        ServingSettings()
    assert message in str(error.value)
    assert "short-secret-1" not in str(error.value)


def test_grpc_peer_addresses() -> None:
    assert peer_address("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_address("ipv6:[::1]:5555") == "::1"
    assert peer_address(None) == "unknown"
