"""Table: against ReferenceTable on random operations, the sync invariants of DESIGN.md §3,
and input validation."""

from __future__ import annotations

import itertools
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ekko.store.index as index_mod
import ekko.store.row_arrays as row_arrays_mod
from ekko.store import BadRowsError, ReferenceTable, Table, shard_of
from ekko.store.placement import Placement
from ekko.store.spec import HIGH_LANE, LANES, LOW_LANE, NEW_LANE, TableSpec

SPEC = TableSpec("emb", 3, 3)
KEY = st.one_of(st.integers(-6, 30), st.sampled_from([-(2**63), 2**63 - 1, 2**40]))
LANE = st.sampled_from(LANES)


def value_of(key: int, version: int, dim: int = SPEC.dim) -> np.ndarray:
    """A value that is a function of (key, version), as under one origin."""
    # Within the default max_abs (1e4) for any int64 key and the versions these tests reach.
    return np.array([key % 1000, version, (key % 9973) * 0.5 + version][:dim], dtype=np.float32)


def values_for(keys: list[int], versions: list[int]) -> np.ndarray:
    out = np.zeros((len(keys), SPEC.dim), dtype=np.float32)
    for i, (k, v) in enumerate(zip(keys, versions, strict=True)):
        out[i] = value_of(k, v)
    return out


write_op = st.tuples(st.just("write"), st.lists(st.tuples(KEY, LANE), max_size=12))
apply_op = st.tuples(
    st.just("apply"), st.lists(st.tuples(KEY, st.integers(1, 60), LANE), max_size=12)
)
collect_op = st.tuples(
    st.just("collect"),
    st.lists(st.tuples(st.integers(0, 2), LANE, st.integers(0, 60)), max_size=5),
)
merge_op = st.tuples(st.just("merge"), st.tuples(st.integers(0, 2), LANE, st.integers(0, 80)))
delete_op = st.tuples(st.just("delete"), st.lists(KEY, max_size=6))
apply_dead_op = st.tuples(
    st.just("apply_dead"),
    st.lists(st.tuples(KEY, st.integers(1, 60), LANE, st.booleans()), max_size=12),
)
purge_op = st.tuples(st.just("purge"), st.lists(st.integers(0, 60), min_size=3, max_size=3))
OPS = st.lists(
    st.one_of(write_op, apply_op, collect_op, merge_op, delete_op, apply_dead_op, purge_op),
    max_size=30,
)


def run_op(table: Table | ReferenceTable, op: tuple, now: int) -> object:
    kind, args = op
    if kind == "write":
        keys = [k for k, _ in args]
        vals = values_for(keys, [now] * len(keys))
        lanes = np.array([ln for _, ln in args], dtype=np.uint8)
        return table.write(np.array(keys, dtype=np.int64), vals, now_ns=now, lanes=lanes)
    if kind == "apply":
        keys = [k for k, _, _ in args]
        vers = [v for _, v, _ in args]
        return table.apply(
            np.array(keys, dtype=np.int64),
            values_for(keys, vers),
            np.array(vers, dtype=np.int64),
            np.full(len(keys), now, dtype=np.int64),
            np.array([ln for _, _, ln in args], dtype=np.int64),
        )
    if kind == "merge":
        return table.merge_knowledge(*args)
    if kind == "purge":
        return table.purge(np.array(args, dtype=np.int64))
    if kind == "delete":
        return table.delete(np.array(args, dtype=np.int64), now_ns=now)
    if kind == "apply_dead":
        keys = [k for k, _, _, _ in args]
        vers = [v for _, v, _, _ in args]
        return table.apply(
            np.array(keys, dtype=np.int64),
            values_for(keys, vers),
            np.array(vers, dtype=np.int64),
            np.full(len(keys), now, dtype=np.int64),
            np.array([ln for _, _, ln, _ in args], dtype=np.int64),
            np.array([d for *_, d in args], dtype=bool),
        )
    return None


def collect_args(cursors: list[tuple[int, int, int]]) -> tuple[np.ndarray, ...]:
    arr = np.array(cursors, dtype=np.int64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def assert_same(fast: Table, ref: ReferenceTable) -> None:
    assert fast.rows == ref.rows
    assert fast.tombstones == ref.tombstones
    assert fast.digest() == ref.digest()
    for placement in (Placement(2), Placement(3, {"other": 1})):
        parts = placement.partitions_of(SPEC.name, SPEC.num_shards).tolist()
        assert fast.digest_partitions(placement) == ref.digest_partitions(
            parts, placement.partitions
        )
    assert fast.counter.tolist() == ref.counter
    assert fast.shard_version.tolist() == ref.shard_version
    assert fast.knowledge.tolist() == ref.knowledge
    keys = np.array([*ref.keys, 999_999], dtype=np.int64)
    for got, want in zip(fast.lookup(keys), ref.lookup(keys), strict=True):
        np.testing.assert_array_equal(got, want)
    all_slots = np.arange(len(ref.keys))
    for got, want in zip(fast.rows_at(all_slots), ref.rows_at(all_slots), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fast.dead_at(all_slots), ref.dead_at(all_slots))


def assert_dvv_invariant(t: Table) -> None:
    st = t.statistics()
    used = np.arange(st.rows + st.tombstones + st.free_slots)  # every slot, by position
    keys, _, versions, _, _ = t.rows_at(used)
    shards = shard_of(keys, t.num_shards)
    for s in range(t.num_shards):
        slots, vers = t.cache_entries(s)
        ring = set(zip(slots.tolist(), vers.tolist(), strict=True))
        for slot in np.nonzero((shards == s) & (versions > t.dvv[s]))[0].tolist():
            assert (slot, int(versions[slot])) in ring, (s, slot, versions[slot], t.dvv[s])


@settings(max_examples=200, deadline=None)
@given(ops=OPS, cache_capacity=st.integers(1, 6), prefault=st.booleans())
def test_table_matches_reference(ops: list[tuple], cache_capacity: int, prefault: bool) -> None:
    """DESIGN.md §2–§3: write, apply, collect and knowledge agree with the naive model, with a
    tiny update cache so entries fall out and the dominator moves; with ``prefault`` every
    growth goes through next-capacity arrays prepared ahead (the size floor lifted)."""
    floor = 0 if prefault else 1 << 62
    with (
        patch.object(row_arrays_mod, "PREFAULT_MIN_BYTES", floor),
        patch.object(index_mod, "PREFAULT_MIN_BYTES", floor),
    ):
        _table_matches_reference(ops, cache_capacity)


def _table_matches_reference(ops: list[tuple], cache_capacity: int) -> None:
    fast = Table(SPEC, cache_capacity=cache_capacity, initial_rows=4)
    ref = ReferenceTable(SPEC)
    for now, op in enumerate(ops, start=1):
        if op[0] == "collect":
            args = collect_args(op[1])
            want = ref.collect(*args)
            for use_cache in (True, False):
                got = fast.collect(*args, use_cache=use_cache)
                assert got.offsets.tolist() == want.offsets.tolist()
                assert got.slots.tolist() == want.slots.tolist()
            continue
        got, want = run_op(fast, op, now), run_op(ref, op, now)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want
        assert_same(fast, ref)
        assert_dvv_invariant(fast)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.one_of(write_op, apply_op), max_size=40), cap=st.integers(1, 5))
def test_dvv_invariant(ops: list[tuple], cap: int) -> None:
    """DESIGN.md §3 (update cache + dominator): after any sequence of writes and applies,
    every row whose version is above its shard's DVV has its (slot, version) in the cache."""
    t = Table(SPEC, cache_capacity=cap, initial_rows=2)
    for now, op in enumerate(ops, start=1):
        run_op(t, op, now)
    assert_dvv_invariant(t)


def batch_strategy() -> st.SearchStrategy:
    return st.lists(st.tuples(KEY, st.integers(1, 40), LANE), min_size=1, max_size=10)


def apply_batch(t: Table, batch: list[tuple[int, int, int]]) -> int:
    keys = [k for k, _, _ in batch]
    vers = [v for _, v, _ in batch]
    # Under one origin a (key, version) has one value and one lane; make the lane a function
    # of them too so any order ends in identical rows.
    lanes = [LANES[(k + v) % len(LANES)] for k, v, _ in batch]
    return t.apply(
        np.array(keys, dtype=np.int64),
        values_for(keys, vers),
        np.array(vers, dtype=np.int64),
        np.array(vers, dtype=np.int64) * 10,
        np.array(lanes, dtype=np.uint8),
    )


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(batch_strategy(), min_size=1, max_size=5))
def test_apply_is_idempotent(batches: list[list[tuple[int, int, int]]]) -> None:
    """DESIGN.md §3 (Pull): applying the same batch twice equals applying it once."""
    once, twice = Table(SPEC, cache_capacity=3), Table(SPEC, cache_capacity=3)
    for b in batches:
        apply_batch(once, b)
        apply_batch(twice, b)
        assert apply_batch(twice, b) == 0
    assert once.digest() == twice.digest()
    assert once.counter.tolist() == twice.counter.tolist()


@settings(max_examples=100, deadline=None)
@given(
    batches=st.lists(batch_strategy(), min_size=1, max_size=4),
    data=st.data(),
)
def test_apply_is_order_insensitive(batches: list, data: st.DataObject) -> None:
    """DESIGN.md §3 (Pull): any order of the same batches (and of rows inside them) ends in
    the same table content."""
    digests = set()
    perms = list(itertools.permutations(range(len(batches))))
    orders = [perms[0], *data.draw(st.lists(st.sampled_from(perms), min_size=1, max_size=4))]
    for perm in orders:
        t = Table(SPEC, cache_capacity=2)
        for i in perm:
            b = batches[i]
            apply_batch(t, data.draw(st.permutations(b)))
        digests.add(t.digest())
    assert len(digests) == 1


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.one_of(write_op, apply_op, delete_op, purge_op), max_size=40),
    cursors=st.lists(st.tuples(st.integers(0, 2), LANE, st.integers(0, 70)), max_size=8),
    cap=st.integers(1, 8),
)
def test_collect_cache_equals_full_scan(ops: list, cursors: list, cap: int) -> None:
    """DESIGN.md §3 (update cache): a pull answered from the cache returns exactly the rows a
    full scan returns — also once purges freed slots the cache still names and new keys took
    them."""
    t = Table(SPEC, cache_capacity=cap)
    for now, op in enumerate(ops, start=1):
        run_op(t, op, now)
    args = collect_args(cursors)
    # Also cursors exactly at the dominator, which must use the cache.
    dvv_cursors = collect_args([(s, ln, int(t.dvv[s])) for s in range(3) for ln in LANES])
    for a in (args, dvv_cursors):
        cached = t.collect(*a)
        scanned = t.collect(*a, use_cache=False)
        assert cached.offsets.tolist() == scanned.offsets.tolist()
        assert cached.slots.tolist() == scanned.slots.tolist()
        assert scanned.full_scan.all()
    assert not t.collect(*dvv_cursors).full_scan.any()


# -- single behaviours -------------------------------------------------------------------------


def table(**kw: object) -> Table:
    return Table(TableSpec("t", 4, 2), **kw)  # type: ignore[arg-type]


def test_write_assigns_versions_per_shard_in_order() -> None:
    t = table()
    keys = np.array([5, 6, 5, 7], dtype=np.int64)
    vals = np.arange(16, dtype=np.float32).reshape(4, 4)
    versions = t.write(keys, vals, now_ns=42, lanes=LOW_LANE)
    shards = shard_of(keys, 2)
    for s in (0, 1):
        got = versions[shards == s].tolist()
        assert got == list(range(1, len(got) + 1))
    got_vals, got_ver, found = t.lookup(np.array([5, 8], dtype=np.int64))
    np.testing.assert_array_equal(got_vals[0], vals[2])  # last one wins
    np.testing.assert_array_equal(got_vals[1], np.zeros(4))
    assert got_ver.tolist() == [versions[2], 0] and found.tolist() == [True, False]
    # The origin's knowledge moves in the lane it wrote, and only there.
    assert t.knowledge.tolist() == [[0, c, 0] for c in t.counter.tolist()]
    assert t.rows_at(np.array([0]))[3].tolist() == [42]
    assert t.rows_at(np.array([0]))[4].tolist() == [LOW_LANE]
    t.write(np.array([5, 7], dtype=np.int64), vals[:2], now_ns=43,
            lanes=np.array([HIGH_LANE, NEW_LANE], np.uint8))  # fmt: skip
    s5, s7 = shard_of(np.array([5, 7], dtype=np.int64), 2).tolist()
    assert (
        t.knowledge[s5, HIGH_LANE] == t.counter[s5] and t.knowledge[s7, NEW_LANE] == t.counter[s7]
    )
    assert t.knowledge[:, LOW_LANE].tolist() == [int(versions[shards == s].max()) for s in (0, 1)]
    assert t.statistics().rows_written == 6


def test_promoted_replica_continues_numbering() -> None:
    """DESIGN.md §3: apply raises the counter, so a replica promoted to source writes above
    every version it received."""
    t = table()
    key = np.array([3], dtype=np.int64)
    s = int(shard_of(key, 2)[0])
    t.apply(key, np.ones((1, 4)), np.array([100]), np.array([0]), HIGH_LANE)
    assert t.counter[s] == 100
    assert t.write(key, np.zeros((1, 4)), now_ns=1).tolist() == [101]


def test_apply_counts_and_stats() -> None:
    t = table()
    keys = np.array([1, 2, 3], dtype=np.int64)
    assert t.apply(keys, np.ones((3, 4)), np.array([5, 5, 5]), np.zeros(3, dtype=np.int64), 0) == 3
    assert t.apply(keys, np.ones((3, 4)), np.array([4, 5, 6]), np.zeros(3, dtype=np.int64), 0) == 1
    assert t.statistics().rows_applied == 4
    t.collect(np.array([0]), np.array([0]), np.array([0]))
    t.collect(np.array([0]), np.array([0]), np.array([0]), use_cache=False)
    stats = t.statistics()
    assert (stats.cache_hits, stats.full_scans, stats.rows) == (1, 1, 3)


def test_apply_without_change_keeps_shard_version() -> None:
    t = table()
    keys = np.array([1, 2], dtype=np.int64)
    t.apply(keys, np.ones((2, 4)), np.array([5, 5]), np.zeros(2, dtype=np.int64), 0)
    before = t.shard_version.copy()
    assert t.apply(keys, np.ones((2, 4)), np.array([5, 5]), np.zeros(2, dtype=np.int64), 0) == 0
    assert t.shard_version.tolist() == before.tolist()


def test_full_scan_serves_several_cursors_on_one_shard() -> None:
    t = Table(TableSpec("t", 1, 1), cache_capacity=1)
    lanes = np.array([0, 0, 0, 0, 0, 1], dtype=np.uint8)
    t.write(np.arange(6, dtype=np.int64), np.zeros((6, 1)), now_ns=1, lanes=lanes)
    got = t.collect(np.array([0, 0, 0]), np.array([0, 0, 1]), np.array([3, 1, 0]))
    assert got.full_scan.tolist() == [True, True, True]
    assert [got.segment(i).tolist() for i in range(3)] == [[3, 4], [1, 2, 3, 4], [5]]
    assert len(got) == 3


def test_cursor_above_everything_its_lane_held_skips_the_scan() -> None:
    """A cursor at or above the highest version its lane ever stored has nothing to collect,
    so it is answered without a full scan even below the dominator; only with the cache on
    (``use_cache=False`` is the ablation's always-scan baseline)."""
    t = Table(TableSpec("t", 1, 1), cache_capacity=1)
    lanes = np.array([1, 0, 0, 0], dtype=np.uint8)
    t.write(np.arange(4, dtype=np.int64), np.zeros((4, 1)), now_ns=1, lanes=lanes)
    assert t.lane_top.tolist() == [[4, 1, 0]]
    shards, ln = np.array([0, 0, 0]), np.array([1, 1, 0])
    after = np.array([1, 0, 2])  # all below the dominator (cache of one entry)
    got = t.collect(shards, ln, after)
    assert got.full_scan.tolist() == [False, True, True]
    assert [got.segment(i).tolist() for i in range(3)] == [[], [0], [2, 3]]
    scanned = t.collect(shards, ln, after, use_cache=False)
    assert scanned.full_scan.tolist() == [True, True, True]
    assert scanned.slots.tolist() == got.slots.tolist()
    # Every cursor empty: answered without the kernel at all.
    none = t.collect(np.array([0, 0]), np.array([1, 0]), np.array([1, 4]))
    assert none.offsets.tolist() == [0, 0, 0] and not none.full_scan.any()


def test_rows_at_returns_copies() -> None:
    t = table()
    t.write(np.array([9], dtype=np.int64), np.ones((1, 4)), now_ns=1)
    _, vals, _, _, _ = t.rows_at(np.array([0]))
    vals[:] = 5
    assert (t.lookup(np.array([9], dtype=np.int64))[0] == 1).all()
    with pytest.raises(BadRowsError, match="slots"):
        t.rows_at(np.array([1]))


def test_digest_ignores_insertion_order_and_sees_one_bit() -> None:
    keys = np.array([3, 1, 2], dtype=np.int64)
    vals = np.arange(12, dtype=np.float32).reshape(3, 4)
    vers = np.array([7, 8, 9])
    a, b = table(), table()
    a.apply(keys, vals, vers, np.zeros(3, dtype=np.int64), 0)
    b.apply(keys[::-1].copy(), vals[::-1], vers[::-1], np.ones(3, dtype=np.int64), 1)
    assert a.digest() == b.digest()
    assert 0 <= a.digest() < 2**64
    flipped = vals.copy()
    flipped.view(np.uint32)[1, 2] ^= 1
    c = table()
    c.apply(keys, flipped, vers, np.zeros(3, dtype=np.int64), 0)
    assert c.digest() != a.digest()
    d = table()
    d.apply(keys, vals, vers + np.array([0, 0, 1]), np.zeros(3, dtype=np.int64), 0)
    assert d.digest() != a.digest()
    assert table().digest() == 0


# -- validation: errors name the problem, nothing changes ---------------------------------------


def loaded() -> Table:
    t = table()
    t.write(np.array([1, 2], dtype=np.int64), np.ones((2, 4)), now_ns=1)
    return t


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.write(np.array([1], dtype=np.int32), np.ones((1, 4)), now_ns=2), "int32"),
        (lambda t: t.write(np.array([1.0]), np.ones((1, 4)), now_ns=2), "float64"),
        (lambda t: t.write(np.array([[1]], dtype=np.int64), np.ones((1, 4)), now_ns=2), "1-D"),
        (
            lambda t: t.write(np.array([1, 3], dtype=np.int64), np.ones((2, 3)), now_ns=2),
            r"\(2, 4\), got \(2, 3\)",
        ),
        (
            lambda t: t.write(np.array([1], dtype=np.int64), [["x"] * 4], now_ns=2),
            "float32",
        ),
        (
            lambda t: t.write(np.array([3], dtype=np.int64), np.ones((1, 4)), now_ns=2, lanes=3),
            "lane",
        ),
        (
            lambda t: t.apply(np.array([3], dtype=np.uint32), np.ones((1, 4)), [5], [0], 0),
            "uint32",
        ),
        (
            lambda t: t.apply(np.array([3, 4], dtype=np.int64), np.ones((2, 4)), [5, 0], [0, 0], 0),
            "versions",
        ),
        (
            lambda t: t.apply(np.array([3], dtype=np.int64), np.ones((1, 4)), [5], [0, 1], 0),
            "wtimes",
        ),
        (
            lambda t: t.apply(
                np.array([3], dtype=np.int64), np.ones((1, 4)), [5], [0], np.array([0, 1])
            ),
            "lanes",
        ),
        (lambda t: t.lookup(np.array([1], dtype=np.int16)), "int16"),
        (lambda t: t.collect(np.array([2]), np.array([0]), np.array([0])), "shards"),
        (lambda t: t.collect(np.array([0]), np.array([3]), np.array([0])), "lanes"),
        (lambda t: t.collect(np.array([0]), np.array([0]), np.array([0.5])), "after"),
    ],
)
def test_bad_input_raises_and_changes_nothing(call: object, match: str) -> None:
    t = loaded()
    before = (t.digest(), t.rows, t.counter.tolist(), t.shard_version.tolist())
    with pytest.raises(BadRowsError, match=match):
        call(t)  # type: ignore[operator]
    assert (t.digest(), t.rows, t.counter.tolist(), t.shard_version.tolist()) == before


def test_values_are_converted_to_float32() -> None:
    t = table()
    t.write(np.array([1], dtype=np.int64), [[1, 2, 3, 4]], now_ns=1)
    got = t.lookup(np.array([1], dtype=np.int64))[0]
    assert got.dtype == np.float32 and got.tolist() == [[1, 2, 3, 4]]


def test_empty_batches() -> None:
    t = table()
    empty = np.zeros(0, dtype=np.int64)
    assert t.write(empty, np.zeros((0, 4)), now_ns=1).shape == (0,)
    assert t.apply(empty, np.zeros((0, 4)), empty, empty, 0) == 0
    vals, vers, found = t.lookup(empty)
    assert vals.shape == (0, 4) and vers.shape == (0,) and found.shape == (0,)
    got = t.collect(empty, empty, empty)
    assert got.slots.shape == (0,) and got.offsets.tolist() == [0]
    assert t.digest() == 0 and t.shard_version.tolist() == [0, 0]


# -- lane bound --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.one_of(write_op, apply_op), max_size=30))
def test_lane_top_bounds_every_row_of_its_lane(ops: list[tuple]) -> None:
    """``lane_top`` is an upper bound on the version of every row now in that lane, so a
    cursor at or above it has nothing to collect (what ``collect`` relies on to skip)."""
    t = Table(SPEC, cache_capacity=2)
    for now, op in enumerate(ops, start=1):
        run_op(t, op, now)
    keys, _, versions, _, lanes = t.all_rows()
    shards = shard_of(keys, t.num_shards)
    assert (versions <= t.lane_top[shards, lanes.astype(np.int64)]).all()


def test_versions_at_copies_and_checks_slots() -> None:
    t = table()
    versions = t.write(np.array([4, 5], dtype=np.int64), np.ones((2, 4)), now_ns=1)
    got = t.versions_at(np.array([1, 0]))
    assert got.tolist() == [versions[1], versions[0]]
    got[:] = 0
    assert t.versions_at(np.array([0])).tolist() == [versions[0]]
    with pytest.raises(BadRowsError, match="slots"):
        t.versions_at(np.array([2]))
