"""Snapshots: exact round trip, and a damaged file never yields a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ekko.store import SnapshotError, Store, shard_of
from ekko.store.spec import LANES, LOW_LANE, NEW_LANE, TableSpec


def filled_store() -> Store:
    store = Store(origin=7, cache_capacity=4)
    user = store.create_table(TableSpec("user", 5, 3))
    rng = np.random.default_rng(1)
    for step in range(5):
        keys = rng.integers(-1000, 1000, 200).astype(np.int64)
        user.write(keys, rng.standard_normal((200, 5)), now_ns=step, lanes=LANES[step % len(LANES)])
    user.merge_knowledge(0, LOW_LANE, 10**6)
    item = store.create_table(TableSpec("item", 2, 1))
    item.apply(
        np.array([1, 2], dtype=np.int64),
        np.ones((2, 2)),
        np.array([50, 60]),
        np.array([5, 6]),
        np.array([0, 1]),
    )
    store.create_table(TableSpec("empty", 3, 2))
    return store


def test_round_trip_is_exact(tmp_path: Path) -> None:
    """DESIGN.md §3 (Catch-up): a restarted node recovers rows, versions and counters."""
    store = filled_store()
    path = tmp_path / "node.snap"
    store.save(path)
    back = Store.load(path, cache_capacity=16)
    assert back.origin == 7 and back.catalog_version == store.catalog_version
    assert back.specs() == store.specs()
    assert back.digests() == store.digests()
    for name, t in store.tables.items():
        b = back.table(name)
        assert b.counter.tolist() == t.counter.tolist()
        assert b.knowledge.tolist() == t.knowledge.tolist()
        assert b.shard_version.tolist() == t.shard_version.tolist()
        for got, want in zip(b.all_rows(), t.all_rows(), strict=True):
            np.testing.assert_array_equal(got, want)
        assert b.cache_capacity == 16
    assert not list(tmp_path.glob(".*tmp*"))


def test_restored_source_writes_above_its_old_versions(tmp_path: Path) -> None:
    """DESIGN.md §3: a restarted source continues numbering above what it wrote."""
    store = filled_store()
    store.save(tmp_path / "s")
    back = Store.load(tmp_path / "s")
    user = back.table("user")
    keys = np.arange(30, dtype=np.int64)
    shards = shard_of(keys, 3)
    old = store.table("user").counter
    versions = user.write(keys, np.zeros((30, 5)), now_ns=99)
    assert (versions > old[shards]).all()


def test_restored_pulls_fall_back_to_full_scan(tmp_path: Path) -> None:
    """DESIGN.md §3 (update cache): with an empty cache the dominator is the counter, so an
    older cursor is answered by a full scan and a current one from the (empty) cache."""
    store = filled_store()
    store.save(tmp_path / "s")
    back = Store.load(tmp_path / "s", cache_capacity=4)
    t, orig = back.table("user"), store.table("user")
    shards = np.array([0, 1, 2, 0, 2])
    lanes = np.array([0, 1, 0, 1, NEW_LANE])
    after = np.array([0, 5, int(t.counter[2]), 0, 0])
    got = t.collect(shards, lanes, after)
    want = orig.collect(shards, lanes, after, use_cache=False)
    assert got.full_scan.tolist() == [True, True, False, True, True]
    assert got.segment(4).size  # the last shard's new-key lane holds rows
    assert got.offsets.tolist() == want.offsets.tolist()
    assert got.slots.tolist() == want.slots.tolist()
    assert got.segment(2).size == 0


def test_copy_is_what_a_snapshot_taken_now_restores(tmp_path: Path) -> None:
    """``Store.copy`` (a simulated node's disk) is ``save`` + ``load`` without the file: same
    rows, counters, knowledge and lineage, empty caches, and nothing shared with the original."""
    store = filled_store()
    store.lineage = 99
    store.save(tmp_path / "s")
    loaded, copy = Store.load(tmp_path / "s", cache_capacity=4), store.copy()
    assert copy.lineage == loaded.lineage == 99
    assert copy.catalog_version == loaded.catalog_version and copy.origin == loaded.origin
    assert copy.digests() == loaded.digests() == store.digests()
    for name, t in loaded.tables.items():
        c = copy.table(name)
        for got, want in zip(
            (c.counter, c.knowledge, c.shard_version, c.dvv),
            (t.counter, t.knowledge, t.shard_version, t.dvv),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    before = copy.digests()
    user = store.table("user")
    user.write(np.arange(5, dtype=np.int64), np.full((5, 5), 3.0), now_ns=100)
    user.knowledge[:] += 1
    assert copy.digests() == before
    assert (copy.table("user").knowledge < user.knowledge).all()


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Store().save(path)
    filled_store().save(path)
    assert Store.load(path).digests() == filled_store().digests()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_empty_store_round_trip(tmp_path: Path) -> None:
    Store(origin=2).save(tmp_path / "e")
    back = Store.load(tmp_path / "e")
    assert back.origin == 2 and back.specs() == [] and back.catalog_version == 0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="nope"):
        Store.load(tmp_path / "nope")


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_truncated_snapshot_is_refused(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "node.snap"
    filled_store().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SnapshotError, match=r"node\.snap"):
        Store.load(path)


def test_every_corrupted_byte_region_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.snap"
    filled_store().save(path)
    data = path.read_bytes()
    step = max(1, len(data) // 97)
    for pos in range(0, len(data), step):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(SnapshotError, match=r"node\.snap"):
            Store.load(path)


def test_trailing_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.snap"
    filled_store().save(path)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(SnapshotError, match="trailing"):
        Store.load(path)


def test_inconsistent_content_is_refused(tmp_path: Path) -> None:
    """A well-formed file whose rows contradict its counters is not half-loaded."""
    from ekko.store.snapshot import SnapshotData, SnapshotTable, write_snapshot

    arrays = {
        "keys": np.array([1, 1], dtype=np.int64),  # duplicate key
        "values": np.zeros((2, 2), dtype=np.float32),
        "versions": np.array([1, 2], dtype=np.int64),
        "wtimes": np.zeros(2, dtype=np.int64),
        "lanes": np.zeros(2, dtype=np.uint8),
        "counter": np.array([5], dtype=np.int64),
        "knowledge": np.zeros((1, 2), dtype=np.int64),
        "shard_version": np.zeros(1, dtype=np.int64),
    }
    path = tmp_path / "dup.snap"
    write_snapshot(path, SnapshotData(0, 1, [SnapshotTable("t", 2, 1, arrays)]))
    with pytest.raises(SnapshotError, match=r"dup\.snap.*duplicate"):
        Store.load(path)
    arrays["keys"] = np.array([1, 2], dtype=np.int64)
    arrays["counter"] = np.array([1], dtype=np.int64)  # below a row's version
    write_snapshot(path, SnapshotData(0, 1, [SnapshotTable("t", 2, 1, arrays)]))
    with pytest.raises(SnapshotError, match="counter"):
        Store.load(path)
    del arrays["wtimes"]
    write_snapshot(path, SnapshotData(0, 1, [SnapshotTable("t", 2, 1, arrays)]))
    with pytest.raises(SnapshotError, match="wtimes"):
        Store.load(path)


def test_knowledge_from_before_the_new_key_lane_is_restored_with_nothing_in_it() -> None:
    src = filled_store().table("user")
    keys, values, versions, wtimes, lanes = src.all_rows()[:5]
    two_lanes = src.knowledge[:, :2].copy()
    back = Store(cache_capacity=4).create_table(TableSpec("user", 5, 3))
    back.restore_rows(keys, values, versions, wtimes, lanes, counter=src.counter,
                      knowledge=two_lanes, shard_version=src.shard_version)  # fmt: skip
    assert back.knowledge[:, :2].tolist() == two_lanes.tolist()
    assert (back.knowledge[:, 2] == 0).all()
    back2 = Store(cache_capacity=4).create_table(TableSpec("user", 5, 3))
    with pytest.raises(Exception, match="knowledge must be integer"):
        back2.restore_rows(
            keys, values, versions, wtimes, lanes, counter=src.counter,
            knowledge=src.knowledge[:2], shard_version=src.shard_version,
        )  # fmt: skip
