"""Running percentile and the high/low lane split."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.schedule import (
    DefaultPriority,
    LaneSplitter,
    PriorityInputs,
    SignificanceTracker,
    StreamingPercentile,
    TrafficShares,
)
from ekko.store.spec import HIGH_LANE, LOW_LANE, NEW_LANE


def _splitter(q: float = 0.9, half_life: float = 100_000, boost: float = 10.0) -> LaneSplitter:
    tracker = SignificanceTracker(half_life_rows=10 * half_life)
    fn = DefaultPriority(tracker, TrafficShares(), boost)
    return LaneSplitter(StreamingPercentile(q, half_life_rows=half_life), fn)


def _batch(rng: np.random.Generator, n: int, scale: float = 1.0, new_frac: float = 0.0):
    delta = rng.lognormal(0.0, 1.0, n) * scale
    is_new = rng.random(n) < new_frac
    return PriorityInputs("t", rng.integers(0, 1 << 40, n), delta, is_new)


@pytest.mark.parametrize("dist", ["lognormal", "exponential", "pareto"])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_percentile_matches_exact_quantile(dist: str, q: float) -> None:
    rng = np.random.default_rng(0)
    x = getattr(rng, dist)(*((0.0, 2.0) if dist == "lognormal" else (1.5,)), size=200_000)
    sp = StreamingPercentile(q, half_life_rows=1e12)
    for chunk in np.array_split(x, 50):
        sp.update(chunk)
    exact = float(np.quantile(x, q))
    assert sp.threshold() == pytest.approx(exact, rel=0.02)
    assert np.mean(x >= sp.threshold()) == pytest.approx(1 - q, abs=0.003)


def test_percentile_edges() -> None:
    sp = StreamingPercentile(0.5)
    assert sp.threshold() == 0.0
    sp.update(np.zeros(100))
    assert sp.threshold() == sp.lo  # mostly zeros: zero never counts as "at the threshold"
    sp.update(np.array([np.nan, np.inf, -1.0]))
    assert np.isfinite(sp.threshold())
    with pytest.raises(ValueError):
        StreamingPercentile(1.0)


def test_percentile_decay_follows_shift() -> None:
    rng = np.random.default_rng(1)
    sp = StreamingPercentile(0.9, half_life_rows=20_000)
    for _ in range(20):
        sp.update(rng.exponential(1.0, 10_000))
    assert sp.threshold() == pytest.approx(np.log(10), rel=0.05)
    for _ in range(30):
        sp.update(rng.exponential(5.0, 10_000))
    assert sp.threshold() == pytest.approx(5 * np.log(10), rel=0.05)


@pytest.mark.parametrize("q", [0.8, 0.9, 0.95])
def test_high_fraction_converges_to_one_minus_q(q: float) -> None:
    rng = np.random.default_rng(2)
    sp = _splitter(q)
    for _ in range(30):  # warm-up
        sp.lanes(_batch(rng, 5_000))
    before = sp.statistics()
    for _ in range(100):
        lanes = sp.lanes(_batch(rng, 5_000))
        assert lanes.dtype == np.uint8
        assert set(np.unique(lanes)) <= {HIGH_LANE, LOW_LANE}
    after = sp.statistics()
    high = after.rows_high - before.rows_high
    total = high + after.rows_low - before.rows_low
    assert high / total == pytest.approx(1 - q, abs=0.02)


def test_new_keys_go_high_with_default_boost() -> None:
    rng = np.random.default_rng(3)
    sp = _splitter(0.9)
    for _ in range(20):
        sp.lanes(_batch(rng, 5_000, new_frac=0.01))
    b = _batch(rng, 5_000, new_frac=0.02)
    lanes = sp.lanes(b)
    assert b.is_new.sum() > 0
    assert np.all(lanes[b.is_new] == NEW_LANE)  # a lane of their own, first on the link
    # Without the boost, new keys are ranked by their change alone.
    sp0 = _splitter(0.9, boost=0.0)
    for _ in range(20):
        sp0.lanes(_batch(rng, 5_000, new_frac=0.01))
    assert np.mean(sp0.lanes(b)[b.is_new] == NEW_LANE) < 0.5


def test_first_batch_is_split_by_its_own_quantile() -> None:
    rng = np.random.default_rng(4)
    lanes = _splitter(0.9).lanes(_batch(rng, 10_000))
    assert np.mean(lanes == HIGH_LANE) == pytest.approx(0.1, abs=0.02)


def test_burst_goes_high_and_the_split_recovers() -> None:
    rng = np.random.default_rng(5)
    sp = _splitter(0.9, half_life=50_000)
    for _ in range(300):  # long enough for the running mean |Δ| (500 k rows) to settle
        sp.lanes(_batch(rng, 5_000))
    burst = sp.lanes(_batch(rng, 2_000, scale=100.0))
    assert np.mean(burst == HIGH_LANE) > 0.95  # a burst of big changes is significant
    fractions = [np.mean(sp.lanes(_batch(rng, 5_000)) == HIGH_LANE) for _ in range(60)]
    assert fractions[0] > 0.03  # normal traffic is not shut out of the high lane
    assert np.mean(fractions[-20:]) == pytest.approx(0.1, abs=0.02)


def test_lasting_significance_shift_keeps_the_fraction() -> None:
    rng = np.random.default_rng(6)
    sp = _splitter(0.9, half_life=50_000)
    for _ in range(40):
        sp.lanes(_batch(rng, 5_000))
    fractions = [np.mean(sp.lanes(_batch(rng, 5_000, scale=20.0)) == HIGH_LANE) for _ in range(150)]
    assert fractions[0] > 0.5  # the first rows of the new regime look significant
    # p_g's scale and the percentile both re-adapt (a few half-lives), then the split holds.
    assert np.mean(fractions[-30:]) == pytest.approx(0.1, abs=0.015)


def test_priority_shape_is_checked() -> None:
    class Bad:
        def __call__(self, inputs: PriorityInputs) -> np.ndarray:
            return np.zeros(1)

        def observe(self, inputs: PriorityInputs) -> None:
            pass

    sp = LaneSplitter(StreamingPercentile(), Bad())
    with pytest.raises(ValueError):
        sp.lanes(PriorityInputs("t", np.arange(3), np.ones(3), np.zeros(3, bool)))
