"""The source write path with the scheduler: lanes land in the table, held rows come back."""

from __future__ import annotations

import numpy as np

from ekko.schedule import SchedulerConfig, UpdateScheduler
from ekko.schedule.writer import ScheduledWriter
from ekko.store import Store
from ekko.store.spec import HIGH_LANE, LOW_LANE, NEW_LANE, TableSpec


def _store() -> Store:
    store = Store()
    store.create_table(TableSpec("emb", 4, 2))
    return store


def test_without_scheduler_every_row_is_high_and_written():
    store = _store()
    w = ScheduledWriter(store)
    versions = w.write("emb", np.arange(5), np.ones((5, 4), np.float32), now=0.0, now_ns=1)
    assert len(versions) == 5
    assert (store.table("emb").all_rows()[4] == HIGH_LANE).all()
    assert w.release(100.0, 2) == 0 and w.next_due() is None


def test_new_keys_go_high_and_small_changes_low():
    store = _store()
    w = ScheduledWriter(store, UpdateScheduler(SchedulerConfig(percentile=0.5)))
    rng = np.random.default_rng(0)
    keys = np.arange(1000, dtype=np.int64)
    base = rng.standard_normal((1000, 4)).astype(np.float32)
    w.write("emb", keys, base, now=0.0, now_ns=1)
    for step in range(5):  # existing keys, tiny changes: the percentile splits them
        w.write("emb", keys, base + 1e-3 * step, now=float(step), now_ns=2 + step)
    new = np.arange(5000, 5010, dtype=np.int64)
    w.write("emb", new, rng.standard_normal((10, 4)).astype(np.float32), now=9.0, now_ns=20)
    t = store.table("emb")
    k, _v, _ver, _wt, lanes = t.all_rows()
    assert (lanes[np.isin(k, new)] == NEW_LANE).all()
    assert (lanes[~np.isin(k, new)] == LOW_LANE).any()


def test_deferred_rows_are_held_then_released_within_the_bound():
    store = _store()
    cfg = SchedulerConfig(defer=True, defer_min_significance=0.5, max_staleness_s=2.0)
    w = ScheduledWriter(store, UpdateScheduler(cfg))
    keys = np.arange(100, dtype=np.int64)
    w.write("emb", keys, np.ones((100, 4), np.float32), now=0.0, now_ns=1)
    for step in range(1, 20):  # build the running mean with large changes
        w.write("emb", keys, np.full((100, 4), step, np.float32), now=0.01 * step, now_ns=2)
    tiny = np.full((100, 4), 19.0001, np.float32)
    w.write("emb", keys, tiny, now=1.0, now_ns=3)
    t = store.table("emb")
    held = w.scheduler.statistics().rows_held
    assert held > 0
    assert w.next_due() is not None and w.next_due() <= 1.0 + 2.0
    assert w.release(3.5, 4) == held
    values, _, _ = t.lookup(keys)
    np.testing.assert_array_equal(values, tiny)


def test_non_finite_rows_are_refused_before_anything_is_written_or_held():
    import pytest

    from ekko.store import BadRowsError

    for scheduler in (None, UpdateScheduler(SchedulerConfig(percentile=0.5))):
        store = _store()
        w = ScheduledWriter(store, scheduler)
        w.write("emb", np.arange(4), np.ones((4, 4), np.float32), now=0.0, now_ns=1)
        bad = np.full((4, 4), 1.0 + 1e-4, np.float32)
        bad[2, 1] = np.nan
        with pytest.raises(BadRowsError, match=r"table 'emb': values\[2\]\[1\] is NaN or inf"):
            w.write("emb", np.arange(4), bad, now=1.0, now_ns=2)
        assert w.flush(3) == 0  # nothing of the refused batch was held either
        np.testing.assert_array_equal(store.table("emb").lookup(np.arange(4))[0], 1.0)
