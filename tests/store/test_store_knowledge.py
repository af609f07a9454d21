"""Knowledge only rises, one shard-version bump per move; a source write raises the knowledge
of the lanes it wrote, a replay never lowers it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store import BadRowsError, Table, shard_of
from ekko.store.knowledge import after_origin_write
from ekko.store.spec import HIGH_LANE, LANES, LOW_LANE, NEW_LANE, TableSpec

SPEC = TableSpec("emb", 3, 3)
LANE = st.sampled_from(LANES)


def table(**kw: object) -> Table:
    return Table(TableSpec("t", 4, 2), **kw)  # type: ignore[arg-type]


def test_merge_knowledge_only_moves_up() -> None:
    t = table()
    t.merge_knowledge(1, LOW_LANE, 7)
    assert t.knowledge[1].tolist() == [0, 7, 0] and t.shard_version[1] == 1
    t.merge_knowledge(1, LOW_LANE, 3)
    assert t.knowledge[1].tolist() == [0, 7, 0] and t.shard_version[1] == 1
    with pytest.raises(BadRowsError, match="shard"):
        t.merge_knowledge(2, 0, 1)


@settings(max_examples=200, deadline=None)
@given(
    start=st.lists(st.integers(0, 50), min_size=3 * len(LANES), max_size=3 * len(LANES)),
    merges=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 80)), max_size=8),
    lane=LANE,
)
def test_merge_knowledge_many_equals_one_at_a_time(
    start: list[int], merges: list[tuple[int, int]], lane: int
) -> None:
    """Merging a chunk's shards at once gives the knowledge and shard versions that merging
    them one by one gives (duplicates included: the highest wins, one bump per shard)."""
    one, many = Table(SPEC), Table(SPEC)
    for t in (one, many):
        t.knowledge[:] = np.array(start, dtype=np.int64).reshape(3, len(LANES))
    for s, k in merges:
        one.merge_knowledge(s, lane, k)
    arr = np.array(merges, dtype=np.int64).reshape(-1, 2)
    before = many.knowledge[:, lane].copy()
    moved = many.merge_knowledge_many(arr[:, 0], lane, arr[:, 1])
    assert many.knowledge.tolist() == one.knowledge.tolist()
    assert sorted(moved.tolist()) == np.flatnonzero(many.knowledge[:, lane] > before).tolist()
    assert (many.shard_version[moved] == 1).all()
    assert many.shard_version.sum() == len(moved)


def test_merge_knowledge_many_refuses_bad_input() -> None:
    t = Table(SPEC)
    with pytest.raises(BadRowsError, match="shards"):
        t.merge_knowledge_many(np.array([3]), HIGH_LANE, np.array([1]))
    with pytest.raises(BadRowsError, match="lane"):
        t.merge_knowledge_many(np.array([0]), 3, np.array([1]))
    with pytest.raises(BadRowsError, match="knowledge"):
        t.merge_knowledge_many(np.array([0, 1]), HIGH_LANE, np.array([1]))
    assert t.knowledge.sum() == 0 and t.shard_version.sum() == 0


def test_a_write_raises_only_the_lanes_it_wrote() -> None:
    knowledge = np.array([[5, 5, 5], [1, 2, 3]], dtype=np.int64)
    touched = np.array([True, True])
    top = np.array([9, 4], dtype=np.int64)
    lanes = np.array([HIGH_LANE, NEW_LANE], dtype=np.uint8)
    after_origin_write(knowledge, touched, top, lambda: np.array([0, 1]), lanes, replay=False)
    assert knowledge[:, HIGH_LANE].tolist() == [9, 1]  # shard 1 wrote no high row
    assert knowledge[:, NEW_LANE].tolist() == [5, 4]  # shard 0 wrote no new-key row
    assert knowledge[:, LOW_LANE].tolist() == [5, 2]  # nobody wrote the low lane


def test_a_one_lane_write_never_gathers_shards_and_a_replay_never_lowers() -> None:
    def no_gather() -> np.ndarray:
        raise AssertionError("a one-lane write needs no row shards")

    knowledge = np.array([[5, 5, 5], [1, 1, 1]], dtype=np.int64)
    lanes = np.full(3, LOW_LANE, dtype=np.uint8)
    top = np.array([3, 7], dtype=np.int64)
    after_origin_write(knowledge, np.array([True, True]), top, no_gather, lanes, replay=True)
    assert knowledge[:, LOW_LANE].tolist() == [5, 7]  # replay: 5 kept over 3
    after_origin_write(knowledge, np.array([True, False]), top, no_gather, lanes, replay=False)
    assert knowledge[:, LOW_LANE].tolist() == [3, 7]  # a write sets the counter


def test_a_recovered_origin_counts_on_above_the_knowledge_it_absorbed() -> None:
    """``complete_origin``: knowledge absorbed from a replica above every row it held (an
    answer cut by its budget) lifts the counter, so the next write's version is above it and
    knowledge never moves down."""
    t = table()
    t.apply(np.array([1], np.int64), np.ones((1, 4)), np.array([3]), np.array([0]), HIGH_LANE)
    t.merge_knowledge(0, NEW_LANE, 8)
    t.merge_knowledge(1, LOW_LANE, 2)
    t.complete_origin()
    assert t.knowledge[0].tolist() == [8, 8, 8] and t.counter[0] == 8
    assert t.counter[1] >= 2 and (t.knowledge[1] == t.counter[1]).all()
    key = np.array([next(k for k in range(100) if shard_of(np.array([k]), 2)[0] == 0)])
    version = t.write(key, np.zeros((1, 4)), now_ns=1, lanes=NEW_LANE)
    assert version[0] == 9 and t.knowledge[0, NEW_LANE] == 9
