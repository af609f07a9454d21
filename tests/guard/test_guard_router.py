"""Traffic split: hash-based, deterministic, the configured share, redirect/restore (§6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.guard.errors import GuardConfigError
from ekko.guard.router import TrafficRouter, Variant


@pytest.mark.parametrize("share", [0.005, 0.01, 0.2])
@pytest.mark.parametrize("ids", ["sequential", "random"])
def test_share_is_respected_statistically(share: float, ids: str) -> None:
    n = 1_000_000
    arr = (
        np.arange(n, dtype=np.int64)
        if ids == "sequential"
        else np.random.default_rng(3).integers(0, 2**62, n)
    )
    frac = TrafficRouter(share, seed=11).baseline_mask(arr).mean()
    sigma = math.sqrt(share * (1 - share) / n)
    assert abs(frac - share) < 5 * sigma


def test_routing_is_deterministic_and_seeded() -> None:
    ids = np.arange(200_000, dtype=np.int64)
    a = TrafficRouter(0.05, seed=1).baseline_mask(ids)
    b = TrafficRouter(0.05, seed=1).baseline_mask(ids)
    c = TrafficRouter(0.05, seed=2).baseline_mask(ids)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    r = TrafficRouter(0.05, seed=1)
    assert all((r.route(int(i)) is Variant.BASELINE) == a[i] for i in range(0, 5000, 7))


def test_raising_the_share_only_adds_requests() -> None:
    ids = np.arange(100_000, dtype=np.int64)
    small = TrafficRouter(0.005, seed=5).baseline_mask(ids)
    large = TrafficRouter(0.02, seed=5).baseline_mask(ids)
    assert np.all(large[small])


def test_string_ids_route_stably() -> None:
    r = TrafficRouter(0.5, seed=9)
    got = [r.route(f"req-{i}") for i in range(2000)]
    assert got == [TrafficRouter(0.5, seed=9).route(f"req-{i}") for i in range(2000)]
    assert 800 < sum(v is Variant.BASELINE for v in got) < 1200
    assert r.route(b"req-1") is got[1]


def test_redirect_all_then_restore() -> None:
    ids = np.arange(10_000, dtype=np.int64)
    r = TrafficRouter(0.005, seed=0)
    before = r.baseline_mask(ids)
    r.redirect_all_to_baseline()
    assert r.redirected and r.baseline_mask(ids).all()
    assert r.route(123) is Variant.BASELINE
    r.restore()
    assert not r.redirected
    assert np.array_equal(r.baseline_mask(ids), before)
    s = r.stats(now=5.0)
    assert s.online + s.baseline == 30_001 and s.at == 5.0
    assert s.baseline == 2 * int(before.sum()) + 10_001


def test_zero_share_sends_nothing_to_baseline() -> None:
    assert not TrafficRouter(0.0).baseline_mask(np.arange(100_000)).any()


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_share_is_validated_naming_the_field(share: float) -> None:
    with pytest.raises(GuardConfigError, match="baseline_share"):
        TrafficRouter(share)


def test_non_integer_ids_are_rejected() -> None:
    with pytest.raises(GuardConfigError, match="integers"):
        TrafficRouter().baseline_mask(np.array([0.5]))
