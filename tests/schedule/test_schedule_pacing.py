"""Token bucket and link pacer, on an injected clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.schedule import LinkPacer, TokenBucket


def test_token_bucket_basics() -> None:
    tb = TokenBucket(1000.0, 500.0, now=0.0)
    assert tb.available(0.0) == 500.0
    assert tb.take(400, 0.0)
    assert not tb.take(200, 0.0)
    assert tb.time_until(200, 0.0) == pytest.approx(0.1)
    assert tb.take(200, 0.1)
    assert tb.available(100.0) == 500.0  # capped at the burst
    assert tb.time_until(501, 100.0) == math.inf
    assert tb.available(50.0) == 500.0  # time going backwards: no refill, no error
    tb.consume(800, 100.0)
    assert tb.available(100.0) == pytest.approx(-300.0)
    assert tb.time_until(100, 100.0) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1.0)
    with pytest.raises(ValueError):
        tb.take(-1, 100.0)


def test_set_rate_keeps_tokens_earned_at_the_old_rate() -> None:
    tb = TokenBucket(1000.0, 10_000.0, now=0.0)
    tb.consume(10_000, 0.0)
    tb.set_rate(100.0, now=1.0)  # earned 1000 at the old rate
    assert tb.available(1.0) == pytest.approx(1000.0)
    assert tb.available(2.0) == pytest.approx(1100.0)
    tb.set_rate(100.0, now=2.0, burst_bytes=500.0)
    assert tb.available(2.0) == pytest.approx(500.0)


def _simulate(
    pacer: LinkPacer,
    t0: float,
    t1: float,
    rng: np.random.Generator,
    row_bytes: int = 1000,
) -> list[tuple[float, int]]:
    """A responder under demand far above the rate: asks for 1 MB every time it may send,
    answers with whole rows (at least one, even over budget), waits as hinted."""
    sent: list[tuple[float, int]] = []
    t = t0
    while t < t1:
        b = pacer.budget(t, 1 << 20)
        if b == 0:
            t += max(pacer.wait_hint(t), 1e-6) + rng.uniform(0, 0.002)  # timer jitter
            continue
        n = max(1, b // row_bytes) * row_bytes
        pacer.spent(n, t)
        sent.append((t, n))
        t += rng.uniform(0, 0.003)
    return sent


def _per_second(sent: list[tuple[float, int]], t0: float, t1: float) -> np.ndarray:
    times = np.array([s[0] for s in sent])
    sizes = np.array([s[1] for s in sent])
    edges = np.arange(t0, t1 + 1e-9, 1.0)
    return np.histogram(times, bins=edges, weights=sizes)[0]


@pytest.mark.parametrize("rate", [50_000.0, 1_000_000.0, 12_500_000.0])
def test_bytes_per_second_hold_the_rate(rate: float) -> None:
    rng = np.random.default_rng(0)
    pacer = LinkPacer(rate, min_bytes=1000)
    sent = _simulate(pacer, 0.0, 5.0, rng)
    per_s = _per_second(sent, 0.0, 5.0)
    assert np.all(np.abs(per_s / rate - 1) < 0.10), per_s / rate


def test_new_rate_holds_after_set_rate() -> None:
    rng = np.random.default_rng(1)
    pacer = LinkPacer(1_000_000.0, min_bytes=1000)
    sent = _simulate(pacer, 0.0, 3.0, rng)
    pacer.set_rate(200_000.0, now=3.0)  # congestion: the link drops to a fifth
    sent += _simulate(pacer, 3.0, 7.0, rng)
    per_s = _per_second(sent, 0.0, 7.0)
    assert np.all(np.abs(per_s[:3] / 1_000_000 - 1) < 0.10), per_s
    assert np.all(np.abs(per_s[4:] / 200_000 - 1) < 0.10), per_s
    assert per_s[3] < 1.1 * 200_000 + pacer.bucket.burst


def test_budget_minimum_and_wait_hint() -> None:
    pacer = LinkPacer(10_000.0, burst_bytes=5_000, min_bytes=2_000, now=0.0)
    assert pacer.budget(0.0, 100_000) == 5_000
    pacer.spent(5_000, 0.0)
    assert pacer.budget(0.05, 100_000) == 0  # 500 bytes: below the useful minimum
    assert pacer.wait_hint(0.05) == pytest.approx(0.15)
    assert pacer.budget(0.2, 100_000) == 2_000
    assert pacer.budget(0.2, 300) == 300  # a small request needs only its own size
    assert pacer.budget(0.2, 0) == 0
    pacer.spent(2_300, 0.2)  # sent more than granted: debt delays the next budget
    assert pacer.wait_hint(0.2) == pytest.approx(0.23)
    assert pacer.bytes_spent == 7_300
    with pytest.raises(ValueError):
        LinkPacer(10_000.0, burst_bytes=100, min_bytes=1000)


def test_default_burst_follows_the_rate_and_an_explicit_one_stays() -> None:
    pacer = LinkPacer(1_000_000.0, min_bytes=4096, now=0.0)
    assert pacer.bucket.burst == 50_000.0  # 50 ms of the rate
    pacer.set_rate(100_000.0, 0.0)
    assert pacer.bucket.burst == 8192.0  # two answers of min_bytes, not 50 KB on a slow link
    assert pacer.budget(0.0, 1 << 20) == 8192
    fixed = LinkPacer(1_000_000.0, burst_bytes=20_000.0, now=0.0)
    fixed.set_rate(100_000.0, 0.0)
    assert fixed.bucket.burst == 20_000.0


def test_correct_charges_extra_bytes_and_refunds_up_to_the_burst() -> None:
    pacer = LinkPacer(10_000.0, burst_bytes=8192.0, min_bytes=1024, now=0.0)
    pacer.spent(8192, 0.0)
    pacer.correct(1000, 0.0)
    assert pacer.bucket.available(0.0) == pytest.approx(-1000.0)
    pacer.correct(-50_000, 0.0)
    assert pacer.bucket.available(0.0) == 8192.0
    assert pacer.bytes_spent == 8192 + 1000 - 50_000
