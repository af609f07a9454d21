"""Deletes in the store (issue 18): a delete is a write that leaves a tombstone — a version
like any row, values not served, digests over live rows only — kept by the log and snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ekko.store import BadRowsError, Store, Table, shard_of
from ekko.store.journal import decode_batch, encode_delete, open_durable
from ekko.store.spec import HIGH_LANE, LOW_LANE, TableSpec

SPEC = TableSpec("t", 3, 4)


def _keys(*ks: int) -> np.ndarray:
    return np.array(ks, dtype=np.int64)


def _shard(key: int) -> int:
    return int(shard_of(_keys(key), SPEC.num_shards)[0])


def _vals(n: int, x: float = 1.0) -> np.ndarray:
    return np.full((n, SPEC.dim), x, dtype=np.float32)


def test_delete_takes_versions_and_hides_the_row() -> None:
    t = Table(SPEC)
    written = t.write(_keys(1, 2, 3), _vals(3), now_ns=10, lanes=LOW_LANE)
    counter = t.counter.copy()
    versions = t.delete(_keys(2, 3, 99), now_ns=20)
    # Each deleted key took the next version of its shard, in the high lane.
    assert (versions > 0).all() and int(t.counter.sum()) == int(counter.sum()) + 3
    assert written.max() < versions.max()
    values, vers, found = t.lookup(_keys(1, 2, 3, 99))
    assert found.tolist() == [True, False, False, False]
    assert vers.tolist()[1:] == [0, 0, 0] and not values[1:].any()
    assert (t.rows, t.tombstones) == (1, 3)
    keys, got_versions = t.deleted()
    assert dict(zip(keys.tolist(), got_versions.tolist(), strict=True)) == dict(
        zip([2, 3, 99], versions.tolist(), strict=True)
    )
    stats = t.statistics()
    assert (stats.rows, stats.tombstones, stats.rows_deleted) == (1, 3, 3)
    # all_rows is the live rows; all_slots keeps the tombstones (what a snapshot holds).
    assert t.all_rows()[0].tolist() == [1]
    assert sorted(t.all_slots()[0].tolist()) == [1, 2, 3, 99]
    # Tombstones travel in the high lane, above the rows they replaced.
    c = t.collect(np.arange(4), np.full(4, HIGH_LANE), np.zeros(4, np.int64))
    assert sorted(t.rows_at(c.slots)[0].tolist()) == [2, 3, 99]
    assert t.dead_at(c.slots).tolist() == [1, 1, 1]


def test_digest_of_a_tombstone_equals_never_holding_the_key() -> None:
    a, b = Table(SPEC), Table(SPEC)
    va = a.write(_keys(1, 2), _vals(2), now_ns=1)
    a.delete(_keys(2), now_ns=2)
    b.apply(_keys(1), _vals(1), va[:1], _keys(1), HIGH_LANE)
    assert a.digest() == b.digest()
    assert a.rows == b.rows == 1


def test_later_write_wins_and_older_row_loses_by_version() -> None:
    t = Table(SPEC)
    v1 = t.write(_keys(5), _vals(1, 1.0), now_ns=1)
    vd = t.delete(_keys(5), now_ns=2)
    # An older row of the key (a replica's late copy) loses to the tombstone.
    assert t.apply(_keys(5), _vals(1, 7.0), v1, _keys(1), HIGH_LANE) == 0
    assert not t.lookup(_keys(5))[2][0]
    # A later write wins: the key is live again, no longer a tombstone.
    v2 = t.write(_keys(5), _vals(1, 3.0), now_ns=3)
    assert v2[0] > vd[0]
    values, versions, found = t.lookup(_keys(5))
    assert found[0] and versions[0] == v2[0] and values[0, 0] == 3.0
    assert (t.rows, t.tombstones) == (1, 0)


def test_replica_apply_turns_a_row_into_a_tombstone_by_version() -> None:
    src, rep = Table(SPEC), Table(SPEC)
    v = src.write(_keys(1, 2), _vals(2), now_ns=1)
    rep.apply(_keys(1, 2), _vals(2), v, _keys(1, 1), HIGH_LANE)
    vd = src.delete(_keys(1), now_ns=2)
    dead = np.ones(1, np.uint8)
    # A tombstone no newer than the held row changes nothing; a newer one wins.
    assert rep.apply(_keys(2), _vals(1, 0.0), v[1:], _keys(2), HIGH_LANE, dead) == 0
    assert rep.lookup(_keys(2))[2][0]
    assert rep.apply(_keys(1), _vals(1, 9.0), vd, _keys(2), HIGH_LANE, dead) == 1
    assert rep.apply(_keys(1), _vals(1, 9.0), vd, _keys(2), HIGH_LANE, dead) == 0  # idempotent
    assert not rep.lookup(_keys(1))[2][0]
    assert rep.digest() == src.digest() and rep.tombstones == 1
    # The tombstone's values are zero whatever the sender put in them.
    assert not rep.all_slots()[1][rep.all_slots()[5] == 1].any()


def test_bad_dead_flags_are_refused_before_anything_changes() -> None:
    t = Table(SPEC)
    with pytest.raises(BadRowsError, match="dead must have shape"):
        t.apply(_keys(1), _vals(1), _keys(1), _keys(1), 0, np.ones(2, np.uint8))
    with pytest.raises(BadRowsError, match="dead must hold 0 or 1"):
        t.apply(_keys(1), _vals(1), _keys(1), _keys(1), 0, np.array([2], np.uint8))
    with pytest.raises(BadRowsError, match="keys"):
        t.delete(np.array([1.5]), now_ns=1)
    assert t.rows == t.tombstones == 0 and not t.counter.any()


def test_snapshot_keeps_tombstones(tmp_path: Path) -> None:
    store = Store()
    t = store.create_table(SPEC)
    t.write(_keys(1, 2, 3), _vals(3), now_ns=1)
    t.delete(_keys(2, 7), now_ns=2)
    store.save(tmp_path / "s")
    back = Store.load(tmp_path / "s").table("t")
    assert (back.rows, back.tombstones) == (2, 2)
    assert back.digest() == t.digest()
    assert back.lookup(_keys(1, 2, 3, 7))[2].tolist() == [True, False, True, False]
    np.testing.assert_array_equal(back.deleted()[1], t.deleted()[1])
    # A later write of a restored tombstone revives the key.
    back.write(_keys(2), _vals(1, 4.0), now_ns=3)
    assert back.lookup(_keys(2))[2][0] and back.tombstones == 1


def test_delete_record_round_trips() -> None:
    rec = encode_delete(SPEC, _keys(4, -9), _keys(11, 12), 77)
    b = decode_batch(rec)
    assert b.deleted and b.spec == SPEC and b.now_ns == 77
    assert b.keys.tolist() == [4, -9] and b.versions.tolist() == [11, 12]
    assert b.values.shape == (2, SPEC.dim) and b.lanes.tolist() == [HIGH_LANE] * 2
    with pytest.raises(ValueError, match="header says"):
        decode_batch(rec[:-1])


def test_log_replay_restores_tombstones(tmp_path: Path) -> None:
    def opened() -> tuple:
        return open_durable(
            tmp_path / "snap", tmp_path / "wal", origin=0, cache_capacity=64, window_s=0.0
        )

    store, journal, _ = opened()
    t = store.create_table(SPEC)
    t.write(_keys(1, 2, 3), _vals(3), now_ns=1)
    journal.checkpoint(tmp_path / "snap")  # the rows in the snapshot, the delete in the log
    versions = t.delete(_keys(1, 8), now_ns=2)
    journal.wal.sync(timeout=10)
    digest, counter, knowledge = t.digest(), t.counter.copy(), t.knowledge.copy()
    journal.close()

    store2, journal2, replayed = opened()
    t2 = store2.table("t")
    assert replayed == 2
    assert (t2.rows, t2.tombstones) == (2, 2)
    assert t2.lookup(_keys(1, 2, 3, 8))[2].tolist() == [False, True, True, False]
    assert sorted(t2.deleted()[1].tolist()) == sorted(versions.tolist())
    assert t2.digest() == digest
    np.testing.assert_array_equal(t2.counter, counter)
    np.testing.assert_array_equal(t2.knowledge, knowledge)
    # The restarted source never reissues a version the delete took.
    again = t2.delete(_keys(3), now_ns=3)
    assert again[0] == counter[_shard(3)] + 1
    journal2.close()


def test_purge_forgets_tombstones_at_or_below_each_shards_floor() -> None:
    t = Table(SPEC)
    keys = np.arange(40, dtype=np.int64)
    t.write(keys, _vals(40), now_ns=1)
    versions = t.delete(keys[:20], now_ns=2)
    shards = shard_of(keys[:20], SPEC.num_shards)
    floor = t.counter.copy()
    floor[0] = 0  # shard 0's tombstones stay: a holder has not seen them
    held_back = int((shards == 0).sum())
    assert t.purge(floor) == 20 - held_back
    assert (t.rows, t.tombstones) == (20, held_back)
    kept_keys, kept_versions = t.deleted()
    assert sorted(kept_keys.tolist()) == sorted(keys[:20][shards == 0].tolist())
    assert set(kept_versions.tolist()) <= set(versions.tolist())
    assert not t.lookup(keys[:20])[2].any() and t.lookup(keys[20:])[2].all()
    assert t.versions_of(keys[:20])[0][shards != 0].tolist() == [0] * (20 - held_back)
    stats = t.statistics()
    assert (stats.tombstones_purged, stats.free_slots) == (20 - held_back, 20 - held_back)
    assert t.purge(floor) == 0  # nothing more at or below the floor
    # A cursor below a purged floor is answered by the full scan (the cache names freed
    # slots); it finds every live row and no freed slot.
    c = t.collect(np.arange(4), np.full(4, HIGH_LANE), np.zeros(4, np.int64))
    assert c.full_scan[floor > 0].all()
    got = set(t.rows_at(c.slots)[0].tolist())
    assert got == set(keys[20:].tolist()) | set(kept_keys.tolist())


def test_steady_churn_reuses_freed_slots_and_memory_stays_flat(tmp_path: Path) -> None:
    """Delete the oldest keys, purge, write new ones, over and over: the table never grows
    past the live set, and what it serves, digests and snapshots is exactly the live set."""
    store = Store()
    t = store.create_table(SPEC, initial_rows=1024)
    live = 1000
    t.write(np.arange(live, dtype=np.int64), _vals(live), now_ns=1)
    capacity = t.capacity
    for step in range(50):
        old = np.arange(step * 40, step * 40 + 40, dtype=np.int64)
        t.delete(old, now_ns=2 + step)
        assert t.purge(t.counter) == 40
        t.write(old + live, _vals(40, float(step)), now_ns=2 + step)
    assert (t.rows, t.tombstones, t.capacity) == (live, 0, capacity)
    assert t.statistics().free_slots == 0
    keys = np.arange(2000, 2000 + live, dtype=np.int64)
    assert t.lookup(keys)[2].all() and not t.lookup(np.arange(2000))[2].any()
    store.save(tmp_path / "s")
    back = Store.load(tmp_path / "s").table("t")
    assert back.digest() == t.digest() and (back.rows, back.tombstones) == (live, 0)
    fresh = Table(SPEC)
    k, v, ver, wt, ln = t.all_rows()
    fresh.apply(k, v, ver, wt, ln)
    assert fresh.digest() == t.digest()
