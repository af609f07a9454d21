"""``lookup_tables`` and a holder's ``FramePlan``: a lookup frame's tables answered in one
buffer equal ``Table.lookup`` of each table with the rows the caller holds left out (the
plain path), tombstones and missing keys included, also while the tables change between
frames; bad input is refused by name."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store import BadRowsError, Store, Table, layout
from ekko.store.holding import Holding
from ekko.store.index import shard_of
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec
from ekko.store.table_frames import (
    FRAME_BAD_COUNTS,
    FRAME_NOT_HELD,
    FRAME_OK,
    FRAME_TOO_BIG,
    frame_plan,
    lookup_tables,
)


def _table(t: int, dim: int, written: list[int], deleted: list[int]) -> Table:
    # small initial rows: the writes grow the index and the row arrays
    table = Table(TableSpec(f"emb_{t}", dim, 4), initial_rows=4)
    if written:
        keys = np.array(written, np.int64)
        values = np.arange(keys.size * dim, dtype=np.float32).reshape(-1, dim) + t
        table.write(keys, values, now_ns=1)
    if deleted:
        table.delete(np.array(deleted, np.int64), now_ns=2)
    return table


ids = st.integers(0, 30)


@given(
    tables=st.lists(
        st.tuples(
            st.integers(1, 5),  # dim
            st.lists(ids, max_size=25),  # written
            st.lists(ids, max_size=5),  # deleted
            st.lists(ids, max_size=12),  # asked
        ),
        min_size=1,
        max_size=5,
    ),
    known_mode=st.sampled_from(["none", "held", "random"]),
    seed=st.integers(0, 2**16),
)
@settings(deadline=None)  # the first example compiles the kernel
def test_a_frames_tables_answer_as_each_tables_lookup_minus_the_rows_held(
    tables: list[tuple[int, list[int], list[int], list[int]]], known_mode: str, seed: int
) -> None:
    made = [_table(t, d, w, x) for t, (d, w, x, _) in enumerate(tables)]
    asked = [np.array(a, np.int64) for *_, a in tables]
    keys = np.concatenate(asked)
    starts = np.concatenate(([0], np.cumsum([a.size for a in asked]))).astype(np.int64)
    plain = [table.lookup(a) for table, a in zip(made, asked, strict=True)]
    versions = np.concatenate([ver for _, ver, _ in plain])
    rng = np.random.default_rng(seed)
    known = None
    if known_mode == "held":  # the caller holds some rows at their version, some not
        known = np.where(rng.random(keys.size) < 0.5, versions, -1)
    elif known_mode == "random":
        known = rng.integers(-1, 4, keys.size)
    got = lookup_tables(made, keys, starts, known)
    assert np.array_equal(got.versions, versions)
    want_rows, want_values = [], []
    for t, (vals, ver, _) in enumerate(plain):
        if known is not None:
            vals = vals[ver != known[starts[t] : starts[t + 1]]]
        want_rows.append(vals.shape[0])
        want_values.append(vals.reshape(-1))
    assert got.rows.tolist() == want_rows
    assert np.array_equal(got.values, np.concatenate(want_values))


def test_a_frame_of_bad_keys_starts_or_known_is_refused_by_name() -> None:
    table = _table(0, 2, [1, 2], [])
    keys = np.array([1, 2, 3], np.int64)
    with pytest.raises(BadRowsError, match="keys must be int64"):
        lookup_tables([table], keys.astype(np.int32), np.array([0, 3]), None)
    with pytest.raises(BadRowsError, match="starts must be int64"):
        lookup_tables([table], keys, np.array([0, 2]), None)
    with pytest.raises(BadRowsError, match="starts must be int64"):
        lookup_tables([table, table], keys, np.array([0, 3, 2]), None)
    with pytest.raises(BadRowsError, match="known: 2 versions for 3 keys"):
        lookup_tables([table], keys, np.array([0, 3]), np.array([1, 1]))


def _plain(tables: list[Table], asked: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    got = [t.lookup(a) for t, a in zip(tables, asked, strict=True)]
    versions = np.concatenate([v for _, v, _ in got])
    return versions, np.concatenate([r.reshape(-1) for r, _, _ in got])


def test_the_tables_arrays_kept_between_frames_follow_a_table_that_grew() -> None:
    """A frame's tables' arrays are kept between lookups; a write that rehashes the index
    and grows the row columns replaces them, and the next frame reads the new ones (a kept
    old array would answer the new keys as missing)."""
    tables = [_table(t, 3, [1, 2, 3], []) for t in range(3)]
    asked = [np.array([1, 2, 500], np.int64) for _ in tables]
    keys = np.concatenate(asked)
    starts = np.array([0, 3, 6, 9], np.int64)
    first = lookup_tables(tables, keys, starts, None)
    assert first.versions.tolist().count(0) == 3  # key 500 missing in each
    grown = np.arange(100, 1100, dtype=np.int64)  # from 4 rows: several rehashes, growths
    tables[1].write(grown, np.ones((grown.size, 3), np.float32), now_ns=5)
    tables[1].write(np.array([500], np.int64), np.full((1, 3), 7, np.float32), now_ns=6)
    again = lookup_tables(tables, keys, starts, None)
    versions, values = _plain(tables, asked)
    assert np.array_equal(again.versions, versions)
    assert np.array_equal(again.values, values)
    assert again.values[3 * 3 + 2 * 3 :][:3].tolist() == [7.0, 7.0, 7.0]


def _restore_in_place(tables: list[Table], t: int, keys: np.ndarray, starts: np.ndarray) -> None:
    """Replace table ``t`` by an empty table of its spec, look the set up (its arrays are
    kept), then fill that table by ``restore_rows`` from the old one's rows."""
    src = tables[t]
    keys_, values, versions, wtimes, lanes = (a.copy() for a in src.all_rows())
    back = tables[t] = Table(src.spec, initial_rows=4)
    lookup_tables(tables, keys, starts, None)
    counter, knowledge, shard_version = src.counter, src.knowledge, src.shard_version
    back.restore_rows(keys_, values, versions, wtimes, lanes, counter=counter.copy(),
                      knowledge=knowledge.copy(), shard_version=shard_version.copy())  # fmt: skip


def _ops(kinds: list[str], tables: int, most: int) -> st.SearchStrategy:
    """Changes to a set of tables between frames: (kind, which table, first key, keys — a run
    long enough to grow the table)."""
    change = st.tuples(
        st.sampled_from(kinds), st.integers(0, tables - 1), st.integers(0, 300), st.integers(0, 150)
    )
    return st.lists(change, min_size=1, max_size=most)


@given(
    ops=_ops(["write", "delete", "purge", "restore", "recreate", "same"], 3, 12),
    asked=st.lists(st.integers(0, 450), max_size=12),
)
@settings(deadline=None, max_examples=60)
def test_frames_between_writes_deletes_purges_restores_and_new_tables_read_current_rows(
    ops: list[tuple[str, int, int, int]], asked: list[int]
) -> None:
    """Between two frames over the same set of tables, a table grows, loses keys (deleted,
        then purged: the index removes them and may rehash), is replaced by its restored copy
        or by a new empty table of the same name, or by one the set was looked up with empty and
    then filled by ``restore_rows``: every frame answers as ``Table.lookup``."""
    tables = [_table(t, 2, [1, 2, 3], []) for t in range(3)]
    ask = [np.array([1, 2, 3, *asked], np.int64)] * 3
    keys, starts = np.concatenate(ask), np.arange(4, dtype=np.int64) * ask[0].size
    now = 10
    for op, t, first, n in ops:
        lookup_tables(tables, keys, starts, None)  # the set's arrays are kept
        now += 1
        k = np.arange(first, first + n, dtype=np.int64)
        if op == "write" and k.size:
            vals = np.full((k.size, 2), now, np.float32)
            tables[t].write(k, vals, now_ns=now)
        elif op == "delete" and k.size:
            tables[t].delete(k, now_ns=now)
        elif op == "purge":
            tables[t].purge(tables[t].counter.copy())
        elif op == "restore":
            _restore_in_place(tables, t, keys, starts)
        elif op == "recreate":
            tables[t] = Table(tables[t].spec, initial_rows=4)
        got = lookup_tables(tables, keys, starts, None)
        versions, values = _plain(tables, ask)
        assert np.array_equal(got.versions, versions), (op, t)
        assert np.array_equal(got.values, values), (op, t)


def test_a_grown_tables_old_arrays_are_not_kept_until_the_next_frame() -> None:
    """The kept arrays go when a table's arrays are replaced, not at the next lookup: a
    holder asked nothing more would otherwise keep a grown table's old columns alive."""
    table = _table(0, 3, [1, 2, 3], [])
    lookup_tables([table], np.array([1], np.int64), np.array([0, 1], np.int64), None)
    old = weakref.ref(table._rows.values)
    assert layout.kept
    table.write(np.arange(100, 1100, dtype=np.int64), np.ones((1000, 3), np.float32), now_ns=5)
    assert not layout.kept
    gc.collect()
    assert old() is None


# -- FramePlan: a lookup frame answered whole, as a holder's lookup stream sends it ----------


HEAD = 24


def _store_of(tables: list[Table], holding: Holding | None = None) -> Store:
    """A store with tables of ``tables``' specs and rows (a holding's: those tables empty)."""
    store = Store()
    if holding is not None:
        store.set_holding(holding)
    for table in tables:
        made = store.create_table(table.spec)
        keys, values, _, _, _ = table.all_rows()
        if keys.size:
            made.write(keys.copy(), values.copy(), now_ns=1)
    return store


def _body(asked: list[np.ndarray], known: np.ndarray | None) -> np.ndarray:
    parts = [np.array([a.size for a in asked], np.int64), *asked]
    if known is not None:
        parts.append(known)
    return np.concatenate(parts).astype("<i8").view(np.uint8)


def _names(tables: list[Table]) -> bytes:
    return "\n".join(t.name for t in tables).encode()


def _parse(out: np.ndarray, used: int, tables: int, n: int) -> tuple[np.ndarray, ...]:
    at = HEAD + 16 * tables + 8 * n
    dims = out[HEAD : HEAD + 8 * tables].view(np.int64)
    rows = out[HEAD + 8 * tables : HEAD + 16 * tables].view(np.int64)
    return dims, rows, out[HEAD + 16 * tables : at].view(np.int64), out[at:used].view("<f4")


@given(
    tables=st.lists(
        st.tuples(
            st.integers(1, 5),  # dim
            st.lists(ids, min_size=1, max_size=25),  # written
            st.lists(ids, min_size=1, max_size=12),  # asked: a frame asks each table a key
        ),
        min_size=1,
        max_size=5,
    ),
    known_mode=st.sampled_from(["none", "held", "random"]),
    seed=st.integers(0, 2**16),
)
@settings(deadline=None)
def test_a_frame_plan_answers_each_tables_lookup_minus_the_rows_held_after_its_head(
    tables: list[tuple[int, list[int], list[int]]], known_mode: str, seed: int
) -> None:
    made = [_table(t, d, w, []) for t, (d, w, _) in enumerate(tables)]
    store = _store_of(made)
    asked = [np.array(a, np.int64) for *_, a in tables]
    keys = np.concatenate(asked)
    starts = np.concatenate(([0], np.cumsum([a.size for a in asked]))).astype(np.int64)
    plain = [store.table(t.name).lookup(a) for t, a in zip(made, asked, strict=True)]
    want_versions = np.concatenate([ver for _, ver, _ in plain])
    rng = np.random.default_rng(seed)
    known = None
    if known_mode == "held":  # the caller holds some rows at their version, some not
        known = np.where(rng.random(keys.size) < 0.5, want_versions, -1)
    elif known_mode == "random":
        known = rng.integers(-1, 3, keys.size).astype(np.int64)
    want_rows, want_values = [], []
    for t, (vals, ver, _) in enumerate(plain):
        if known is not None:
            vals = vals[ver != known[starts[t] : starts[t + 1]]]
        want_rows.append(vals.shape[0])
        want_values.append(vals.reshape(-1))
    plan = frame_plan(store, _names(made), None)
    out, status, used = plan.answer(_body(asked, known), keys.size, known is not None, HEAD,
                                    1 << 30)  # fmt: skip
    assert status == FRAME_OK
    dims, rows, versions, values = _parse(out, used, len(made), keys.size)
    assert dims.tolist() == [d for d, *_ in tables]
    assert rows.tolist() == want_rows and np.array_equal(versions, want_versions)
    assert np.array_equal(values, np.concatenate(want_values))


def test_a_frame_plan_refuses_bad_counts_an_answer_too_big_and_a_key_held_elsewhere() -> None:
    placement = Placement(2)
    made = [_table(t, 2, [], []) for t in range(3)]
    store = _store_of(made, Holding("h", placement, (0,)))
    plan = frame_plan(store, _names(made), store.holding)
    held = [k for k in range(200) if all(
        placement.partitions_of(t.name, 4)[shard_of(np.array([k]), 4)[0]] == 0 for t in made
    )][:3]  # fmt: skip
    for t in made:
        store.table(t.name).write(np.array(held), np.ones((3, 2), np.float32), now_ns=1)
    asked = [np.array(held, np.int64)] * 3
    ok = _body(asked, None)
    assert plan.answer(ok, 9, False, HEAD, 1 << 20)[1] == FRAME_OK
    zero = _body([asked[0], asked[1][:0], asked[2]], None)
    assert plan.answer(zero, 6, False, HEAD, 1 << 20)[1] == FRAME_BAD_COUNTS
    assert plan.answer(ok, 8, False, HEAD, 1 << 20)[1] == FRAME_BAD_COUNTS  # sum is not n
    _, status, need = plan.answer(ok, 9, False, HEAD, 100)
    assert (status, need) == (FRAME_TOO_BIG, 9 * (8 + 4 * 2))
    elsewhere = next(k for k in range(200) if placement.partitions_of(made[1].name, 4)[
        shard_of(np.array([k]), 4)[0]] == 1)  # fmt: skip
    bad = [asked[0], np.array([held[0], elsewhere], np.int64), asked[2]]
    assert plan.answer(_body(bad, None), 8, False, HEAD, 1 << 20)[1:] == (FRAME_NOT_HELD, 1)


def test_counts_whose_sum_wraps_around_to_n_are_refused_not_read_past_the_keys() -> None:
    """Counts of 2**63 - 1 twice and n + 2 sum to n modulo 2**64 (and so does the answer
    size, for tables of one dim): each count must be within the keys left, or the kernel
    reads and writes 2**63 keys past the body (a holder's segfault without boundscheck)."""
    made = [_table(t, 2, [1, 2], []) for t in range(3)]
    store = _store_of(made)
    plan = frame_plan(store, _names(made), None)
    big = (1 << 63) - 1
    for counts in ([big, big, 4], [3, big, big], [big, 1, 1]):
        body = np.array([*counts, 1, 2], "<i8").view(np.uint8)
        assert plan.answer(body, 2, False, HEAD, 1 << 20)[1:] == (FRAME_BAD_COUNTS, 0), counts
    body = np.array([1, 1, 3, 1, 2, 1, 2, 1], "<i8").view(np.uint8)
    assert plan.answer(body, 5, False, HEAD, 1 << 20)[1] == FRAME_OK


def test_a_frame_plan_follows_its_store_grown_given_a_table_or_another_store() -> None:
    """A plan is kept per store and names: a table's arrays replaced (grown) drop it, a
    table made (the catalog moved) makes a new one, and another store with the same
    tables has its own."""
    made = [_table(t, 2, [1, 2, 3], []) for t in range(2)]
    store, other = _store_of(made), _store_of(made)
    names = _names(made)
    asked = [np.array([1, 500], np.int64)] * 2
    first = frame_plan(store, names, None)
    assert frame_plan(store, names, None) is first
    assert frame_plan(other, names, None) is not first
    grown = np.arange(100, 5100, dtype=np.int64)  # past the 1 024 rows a table starts with
    store.table("emb_1").write(grown, np.ones((grown.size, 2), np.float32), now_ns=5)
    store.table("emb_1").write(np.array([500], np.int64), np.full((1, 2), 7, np.float32), now_ns=6)
    plan = frame_plan(store, names, None)
    assert plan is not first
    out, _, used = plan.answer(_body(asked, None), 4, False, HEAD, 1 << 20)
    assert _parse(out, used, 2, 4)[3][-2:].tolist() == [7.0, 7.0]
    store.create_table(TableSpec("emb_9", 2, 4))
    assert frame_plan(store, names, None) is not plan


@given(
    ops=_ops(["write", "delete", "purge", "new table", "same"], 2, 10),
    asked=st.lists(st.integers(0, 450), max_size=10),
    known=st.booleans(),
)
@settings(deadline=None, max_examples=60)
def test_a_kept_frame_plan_answers_current_rows_between_writes_deletes_and_purges(
    ops: list[tuple[str, int, int, int]], asked: list[int], known: bool
) -> None:
    """A store's plan is kept between frames while its tables grow, lose keys (deleted,
    then purged) or a table is made: every frame answers as ``Table.lookup`` (a stale plan
    would answer the new keys missing, or read a grown table's old arrays)."""
    store = Store()
    for t in range(2):  # 4 rows: the writes grow the index and the row arrays
        made = store.create_table(TableSpec(f"emb_{t}", 2, 4), initial_rows=4)
        made.write(np.array([1, 2, 3]), np.ones((3, 2), np.float32), now_ns=1)
    names, now = b"emb_0\nemb_1", 10
    ask = [np.array([1, 2, 3, *asked], np.int64)] * 2
    n = 2 * ask[0].size
    for op, t, first, count in ops:
        frame_plan(store, names, None)  # kept, built over the arrays as they are now
        now += 1
        table, k = store.table(f"emb_{t}"), np.arange(first, first + count, dtype=np.int64)
        if op == "write" and k.size:
            table.write(k, np.full((k.size, 2), now, np.float32), now_ns=now)
        elif op == "delete" and k.size:
            table.delete(k, now_ns=now)
        elif op == "purge":
            table.purge(table.counter.copy())
        elif op == "new table":
            store.create_table(TableSpec(f"new_{now}", 3, 2))
        tables = [store.table("emb_0"), store.table("emb_1")]
        versions, values = _plain(tables, ask)
        held = versions if known else None  # every row held: no values come back
        out, status, used = frame_plan(store, names, None).answer(
            _body(ask, held), n, known, HEAD, 1 << 20
        )
        assert status == FRAME_OK
        _, rows, got_versions, got_values = _parse(out, used, 2, n)
        assert np.array_equal(got_versions, versions), (op, t)
        if known:
            assert rows.tolist() == [0, 0] and got_values.size == 0, (op, t)
        else:
            assert np.array_equal(got_values, values), (op, t)
