"""DriftAccumulator: a row's drift is the sum of its low-lane steps since it last went in a
first-drained lane; the scheduler ranks writes by it when ``accumulate_drift`` is on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.schedule import SchedulerConfig, UpdateScheduler
from ekko.schedule.drift import DriftAccumulator
from ekko.schedule.key_slots import KeySlots
from ekko.store.spec import HIGH_LANE, LANES, LOW_LANE, NEW_LANE

_write = st.tuples(
    st.integers(0, 40),  # key
    st.floats(0.0, 10.0, allow_nan=False),  # |Δ| of the step
    st.sampled_from(LANES),
)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.lists(_write, min_size=1, max_size=12), max_size=20))
def test_drift_is_the_sum_of_low_lane_steps_since_last_first_drained_write(batches) -> None:
    acc = DriftAccumulator(slots=1 << 16)  # 41 keys: no collisions in 65 536 slots
    model: dict[int, float] = {}
    for batch in batches:
        last: dict[int, int] = {}  # one write per key per batch, as a table write holds
        for i, (k, _, _) in enumerate(batch):
            last[k] = i
        batch = [batch[i] for i in sorted(last.values())]
        keys = np.array([k for k, _, _ in batch], np.int64)
        steps = np.array([d for _, d, _ in batch])
        lanes = np.array([lane for _, _, lane in batch], np.uint8)
        expect = np.array([model.get(k, 0.0) + d for k, d, _ in batch])
        np.testing.assert_allclose(acc.drift("t", keys, steps), expect)
        acc.settle("t", keys, steps, lanes)
        for k, d, lane in batch:
            model[k] = model.get(k, 0.0) + d if lane == LOW_LANE else 0.0
    keys = np.arange(41, dtype=np.int64)
    expect = np.array([model.get(k, 0.0) for k in range(41)])
    np.testing.assert_allclose(acc.drift("t", keys, np.zeros(41)), expect)
    # Tables are apart.
    assert not acc.drift("other", keys, np.zeros(41)).any()


def test_key_slots_need_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        KeySlots(1000, 1)


def _steady_writes(sched: UpdateScheduler, rounds: int) -> list[np.ndarray]:
    """Keys 0..999 each move by 1.0 per write; key 1000 by 0.25 (a hot row whose adaptive
    step is small), written every round too."""
    keys = np.arange(1001, dtype=np.int64)
    rng = np.random.default_rng(0)
    old = np.zeros((1001, 4), np.float32)
    out = []
    for r in range(rounds):
        step = rng.normal(size=(1001, 4)).astype(np.float32)
        step /= np.linalg.norm(step, axis=1, keepdims=True)
        step[1000] *= 0.25
        new = old + step
        plan = sched.plan("emb", keys, old, new, np.full(1001, r > 0), now=float(r))
        out.append(plan.lanes)
        old = new
    return out


def test_a_row_of_small_steps_is_promoted_once_they_add_up() -> None:
    rounds = 200
    lanes = _steady_writes(UpdateScheduler(SchedulerConfig(percentile=0.9)), rounds)
    assert np.all(lanes[0] == NEW_LANE)
    # Without accumulation, a step 4x smaller than usual never ranks high.
    assert all(ln[1000] == LOW_LANE for ln in lanes[1:])
    cfg = SchedulerConfig(percentile=0.9, accumulate_drift=True)
    lanes = _steady_writes(UpdateScheduler(cfg), rounds)
    promoted = [r for r in range(1, rounds) if lanes[r][1000] == HIGH_LANE]
    # The others go high about every 10th write (drift ~10 then); the slow row about every
    # 40th, once its steps add up to as much.
    assert 2 <= len(promoted) <= 10, promoted
    gaps = np.diff(promoted)
    assert gaps.min() >= 10, promoted
    # The others still take ~10 % of the high lane, each in turn.
    high_share = np.mean([np.mean(ln[:1000] == HIGH_LANE) for ln in lanes[20:]])
    assert high_share == pytest.approx(0.1, abs=0.03)


def test_a_held_row_released_in_the_high_lane_starts_its_drift_again() -> None:
    cfg = SchedulerConfig(
        accumulate_drift=True, defer=True, defer_min_significance=0.5, max_staleness_s=1.0
    )
    sched = UpdateScheduler(cfg)
    assert sched.drift is not None
    keys = np.arange(100, dtype=np.int64)
    old = np.zeros((100, 4), np.float32)
    new = np.ones((100, 4), np.float32)
    sched.plan("t", keys, old, new, np.ones(100, bool), now=0.0)  # the usual |Δ| is 2
    # Another key, with drift gathered in the low lane, still small: (0.3 + 0.02) / 2 < 0.5.
    key = np.array([500], np.int64)
    sched.drift.settle("t", key, np.array([0.3]), np.array([LOW_LANE], np.uint8))
    tiny = np.full((1, 4), 0.01, np.float32)
    plan = sched.plan("t", key, np.zeros((1, 4), np.float32), tiny, np.ones(1, bool), now=0.5)
    assert not plan.send_now_mask[0]  # held: not written, its drift unchanged
    assert sched.drift.drift("t", key, np.zeros(1))[0] == pytest.approx(0.3)
    (released,) = sched.due(2.0)
    assert released.keys.tolist() == [500] and released.lanes.tolist() == [HIGH_LANE]
    assert sched.drift.drift("t", key, np.zeros(1))[0] == 0.0
