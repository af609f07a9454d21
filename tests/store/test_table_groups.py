"""``TableShardGroups``: many tables' keys grouped by partition in one kernel call hold, group
by group, each table's keys of the partition in their order (checked against the placement
key by key), and bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store import BadRowsError, TableShardGroups, shard_of
from ekko.store.placement import Placement


@pytest.mark.parametrize(
    ("groups", "shard_groups", "message"),
    [
        (2, [[0, 1], [0, 2]], r"shard_groups\[1\] must be in \[0, 2\), got 0..2"),
        (2, [[-1, 0]], r"shard_groups\[0\] must be in \[0, 2\), got -1..0"),
        (2, [[0], []], r"shard_groups\[1\] must be int64 \[num_shards >= 1\]"),
        (2, [], r"shard_groups: expected one array per table, got none"),
        (0, [[0]], r"groups must be >= 1, got 0"),
    ],
)
def test_shard_groups_out_of_range_are_refused(
    groups: int, shard_groups: list[list[int]], message: str
) -> None:
    with pytest.raises(BadRowsError, match=message):
        TableShardGroups([np.array(g, dtype=np.int64) for g in shard_groups], groups)


@pytest.mark.parametrize(
    ("keys", "starts", "message"),
    [
        (np.arange(5), [0, 2, 4], r"starts must be int64 \[3\] rising from 0 to 5 keys"),
        (np.arange(5), [0, 4, 2, 5], r"starts must be int64 \[3\]"),
        (np.arange(5), [1, 2, 5], r"rising from 0 to 5"),
        (np.arange(5), [0, 4, 2], r"rising from 0 to 5"),
        (np.arange(5.0), [0, 2, 5], r"keys must be int64, got dtype float64"),
    ],
)
def test_keys_and_starts_that_do_not_fit_are_refused(
    keys: np.ndarray, starts: list[int], message: str
) -> None:
    groups = TableShardGroups([np.array([0, 1]), np.array([1])], 2)
    with pytest.raises(BadRowsError, match=message):
        groups.group_parts(keys, np.array(starts, dtype=np.int64))


@given(
    tables=st.lists(
        st.tuples(
            st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=30),
            st.integers(1, 40),
        ),
        min_size=1,
        max_size=6,
    ),
    partitions=st.integers(1, 5),
)
@settings(deadline=None)  # the first example compiles the kernel
def test_grouping_partition_by_partition_holds_each_tables_keys_of_it_in_order(
    tables: list[tuple[list[int], int]], partitions: int
) -> None:
    placement = Placement(partitions)
    parts = [placement.partitions_of(f"emb_{t}", n) for t, (_, n) in enumerate(tables)]
    arrays = [np.array(keys, dtype=np.int64) for keys, _ in tables]
    starts = np.concatenate(([0], np.cumsum([a.shape[0] for a in arrays]))).astype(np.int64)
    flat = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
    order, grouped, counts = TableShardGroups(parts, partitions).group_parts(flat, starts)
    assert counts.shape == (partitions, len(tables))
    np.testing.assert_array_equal(flat[order], grouped)
    at = 0
    for g in range(partitions):
        for t, (keys, sg) in enumerate(zip(arrays, parts, strict=True)):
            mine = np.flatnonzero(sg[shard_of(keys, sg.shape[0])] == g)
            assert counts[g, t] == mine.shape[0]
            np.testing.assert_array_equal(order[at : at + mine.shape[0]], starts[t] + mine)
            at += mine.shape[0]
    assert at == flat.shape[0]
