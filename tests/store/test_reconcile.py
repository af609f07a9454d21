"""A holder that missed purged deletes: reconcile drops exactly the keys its upstream lost,
stale rows below the purge floor are refused, and the floor survives a snapshot."""

from pathlib import Path

import numpy as np
import pytest

from ekko.store import BadRowsError, Store, Table, shard_of
from ekko.store.spec import HIGH_LANE, LOW_LANE, TableSpec

SPEC = TableSpec("t", 4, 4)


def _vals(n: int, x: float = 1.0) -> np.ndarray:
    return np.full((n, SPEC.dim), x, dtype=np.float32)


def _copy_into(src: Table, dst: Table) -> None:
    k, v, ver, wt, ln, dead = src.all_slots()
    keep = ver > 0
    dst.apply(k[keep], v[keep], ver[keep], wt[keep], ln[keep], dead[keep])


def test_reconcile_drops_only_keys_whose_delete_was_purged_upstream() -> None:
    source, holder = Table(SPEC), Table(SPEC)
    keys = np.arange(64, dtype=np.int64)
    source.write(keys, _vals(64), now_ns=1)
    _copy_into(source, holder)  # the holder then sleeps through what follows
    floor_before = source.counter.copy()
    source.delete(keys[:16], now_ns=2)
    source.purge(source.counter)  # everyone else had the deletes
    late = source.delete(keys[16:20], now_ns=3)  # tombstones not purged yet
    source.write(keys[20:24], _vals(4, 2.0), now_ns=4)  # newer rows the holder lacks
    assert (source.purge_floor >= floor_before).all() and source.purge_epoch == 1
    slots = source.all_slots()
    held_all = slots[0][slots[2] > 0]
    dropped = 0
    for s in range(SPEC.num_shards):
        held = held_all[shard_of(held_all, SPEC.num_shards) == s]
        dropped += holder.drop_absent(s, source.purge_bar[s], held)
    assert dropped == 16
    found = holder.lookup(keys)[2]
    assert not found[:16].any() and found[16:].all()  # 16..19 wait for their tombstones
    assert holder.statistics().rows_reconciled == 16
    assert (holder.reconcile_epoch > 0).sum() == len(set(shard_of(keys[:16], 4).tolist()))
    holder.purge(source.purge_bar)  # it follows its upstream's bars
    assert (holder.purge_floor == source.purge_floor).all() and holder.purge_epoch == 1
    # The rest arrives as rows: the late tombstones and the newer rows.
    _copy_into(source, holder)
    assert holder.digest() == source.digest() and holder.rows == source.rows
    assert set(late.tolist()) <= set(holder.versions_of(keys[16:20])[0].tolist())


def test_reconcile_keeps_rows_above_the_floor_and_keys_the_upstream_holds() -> None:
    t = Table(SPEC)
    keys = np.arange(32, dtype=np.int64)
    versions = t.write(keys, _vals(32), now_ns=1)
    s = int(shard_of(keys[:1], SPEC.num_shards)[0])
    mine = keys[shard_of(keys, SPEC.num_shards) == s]
    # The upstream lists none of them, but only rows at or below its floor may go.
    cut = int(np.sort(versions[shard_of(keys, SPEC.num_shards) == s])[1])
    assert t.drop_absent(s, np.array([cut, 0, 0]), np.zeros(0, np.int64)) == 2
    assert t.lookup(mine)[2].sum() == mine.size - 2
    # Rows of a lane whose bar is 0 stay: the upstream may not hold that lane yet.
    assert t.drop_absent(s, np.array([0, cut + 100, cut + 100]), np.zeros(0, np.int64)) == 0
    before = t.digest()
    assert t.drop_absent(s, np.array([cut + 100] * 3), mine) == 0  # all listed: none go
    assert t.digest() == before


def test_a_stale_row_below_the_purge_floor_is_redundant() -> None:
    t = Table(SPEC)
    keys = np.arange(8, dtype=np.int64)
    t.write(keys, _vals(8), now_ns=1)
    old = [a.copy() for a in t.all_rows()]
    t.delete(keys, now_ns=2)
    t.merge_knowledge_many(np.arange(SPEC.num_shards), HIGH_LANE, t.counter)
    assert t.redundant(old[0], old[2], HIGH_LANE) is None  # nothing purged yet
    t.purge(t.counter)
    mask = t.redundant(old[0], old[2], HIGH_LANE)
    assert mask is not None and mask.all()
    # Knowledge of the low lane is 0: a low-lane row there may still be news.
    assert t.redundant(old[0], old[2], LOW_LANE) is None


def test_the_purge_floor_survives_a_snapshot(tmp_path: Path) -> None:
    store = Store()
    t = store.create_table(SPEC)
    t.write(np.arange(10, dtype=np.int64), _vals(10), now_ns=1)
    t.delete(np.arange(5, dtype=np.int64), now_ns=2)
    t.purge(t.counter)
    store.save(tmp_path / "s")
    back = Store.load(tmp_path / "s").table("t")
    assert (back.purge_floor == t.purge_floor).all() and back.tombstones == 0
    assert (store.copy().table("t").purge_floor == t.purge_floor).all()


def test_bad_floors_are_refused_by_name() -> None:
    t = Table(SPEC)
    with pytest.raises(BadRowsError, match="purge floor must be >= 0"):
        t.purge(np.full((SPEC.num_shards, 3), -1, np.int64))
    with pytest.raises(BadRowsError, match="reconcile bar must be 3 integers >= 0"):
        t.drop_absent(0, np.array([1, -1, 0]), np.zeros(0, np.int64))
    with pytest.raises(BadRowsError, match="reconcile bar"):
        t.drop_absent(0, np.array([1]), np.zeros(0, np.int64))
    with pytest.raises(BadRowsError, match="shard"):
        t.drop_absent(SPEC.num_shards, np.zeros(3, np.int64), np.zeros(0, np.int64))
