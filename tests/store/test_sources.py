"""A store holding partitions of several sources (issue 17, ``ekko.store.sources``): a
history (lineage, settled knowledge) per source; one source's rebuild or restart touches
only its shards; snapshots keep each partition's lineage and old ones still load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ekko.store import SnapshotError, Store, StoreError, shard_of
from ekko.store.placement import Placement
from ekko.store.settled import Mark
from ekko.store.snapshot import read_snapshot, write_snapshot
from ekko.store.sources import SourceGroups
from ekko.store.spec import LANES, TableSpec

PLACEMENT = Placement(3)
GROUPS = [(0, 2), (1,)]  # source A holds partitions 0 and 2, source B partition 1
SPECS = (TableSpec("a", 4, 8), TableSpec("b", 2, 5))


def _group_of(p: int) -> int:
    return next(i for i, g in enumerate(GROUPS) if p in g)


def _filled(seed: int, value: float) -> Store:
    """Every table written in every lane, rows of every partition."""
    store = Store(cache_capacity=64)
    rng = np.random.default_rng(seed)
    for spec in SPECS:
        t = store.create_table(spec)
        for lane in LANES:
            keys = rng.integers(0, 1 << 30, 300)
            t.write(keys, np.full((300, spec.dim), value + lane, np.float32), now_ns=1,
                    lanes=lane)  # fmt: skip
    return store


def _by_source(store: Store, group: int) -> dict[str, tuple]:
    """Per table, the rows (key -> version, values) and per-shard state of ``group``'s
    shards."""
    out = {}
    for name, t in store.tables.items():
        mask = np.isin(PLACEMENT.partitions_of(name, t.num_shards), GROUPS[group])
        keys, values, versions, _, lanes = t.all_rows()
        sel = mask[shard_of(keys, t.num_shards)]
        rows = {
            int(k): (int(v), int(ln), tuple(x.tolist()))
            for k, v, ln, x in zip(keys[sel], versions[sel], lanes[sel], values[sel], strict=True)
        }
        out[name] = (rows, t.knowledge[mask].tolist(), t.counter[mask].tolist())
    return out


def _multi(seed: int = 1) -> Store:
    store = _filled(seed, 1.0)
    store.set_sources(PLACEMENT, GROUPS)
    for p in range(PLACEMENT.partitions):
        store.history((p,)).lineage = 100 + _group_of(p)
    return store


def test_each_source_has_its_own_history_and_a_span_is_refused_by_name():
    store = _multi()
    assert store.multi_source
    assert store.lineages() == {p: 100 + _group_of(p) for p in range(PLACEMENT.partitions)}
    assert store.history((0, 2)) is store.history((2,)) is not store.history((1,))
    with pytest.raises(StoreError, match=r"partitions \[0, 1\] come from 2 sources"):
        store.history((0, 1))
    with pytest.raises(StoreError, match="holds partitions of 2 sources"):
        _ = store.lineage  # no one lineage: ask for partitions
    one = Store()
    one.set_sources(PLACEMENT, [(0, 1, 2)])  # one source: the store's one history
    assert not one.multi_source and one.history((1,)) is one.history()


@pytest.mark.parametrize(
    ("groups", "needle"),
    [([(0,), ()], "group 1 is empty"), ([(0, 1), (1,)], "partition 1 is in two groups"),
     ([(0,), (3,)], r"partition 3 is not in \[0, 3\)")],
)  # fmt: skip
def test_bad_source_groups_are_refused_by_name(groups, needle):
    with pytest.raises(StoreError, match=needle):
        SourceGroups(PLACEMENT, groups)


@pytest.mark.parametrize("rebuilt", range(len(GROUPS)))
def test_a_rebuild_replaces_one_sources_shards_and_keeps_the_others(rebuilt: int):
    store = _multi()
    kept = 1 - rebuilt
    before_kept = _by_source(store, kept)
    sv_before = {n: t.shard_version.copy() for n, t in store.tables.items()}
    for t in store.tables.values():
        t.reconcile_epoch[:] = np.arange(t.num_shards) + 3
    epochs = {n: t.reconcile_epoch.copy() for n, t in store.tables.items()}
    other = _filled(9, 5.0)  # the new lineage's store: rows of every partition, new values
    other.create_table(TableSpec("only_new", 2, 4))  # a table the old store lacks
    other.table("only_new").write(np.arange(50), np.ones((50, 2), np.float32), now_ns=2)
    other.lineage = 777
    catalog = store.catalog_version
    store.replace_with(other, GROUPS[rebuilt])
    after_kept = _by_source(store, kept)
    assert after_kept.pop("only_new")[0] == {}  # the new table: nothing of the kept source
    assert after_kept == before_kept  # rows, versions, lanes, values, knowledge, counters
    assert _by_source(store, rebuilt) == _by_source(other, rebuilt)
    assert store.history(GROUPS[rebuilt]).lineage == 777
    assert store.history(GROUPS[kept]).lineage == 100 + kept
    assert store.history(GROUPS[rebuilt]).settled is other.settled
    assert store.catalog_version > max(catalog, other.catalog_version)
    for name, before in epochs.items():
        assert (store.table(name).reconcile_epoch == before).all()  # no key lists owed
    for name, before in sv_before.items():
        t = store.table(name)
        mask = np.isin(PLACEMENT.partitions_of(name, t.num_shards), GROUPS[rebuilt])
        assert (t.shard_version[~mask] == before[~mask]).all()
        assert (t.shard_version[mask] > before[mask]).all()  # sessions see them moved


def test_settle_back_takes_back_only_the_restarted_sources_shards():
    store = _multi()
    mark = Mark(epoch=5, cut=1, durable=1)
    for g in GROUPS:
        store.history(g).settled.settle_back(mark, {})  # follow epoch 5, nothing settled
    knowledge = {n: t.knowledge.copy() for n, t in store.tables.items()}
    store.settle_back(Mark(epoch=6, cut=1, durable=1), (1,))  # source B restarted
    for name, t in store.tables.items():
        mask = np.isin(PLACEMENT.partitions_of(name, t.num_shards), (1,))
        assert (t.knowledge[mask] == 0).all()  # nothing of B's was settled
        assert (t.knowledge[~mask] == knowledge[name][~mask]).all()
    assert store.history((1,)).settled.epoch == 6 and store.history((0,)).settled.epoch == 5
    assert store.mark((0,)).epoch == 5 and store.mark((1,)).epoch == 6


def test_settled_knowledge_is_read_per_shard_from_its_sources_history():
    store = _multi()
    for i, g in enumerate(GROUPS):
        h = store.history(g)
        h.settled.settle_back(Mark(1 + i, 0, 0), {})
        h.settled.observe(Mark(1 + i, 0, 0), {n: t.knowledge + 10 * i
                                              for n, t in store.tables.items()})  # fmt: skip
    for name, t in store.tables.items():
        parts = PLACEMENT.partitions_of(name, t.num_shards)
        expect = t.knowledge + 10 * np.array([_group_of(int(p)) for p in parts])[:, None]
        assert (store.settled_of(name) == expect).all()


def test_holds_rows_looks_at_one_sources_shards():
    store = Store()
    store.set_sources(PLACEMENT, GROUPS)
    t = store.create_table(SPECS[0])
    key = next(k for k in range(100) if PLACEMENT.partition_of("a", shard_of(
        np.array([k]), 8)[0]) == 1)  # fmt: skip
    t.write(np.array([key]), np.ones((1, 4), np.float32), now_ns=1)
    assert store.holds_rows((1,)) and not store.holds_rows((0, 2))


def test_snapshots_keep_each_partitions_lineage_and_old_ones_still_load(tmp_path: Path):
    store = _multi()
    path = tmp_path / "s.snap"
    store.save(path)
    loaded = Store.load(path)
    loaded.set_sources(PLACEMENT, GROUPS)
    assert loaded.lineages() == store.lineages()
    for g in range(len(GROUPS)):
        assert _by_source(loaded, g) == _by_source(store, g)
    copy = store.copy()
    assert copy.lineages() == store.lineages() and copy.history((1,)) is not store.history((1,))
    # A snapshot from before several sources: one lineage, every group takes it.
    data = read_snapshot(path)
    data.lineages = {}
    data.lineage = 42
    write_snapshot(path, data)
    old = Store.load(path)
    old.set_sources(PLACEMENT, GROUPS)
    assert old.lineages() == dict.fromkeys(range(PLACEMENT.partitions), 42)
    # Partitions now of one source whose rows were of two lineages: refused by name.
    store.save(path)
    mixed = Store.load(path)
    with pytest.raises(StoreError, match=r"partitions \[0, 1\] share a source"):
        mixed.set_sources(PLACEMENT, [(0, 1), (2,)])


def test_a_snapshot_with_bad_lineages_is_refused_naming_the_file(tmp_path: Path):
    store = _multi()
    path = tmp_path / "s.snap"
    data = store.snapshot_data()
    data.lineages = {0: -1}
    write_snapshot(path, data)
    with pytest.raises(SnapshotError, match=r"s\.snap.*partition 0 has lineage -1"):
        Store.load(path)
