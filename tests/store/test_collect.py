"""``Table.collect`` on both paths (update cache and full scan) against a brute-force numpy
answer, over every lane in ``LANES``, many shards (the last one included), writes, applies
and snapshot restores (DESIGN.md §3, update cache + dominator).

The full-scan kernel once sized its per-(shard, lane) chain heads for two lanes of three:
a lane-2 cursor wrote into the next shard's lane-0 head (past the array for the last
shard), so a full scan answered rows of the wrong shard and lane, or crashed the process.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store import Table, shard_of
from ekko.store.spec import LANES, TableSpec

LANE = st.sampled_from(LANES)
KEY = st.one_of(st.integers(-40, 200), st.sampled_from([-(2**63), 2**63 - 1, 2**40]))


def expected(t: Table, shards: np.ndarray, lanes: np.ndarray, after: np.ndarray) -> list:
    """Per cursor: slots of its shard and lane above ``after``, by (version, slot)."""
    keys, _, versions, _, row_lanes = t.all_rows()
    row_shards = shard_of(keys, t.num_shards)
    out = []
    for s, ln, a in zip(shards.tolist(), lanes.tolist(), after.tolist(), strict=True):
        slots = np.flatnonzero((row_shards == s) & (row_lanes == ln) & (versions > a))
        out.append(slots[np.lexsort((slots, versions[slots]))].tolist())
    return out


def assert_collects(t: Table, shards: np.ndarray, lanes: np.ndarray, after: np.ndarray) -> None:
    want = expected(t, shards, lanes, after)
    for use_cache in (True, False):
        got = t.collect(shards, lanes, after, use_cache=use_cache)
        assert len(got) == len(want)
        assert [got.segment(c).tolist() for c in range(len(got))] == want, use_cache
        if not use_cache:
            assert got.full_scan.all()


def restored(t: Table) -> Table:
    """``t`` as a node restarted from its snapshot: empty update cache, dominator at the
    counters, so every cursor below them takes the full scan."""
    back = Table(t.spec, cache_capacity=t.cache_capacity, initial_rows=4)
    back.restore_rows(
        *t.all_rows(), counter=t.counter, knowledge=t.knowledge, shard_version=t.shard_version
    )
    return back


@st.composite
def scenarios(draw: st.DrawFn) -> tuple:
    num_shards = draw(st.integers(1, 9))
    cache = draw(st.integers(1, 8))
    write = st.tuples(st.just("write"), st.lists(st.tuples(KEY, LANE), min_size=1, max_size=30))
    apply = st.tuples(
        st.just("apply"),
        st.lists(st.tuples(KEY, st.integers(1, 90), LANE), min_size=1, max_size=30),
    )
    ops = draw(st.lists(st.one_of(write, apply, st.just(("restore", None))), max_size=12))
    cursors = draw(
        st.lists(st.tuples(st.integers(0, num_shards - 1), LANE, st.integers(0, 95)), max_size=12)
    )
    return num_shards, cache, ops, cursors


@settings(max_examples=300, deadline=None)
@given(scenario=scenarios())
def test_cache_and_full_scan_equal_brute_force(scenario: tuple) -> None:
    num_shards, cache, ops, cursors = scenario
    t = Table(TableSpec("emb", 2, num_shards), cache_capacity=cache, initial_rows=4)
    for now, (kind, rows) in enumerate(ops, start=1):
        if kind == "restore":
            t = restored(t)
            continue
        keys = np.array([r[0] for r in rows], np.int64)
        lanes = np.array([r[-1] for r in rows], np.uint8)
        vals = np.full((len(rows), 2), now, np.float32)
        if kind == "write":
            t.write(keys, vals, now_ns=now, lanes=lanes)
        else:
            versions = np.array([r[1] for r in rows], np.int64)
            t.apply(keys, vals, versions, np.full(len(rows), now, np.int64), lanes)
    # Random cursors, then every (shard, lane) from 0 (a new replica), then every (shard,
    # lane) at the dominator (the cache path at its boundary).
    arr = np.array(cursors, np.int64).reshape(-1, 3)
    assert_collects(t, arr[:, 0], arr[:, 1], arr[:, 2])
    every = np.array([(s, ln) for s in range(num_shards) for ln in LANES], np.int64)
    assert_collects(t, every[:, 0], every[:, 1], np.zeros(len(every), np.int64))
    assert_collects(t, every[:, 0], every[:, 1], t.dvv[every[:, 0]])


def test_full_scan_keeps_the_new_key_lane_of_the_last_shard_apart() -> None:
    """The case the two-lane kernel got wrong, small enough to read: rows in every lane of
    every shard, one full-scan cursor per (shard, lane) from version 0."""
    num_shards = 4
    t = Table(TableSpec("emb", 2, num_shards), cache_capacity=1)
    keys = np.arange(300, dtype=np.int64)
    lanes = np.array(LANES, np.uint8)[keys % len(LANES)]
    t.write(keys, np.ones((300, 2), np.float32), now_ns=1, lanes=lanes)
    every = np.array([(s, ln) for s in range(num_shards) for ln in LANES], np.int64)
    got = t.collect(every[:, 0], every[:, 1], np.zeros(len(every), np.int64), use_cache=False)
    row_shards = shard_of(keys, num_shards)
    for c, (s, ln) in enumerate(every.tolist()):
        seg = got.segment(c)
        assert seg.size and (row_shards[seg] == s).all() and (lanes[seg] == ln).all(), (s, ln)
    assert int(got.offsets[-1]) == 300
