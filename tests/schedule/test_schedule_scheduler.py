"""UpdateScheduler on the source write path: lanes, deferral, losslessness, determinism."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.schedule import PriorityInputs, SchedulerConfig, UpdateScheduler
from ekko.store import Table
from ekko.store.spec import HIGH_LANE, LANES, LOW_LANE, NEW_LANE, TableSpec

DIM = 4


def _table(name: str = "emb") -> Table:
    return Table(TableSpec(name, DIM, 8), cache_capacity=256)


class Producer:
    """A trainer stand-in: a key space whose rows move by small steps, a few by large ones,
    and new keys arriving."""

    def __init__(self, seed: int, keys: int = 2_000) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_key = keys
        self.rows: dict[int, np.ndarray] = {}
        self.pool = np.arange(keys, dtype=np.int64)

    def batch(self, n: int, new: int = 5) -> tuple[np.ndarray, np.ndarray]:
        keys = self.rng.choice(self.pool, size=n, replace=False)
        fresh = np.arange(self.next_key, self.next_key + new, dtype=np.int64)
        self.next_key += new
        self.pool = np.concatenate([self.pool, fresh])
        keys = np.concatenate([keys, fresh])
        scale = np.where(self.rng.random(keys.size) < 0.05, 1.0, 0.01)
        old = np.stack([self.rows.get(int(k), np.zeros(DIM, np.float32)) for k in keys])
        new_values = (old + self.rng.normal(0, 1, (keys.size, DIM)) * scale[:, None]).astype(
            np.float32
        )
        for k, v in zip(keys.tolist(), new_values, strict=True):
            self.rows[k] = v
        return keys, new_values


def _write_step(
    sched: UpdateScheduler, table: Table, keys: np.ndarray, values: np.ndarray, now: float
):
    old, _, found = table.lookup(keys)
    plan = sched.plan(table.name, keys, old, values, found, now)
    s = plan.send_now_mask
    if s.any():
        table.write(keys[s], values[s], now_ns=int(now * 1e9), lanes=plan.lanes[s])
    for r in sched.due(now):
        assert r.table == table.name
        table.write(r.keys, r.values, now_ns=int(now * 1e9), lanes=r.lanes)
    return plan


def test_config_is_validated() -> None:
    for bad in (
        {"percentile": 1.0},
        {"freshness_boost": -1.0},
        {"max_staleness_s": float("nan")},
        {"release_lane": 7},
        {"sample_rows": 0},
        {"significance_scope": "dc"},
    ):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)


def test_disabled_sends_everything_high() -> None:
    sched = UpdateScheduler(SchedulerConfig(enabled=False, defer=True))
    keys = np.arange(100, dtype=np.int64)
    vals = np.zeros((100, DIM), np.float32)
    plan = sched.plan("t", keys, vals, vals, np.ones(100, bool), now=0.0)
    assert plan.lanes.dtype == np.uint8 and np.all(plan.lanes == HIGH_LANE)
    assert plan.send_now_mask.dtype == np.bool_ and plan.send_now_mask.all()
    assert sched.statistics().rows_high == 100


def test_lanes_split_and_new_keys_go_high() -> None:
    sched = UpdateScheduler(SchedulerConfig(percentile=0.9))
    table = _table()
    prod = Producer(0)
    # Bulk load: every key is new, all go in the new-key lane (and do not lift the threshold).
    keys, vals = prod.batch(2_000, new=0)
    plan = _write_step(sched, table, keys, vals, 0.0)
    assert np.all(plan.lanes == NEW_LANE)
    t = 0.01
    highs = []
    for _ in range(50):
        keys, vals = prod.batch(400, new=5)
        plan = _write_step(sched, table, keys, vals, t)
        assert plan.send_now_mask.all()
        assert np.all(plan.lanes[-5:] == NEW_LANE)  # the 5 new keys
        highs.append(np.mean(plan.lanes != LOW_LANE))
        t += 0.01
    assert np.mean(highs[10:]) == pytest.approx(0.1 + 5 / 405, abs=0.03)
    stats = sched.statistics()
    assert stats.rows_high + stats.rows_low == stats.rows_planned == 2_000 + 50 * 405
    assert stats.rows_deferred == 0 and stats.threshold > 0
    assert set(stats.mean_delta) == {"emb"}
    # The table stored each row's lane.
    _, _, _, _, lanes = table.all_rows()
    assert set(np.unique(lanes).tolist()) == {HIGH_LANE, LOW_LANE, NEW_LANE}


@pytest.mark.parametrize("release_lane", [HIGH_LANE, LOW_LANE])
def test_lossless_with_deferral(release_lane: int) -> None:
    cfg = SchedulerConfig(
        defer=True, defer_min_significance=0.2, max_staleness_s=0.5, release_lane=release_lane
    )
    sched = UpdateScheduler(cfg)
    table = _table()
    prod = Producer(1)
    t = 0.0
    for _ in range(200):
        keys, vals = prod.batch(300, new=3)
        plan = _write_step(sched, table, keys, vals, t)
        assert plan.send_now_mask[-3:].all()  # new keys are never held
        held = ~plan.send_now_mask
        assert np.all(plan.lanes[held] == LOW_LANE)
        t += 0.02
        # Staleness bound at the source: nothing is held longer than max_staleness_s.
        for name, d in sched.deferrer._tables.items():
            first = d.first[: len(d.index)]
            assert np.all(np.isnan(first) | (first + cfg.max_staleness_s > t - 0.02)), name
    stats = sched.statistics()
    assert stats.rows_deferred > 1000  # deferral did something
    assert stats.rows_released > 0
    for r in sched.flush():
        table.write(r.keys, r.values, now_ns=int(t * 1e9), lanes=r.lanes)
    keys = np.array(sorted(prod.rows), np.int64)
    values, _, found = table.lookup(keys)
    assert found.all()
    np.testing.assert_array_equal(values, np.stack([prod.rows[int(k)] for k in keys]))
    assert sched.statistics().rows_held == 0


def test_deferral_measures_drift_from_what_was_sent() -> None:
    """A row moved by many tiny steps is sent once its accumulated drift is significant."""
    sched = UpdateScheduler(SchedulerConfig(defer=True, defer_min_significance=0.5))
    table = _table()
    rng = np.random.default_rng(2)
    keys = np.arange(1000, dtype=np.int64)
    vals = rng.normal(0, 1, (1000, DIM)).astype(np.float32)
    _write_step(sched, table, keys, vals, 0.0)
    drifting = vals[-1].copy()  # key 999 is left alone meanwhile
    for i in range(10):  # typical movement: |Δ| ~ 0.1 * sqrt(DIM)
        vals = (vals + rng.normal(0, 0.1, vals.shape)).astype(np.float32)
        _write_step(sched, table, keys[:-1], vals[:-1], 0.001 * (i + 1))
    sent_at = None
    for i in range(50):  # then key 999 moves by |Δ| = 0.02 per step, in one direction
        drifting += 0.01
        plan = _write_step(sched, table, keys[-1:], drifting[None, :], 0.1 + 0.001 * i)
        if plan.send_now_mask[0]:
            sent_at = i
            break
    assert sent_at is not None and 2 <= sent_at < 20


def _random_batches(
    seed: int, n_batches: int
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        n = int(rng.integers(0, 200))
        keys = rng.integers(0, 500, n).astype(np.int64)
        old = rng.normal(0, 1, (n, DIM)).astype(np.float32)
        new = (old + rng.normal(0, 1, (n, DIM)) * rng.lognormal(-3, 1.5, (n, 1))).astype(np.float32)
        out.append((str(rng.choice(["a", "b"])), keys, old, new, rng.random(n) < 0.9))
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    warm=st.integers(0, 20),
    q=st.sampled_from([0.5, 0.9, 0.99]),
    defer=st.booleans(),
)
def test_lanes_are_a_deterministic_function_of_inputs_and_state(
    seed: int, warm: int, q: float, defer: bool
) -> None:
    cfg = SchedulerConfig(percentile=q, defer=defer, sample_rows=64, seed=seed % 7)
    batches = _random_batches(seed, warm + 3)
    a = UpdateScheduler(cfg)
    for i, (table, keys, old, new, existed) in enumerate(batches[:warm]):
        a.plan(table, keys, old, new, existed, now=0.1 * i)
    b = copy.deepcopy(a)  # same state
    fresh = UpdateScheduler(cfg)  # same state, reached by replaying the same inputs
    for i, (table, keys, old, new, existed) in enumerate(batches[:warm]):
        fresh.plan(table, keys, old, new, existed, now=0.1 * i)
    for i, (table, keys, old, new, existed) in enumerate(batches[warm:], start=warm):
        plans = [s.plan(table, keys, old, new, existed, now=0.1 * i) for s in (a, b, fresh)]
        for p in plans[1:]:
            np.testing.assert_array_equal(p.lanes, plans[0].lanes)
            np.testing.assert_array_equal(p.send_now_mask, plans[0].send_now_mask)
        assert plans[0].lanes.dtype == np.uint8
        assert np.isin(plans[0].lanes, LANES).all()
    assert a.statistics() == b.statistics() == fresh.statistics()


def test_custom_priority_function() -> None:
    class ByKey:
        """Priority = key: the largest keys go high."""

        def __call__(self, inputs: PriorityInputs) -> np.ndarray:
            return inputs.keys.astype(np.float64)

        def observe(self, inputs: PriorityInputs) -> None:
            pass

    sched = UpdateScheduler(SchedulerConfig(percentile=0.75), priority_fn=ByKey())
    keys = np.arange(1, 1001, dtype=np.int64)
    vals = np.zeros((1000, DIM), np.float32)
    plan = sched.plan("t", keys, vals, vals + 1, np.ones(1000, bool), now=0.0)
    assert np.all(plan.lanes[keys > 760] == HIGH_LANE)
    assert np.all(plan.lanes[keys < 740] == LOW_LANE)
    assert sched.statistics().mean_delta["t"] == pytest.approx(2.0)  # still tracked


def test_empty_batch() -> None:
    sched = UpdateScheduler(SchedulerConfig(defer=True))
    e = np.zeros((0, DIM), np.float32)
    plan = sched.plan("t", np.zeros(0, np.int64), e, e, np.zeros(0, bool), now=0.0)
    assert plan.lanes.shape == (0,) and plan.send_now_mask.shape == (0,)
    assert sched.next_due() is None and sched.due(10.0) == []
