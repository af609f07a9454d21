"""The source's one write port: lanes land in the table, held rows come back, keys are looked
up once, parked pulls are woken by the port itself, a restore is final, bad rows store nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.schedule import SchedulerConfig, UpdateScheduler, WritePort
from ekko.store import BadRowsError, Store, TableConflictError, UnknownTableError
from ekko.store.clock import FakeClock
from ekko.store.spec import HIGH_LANE, LANES, LOW_LANE, NEW_LANE, Sink, TableSpec
from ekko.train.sink import DeletingSink


def _store() -> Store:
    store = Store()
    store.create_table(TableSpec("emb", 4, 2))
    return store


def _deferring() -> UpdateScheduler:
    return UpdateScheduler(
        SchedulerConfig(defer=True, defer_min_significance=0.5, max_staleness_s=2.0)
    )


def _hold_some(w: WritePort, keys: np.ndarray) -> np.ndarray:
    """Large steps (the running mean |Δ|), then a tiny one the scheduler holds (as it holds a
    trainer's); returns it."""
    w.write_rows("emb", keys, np.ones((keys.size, 4), np.float32), now=0.0, now_ns=1)
    for step in range(1, 20):
        values = np.full((keys.size, 4), step, np.float32)
        w.write_rows("emb", keys, values, now=0.01 * step, now_ns=2)
    tiny = np.full((keys.size, 4), 19.0001, np.float32)
    w.write_rows("emb", keys, tiny, now=1.0, now_ns=3, hold=True)
    return tiny


def test_without_scheduler_every_row_is_high_and_written():
    store = _store()
    w = WritePort(store)
    versions = w.write_rows("emb", np.arange(5), np.ones((5, 4), np.float32), now=0.0, now_ns=1)
    assert len(versions) == 5
    assert (store.table("emb").all_rows()[4] == HIGH_LANE).all()
    assert w.release(100.0, 2) == 0 and w.flush(3) == 0 and w.next_due() is None


def test_the_publishers_sink_writes_versioned_rows_stamped_by_the_clock():
    store = Store()
    sink = WritePort(store, clock=FakeClock(wall=2.0))
    assert isinstance(sink, Sink)
    spec = TableSpec("emb_0", 4, 2)
    sink.create_table(spec)
    sink.create_table(spec)  # idempotent
    keys = np.array([3, 9], dtype=np.int64)
    sink.write("emb_0", keys, np.ones((2, 4), np.float32))
    sink.write("emb_0", keys[:1], np.full((1, 4), 2.0, np.float32))
    values, versions, found = store.table("emb_0").lookup(keys)
    assert found.all() and (versions > 0).all()
    np.testing.assert_array_equal(values[:, 0], [2.0, 1.0])
    assert (store.table("emb_0").all_rows()[3] == 2_000_000_000).all()
    assert store.table("emb_0").statistics().rows_written == 3
    stored = sink.stored("emb_0")
    assert stored is not None and sorted(stored[0].tolist()) == [3, 9]
    assert sink.stored("absent") is None
    with pytest.raises(TableConflictError):
        sink.create_table(TableSpec("emb_0", 8, 2))


def test_new_keys_go_high_and_small_changes_low():
    store = _store()
    w = WritePort(store, UpdateScheduler(SchedulerConfig(percentile=0.5)))
    rng = np.random.default_rng(0)
    keys = np.arange(1000, dtype=np.int64)
    base = rng.standard_normal((1000, 4)).astype(np.float32)
    w.write_rows("emb", keys, base, now=0.0, now_ns=1)
    for step in range(5):  # existing keys, tiny changes: the percentile splits them
        w.write_rows("emb", keys, base + 1e-3 * step, now=float(step), now_ns=2 + step)
    new = np.arange(5000, 5010, dtype=np.int64)
    w.write_rows("emb", new, rng.standard_normal((10, 4)).astype(np.float32), now=9.0, now_ns=20)
    t = store.table("emb")
    k, _v, _ver, _wt, lanes = t.all_rows()
    assert (lanes[np.isin(k, new)] == NEW_LANE).all()
    assert (lanes[~np.isin(k, new)] == LOW_LANE).any()


def test_deferred_rows_are_held_then_released_within_the_bound():
    store = _store()
    w = WritePort(store, _deferring())
    keys = np.arange(100, dtype=np.int64)
    tiny = _hold_some(w, keys)
    assert w.scheduler is not None
    held = w.scheduler.statistics().rows_held
    assert held > 0
    due = w.next_due()
    assert due is not None and due <= 1.0 + 2.0
    assert w.release(3.5, 4) == held
    np.testing.assert_array_equal(store.table("emb").lookup(keys)[0], tiny)


def test_an_acknowledged_write_is_never_held_and_ends_an_earlier_hold():
    """``write_rows`` without ``hold``: the HTTP route acknowledges once the log's fsync covers
    the batch, and a held row is in no log (a kill -9 lost it). It is written now, in its
    lane, every key gets a version, and an older hold of its keys is never released over it."""
    store = _store()
    scheduler = _deferring()
    w = WritePort(store, scheduler)
    keys = np.arange(100, dtype=np.int64)
    _hold_some(w, keys)
    assert scheduler.statistics().rows_held == 100
    small = np.full((100, 4), 19.0002, np.float32)  # as insignificant as the held change
    versions = w.write_rows("emb", keys[:40], small[:40], now=1.5, now_ns=4)
    assert versions.shape == (40,) and (versions > 0).all()
    np.testing.assert_array_equal(store.table("emb").lookup(keys[:40])[0], small[:40])
    assert scheduler.statistics().rows_held == 60
    w.flush(5)
    np.testing.assert_array_equal(store.table("emb").lookup(keys[:40])[0], small[:40])


def drift_and_hold(w: WritePort, now: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Keys 0..49 end with drift from low-lane writes, keys 50..99 with a held row (a
    scheduler deferring below p_g 0.5 and accumulating drift). Returns both key sets."""
    keys = np.arange(100, dtype=np.int64)
    drifted, held = keys[:50], keys[50:]

    def write(k: np.ndarray, value: float, now_ns: int) -> None:  # as a trainer's step
        w.write_rows("emb", k, np.full((k.size, 4), value, np.float32), now=now, now_ns=now_ns,
                     hold=True)  # fmt: skip

    for step in range(1, 20):  # the running mean |Δ|; every key in the low lane
        write(keys, step, 1)
    write(held, 1e3, 2)  # high
    write(drifted, 39.0, 3)
    write(held, 1e3 + 1e-4, 4)
    return drifted, held


def drifting_scheduler() -> UpdateScheduler:
    cfg = SchedulerConfig(
        defer=True, defer_min_significance=0.5, max_staleness_s=2.0, accumulate_drift=True
    )
    return UpdateScheduler(cfg)


def test_a_restore_is_final_held_rows_are_dropped_and_drift_restarts():
    store = _store()
    scheduler = drifting_scheduler()
    w = WritePort(store, scheduler)
    drifted, held = drift_and_hold(w)
    keys = np.concatenate([drifted, held])
    assert scheduler.deferrer.held("emb") == held.size
    assert scheduler.drift is not None
    assert (scheduler.drift.drift("emb", drifted, np.zeros(50)) > 0).all()
    restored = np.full((100, 4), -1.0, np.float32)
    versions = w.restore("emb", keys, restored, now_ns=5)
    assert len(versions) == 100
    assert scheduler.deferrer.held("emb") == 0
    np.testing.assert_array_equal(scheduler.drift.drift("emb", keys, np.zeros(100)), 0.0)
    assert w.release(100.0, 6) == 0 and w.flush(7) == 0
    np.testing.assert_array_equal(store.table("emb").lookup(keys)[0], restored)
    all_keys, *_, lanes = store.table("emb").all_rows()
    assert (lanes[np.isin(all_keys, keys)] == HIGH_LANE).all()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "acknowledged", "restore"]),
            st.sets(st.integers(0, 15), min_size=1, max_size=8),
            st.sampled_from([1e-4, 3.0]),  # a step the scheduler holds, or one it sends
        ),
        max_size=25,
    )
)
def test_after_a_flush_each_row_holds_its_last_write_or_restore_whatever_was_held(ops):
    """No held row is lost and none is released over a later restore or acknowledged write:
    after ``flush`` the table equals the last value each key was given, in call order; an
    acknowledged write is in the table as soon as it returns."""
    store = _store()
    scheduler = drifting_scheduler()
    w = WritePort(store, scheduler)
    keys = np.arange(16, dtype=np.int64)
    w.write_rows("emb", keys, np.zeros((16, 4), np.float32), now=0.0, now_ns=1)
    expected = np.zeros((16, 4), np.float32)
    for i, (op, chosen, step) in enumerate(ops, start=1):
        k = np.array(sorted(chosen), np.int64)
        if op != "restore":
            expected[k] += np.float32(step)
            ack = op == "acknowledged"
            w.write_rows("emb", k, expected[k], now=0.1 * i, now_ns=1 + i, hold=not ack)
            if ack:
                np.testing.assert_array_equal(store.table("emb").lookup(k)[0], expected[k])
        else:
            expected[k] = -np.float32(i)
            w.restore("emb", k, expected[k], now_ns=1 + i)
    w.flush(10_000)
    assert scheduler.deferrer.held() == 0
    np.testing.assert_array_equal(store.table("emb").lookup(keys)[0], expected)


def test_a_delete_hands_the_hook_the_rows_it_removes_drops_their_holds_and_wakes_pulls():
    store = _store()
    seen: list[tuple] = []
    woken: list[int] = []
    scheduler = drifting_scheduler()
    w = WritePort(store, scheduler, on_written=lambda: woken.append(1), clock=FakeClock(wall=5.0))
    w.record_preimages(["emb"], lambda *args: seen.append(args))
    _, held = drift_and_hold(w)
    assert scheduler.deferrer.held("emb") == held.size
    woken.clear()
    seen.clear()
    keys = np.concatenate([held[:5], [10_000]])
    versions = w.delete("emb", keys)
    assert versions.shape == (6,) and woken == [1]
    table, k, old, old_versions, existed, now = seen[0]
    assert table == "emb" and k.tolist() == keys.tolist() and now == 5.0
    assert existed.tolist() == [True] * 5 + [False] and (old_versions[:5] > 0).all()
    np.testing.assert_array_equal(old[:5], np.full((5, 4), 1e3, np.float32))  # as stored
    assert scheduler.deferrer.held("emb") == held.size - 5
    w.flush(10**12)
    t = store.table("emb")
    assert not t.lookup(keys)[2].any() and t.tombstones == 6
    _, kept = t.deleted()
    assert sorted(kept.tolist()) == sorted(versions.tolist())  # no release came after it
    assert isinstance(w, DeletingSink)  # the trainer's publisher hands it its evictions
    with pytest.raises(UnknownTableError):
        w.delete("nope", keys)
    with pytest.raises(BadRowsError, match="keys"):
        w.delete("emb", np.array([0.5]))
    assert len(seen) == 1 and t.tombstones == 6


def test_each_write_looks_its_keys_up_once_and_hands_the_hook_what_it_overwrites():
    store = _store()
    t = store.table("emb")
    lookups: list[int] = []
    lookup = t.lookup

    def counting(keys):
        lookups.append(len(keys))
        return lookup(keys)

    t.lookup = counting  # type: ignore[method-assign]
    seen: list[tuple] = []
    w = WritePort(store, UpdateScheduler(SchedulerConfig(percentile=0.5)))
    w.record_preimages(["emb"], lambda *args: seen.append(args))
    keys = np.array([1, 2, 3], np.int64)
    w.write_rows("emb", keys, np.ones((3, 4), np.float32), now=1.0, now_ns=1)
    w.write_rows("emb", keys[:2], np.full((2, 4), 2.0, np.float32), now=2.0, now_ns=2)
    assert lookups == [3, 2]  # one lookup per write: pre-images and the plan share it
    table, k, old, old_versions, existed, now = seen[1]
    assert table == "emb" and k.tolist() == [1, 2] and now == 2.0
    np.testing.assert_array_equal(old, np.ones((2, 4)))
    assert existed.all() and (old_versions > 0).all()
    assert not seen[0][4].any()  # the first write created its rows
    with pytest.raises(ValueError, match="'emb': its pre-images are recorded already"):
        w.record_preimages(["emb"], lambda *args: None)


def test_parked_pulls_are_woken_by_writes_releases_and_restores_without_the_caller():
    store = _store()
    woken: list[int] = []
    w = WritePort(store, _deferring(), on_written=lambda: woken.append(1))
    keys = np.arange(100, dtype=np.int64)
    moved = 0
    for step in range(1, 21):  # the last, tiny step is held whole
        value = np.full((100, 4), step if step < 20 else 19.0001, np.float32)
        moved += len(w.write_rows("emb", keys, value, now=0.01 * step, now_ns=step, hold=True)) > 0
        assert len(woken) == moved  # one wake-up per write that moved the store, at once
    assert w.scheduler is not None and w.scheduler.statistics().rows_held == 100
    assert moved == 19
    woken.clear()
    w.write_rows("emb", keys[:0], np.ones((0, 4), np.float32), now=1.5, now_ns=4)
    assert woken == []  # nothing moved: nobody to wake
    assert w.release(3.5, 5) > 0 and len(woken) == 1
    assert w.release(3.6, 6) == 0 and len(woken) == 1
    w.restore("emb", keys[:3], np.zeros((3, 4), np.float32), now_ns=7)
    assert len(woken) == 2
    with w.batch():  # a publish of many tables, a restore of many: one wake-up at the end
        w.write("emb", keys[:3], np.ones((3, 4), np.float32))
        with w.batch():
            w.restore("emb", keys[3:6], np.ones((3, 4), np.float32), now_ns=8)
        assert len(woken) == 2
    assert len(woken) == 3
    with pytest.raises(RuntimeError), w.batch():  # rows written before a failure still wake
        w.write("emb", keys[:3], np.full((3, 4), 2.0, np.float32))
        raise RuntimeError("the rest of the publish failed")
    assert len(woken) == 4


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("hooked", [False, True])
def test_bad_rows_raise_naming_the_problem_and_store_record_and_hold_nothing(scheduled, hooked):
    store = _store()
    store.table("emb").max_abs = 100.0
    recorded: list = []
    w = WritePort(store, _deferring() if scheduled else None)
    if hooked:
        w.record_preimages(["emb"], lambda *args: recorded.append(args))
    keys = np.arange(4, dtype=np.int64)
    w.write_rows("emb", keys, np.ones((4, 4), np.float32), now=0.0, now_ns=1)
    before = store.table("emb").all_rows()
    recorded.clear()
    nan = np.full((4, 4), 1.0 + 1e-4, np.float32)
    nan[2, 1] = np.nan
    big = np.ones((4, 4), np.float32)
    big[3, 0] = 1e3
    cases = [
        ("nope", keys, np.ones((4, 4)), UnknownTableError, "unknown table 'nope'"),
        ("emb", keys, np.ones((4, 3)), BadRowsError, r"values must have shape \(4, 4\)"),
        ("emb", keys.astype(np.float64), np.ones((4, 4)), BadRowsError, "keys must be int64"),
        ("emb", keys, nan, BadRowsError, r"table 'emb': values\[2\]\[1\] is NaN or inf"),
        ("emb", keys, big, BadRowsError, r"values\[3\]\[0\] is 1000, beyond ±100 \(max_abs\)"),
    ]
    for table, k, v, error, message in cases:
        with pytest.raises(error, match=message):
            w.write_rows(table, k, v, now=1.0, now_ns=2)
        with pytest.raises(error, match=message):
            w.write(table, k, v)
        with pytest.raises(error, match=message):
            w.restore(table, k, v, now_ns=2)
    assert recorded == []
    assert w.flush(3) == 0  # nothing of a refused batch was held either
    after = store.table("emb").all_rows()
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=10, deadline=None)
@given(lane=st.sampled_from(LANES), n=st.integers(1, 20))
def test_held_rows_are_released_in_the_configured_lane(lane, n):
    store = _store()
    cfg = SchedulerConfig(
        defer=True, defer_min_significance=0.5, max_staleness_s=2.0, release_lane=lane
    )
    w = WritePort(store, UpdateScheduler(cfg))
    tiny = _hold_some(w, np.arange(n, dtype=np.int64))
    assert w.scheduler is not None and w.scheduler.statistics().rows_held == n
    assert w.flush(9) == n
    _k, values, _ver, wtimes, lanes = store.table("emb").all_rows()
    assert (lanes == lane).all() and (wtimes == 9).all()
    np.testing.assert_array_equal(values, tiny)


def test_nothing_but_the_port_writes_a_source_table():
    """``Table.write`` and ``Table.delete`` (keyword-only ``now_ns``) are called by the port
    alone. Exempt: the store
    itself (its kernel warm-up writes a scratch table), the protocol's simulated network and
    the benches, which model a source store directly."""
    import ast
    from pathlib import Path

    import ekko

    root = Path(ekko.__file__).parent
    exempt = ("schedule/write_port.py", "store/", "protocol/testing.py", "bench/")
    callers = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(exempt):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("write", "delete")
                and any(kw.arg == "now_ns" for kw in node.keywords)
            ):
                callers.append(f"{rel}:{node.lineno}")
    assert callers == []
