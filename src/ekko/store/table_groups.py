"""Keys of tables grouped by their shard's group (a partition), all tables in one call.

A serving node splits every table of every predict batch by partition
(``ekko.serve.scatter_keys``): one pass over all the keys, where a shard hash, a gather, a
count and a stable argsort per table took five numpy calls each, 26 times a batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ekko.store._native import shard_of_key
from ekko.store._validate import check_keys as _check_keys
from ekko.store.errors import BadRowsError


@njit(cache=True, nogil=True)
def _group_parts_kernel(
    keys: np.ndarray,
    starts: np.ndarray,
    num_shards: np.ndarray,
    shard_groups: np.ndarray,
    sg_starts: np.ndarray,
    order: np.ndarray,
    grouped: np.ndarray,
    counts: np.ndarray,
) -> bool:
    groups = counts.shape[0]
    tables = num_shards.shape[0]
    parts = np.empty(keys.shape[0], dtype=np.int64)
    for t in range(tables):
        ns, base = num_shards[t], sg_starts[t]
        for i in range(starts[t], starts[t + 1]):
            g = shard_groups[base + shard_of_key(keys[i], ns)]
            if g < 0 or g >= groups:
                return False
            parts[i] = g
            counts[g, t] += 1
    at = np.empty((groups, tables), dtype=np.int64)
    acc = 0
    for g in range(groups):
        for t in range(tables):
            at[g, t] = acc
            acc += counts[g, t]
    for t in range(tables):
        for i in range(starts[t], starts[t + 1]):
            g = parts[i]
            j = at[g, t]
            order[j] = i
            grouped[j] = keys[i]
            at[g, t] = j + 1
    return True


class TableShardGroups:
    """The keys of every table of a lookup, concatenated, grouped by their shard's group (a
    partition, say) in one call: group by group, each table's keys of the group in order.

    Why: a serving node splits every table of every predict batch by partition; one call
    per table cost a validation and a kernel call each, 26 times a batch. Built once per
    set of tables (each table's ``shard_groups`` checked here), used by every batch.

    Args:
        shard_groups: per table, int64 ``[num_shards >= 1]``: each shard's group.
        groups: how many groups (partitions) there are.
    """

    def __init__(self, shard_groups: list[np.ndarray], groups: int) -> None:
        if groups < 1:
            raise BadRowsError(f"groups must be >= 1, got {groups}")
        if not shard_groups:
            raise BadRowsError("shard_groups: expected one array per table, got none")
        sgs = [np.ascontiguousarray(g, dtype=np.int64) for g in shard_groups]
        for t, sg in enumerate(sgs):
            if sg.ndim != 1 or sg.shape[0] < 1:
                raise BadRowsError(
                    f"shard_groups[{t}] must be int64 [num_shards >= 1], got {sg.shape}"
                )
            if sg.min() < 0 or sg.max() >= groups:
                raise BadRowsError(
                    f"shard_groups[{t}] must be in [0, {groups}), got {sg.min()}..{sg.max()}"
                )
        self.groups = groups
        self.tables = len(sgs)
        self._num_shards = np.array([sg.shape[0] for sg in sgs], dtype=np.int64)
        self._sg_starts = np.concatenate(([0], np.cumsum(self._num_shards)[:-1]))
        self._shard_groups = np.concatenate(sgs)

    def group_parts(
        self, keys: np.ndarray, starts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(order, grouped, counts)`` of ``keys`` int64 ``[n]``, table ``t``'s keys at
        ``keys[starts[t]:starts[t + 1]]`` (``starts`` int64 ``[tables + 1]``, from 0 to n),
        group by group: group 0's keys of table 0 (in their order), then its keys of table
        1, ..., then group 1's; ``order`` (int64 ``[n]``) the position of each in ``keys``,
        ``grouped`` the keys in that order and ``counts`` each group's count per table (int64
        ``[groups, tables]``). What a scatter sends each partition: one array of its keys of
        every table."""
        arr, st = self._checked(keys, starts)
        order = np.empty(arr.shape[0], dtype=np.int64)
        grouped = np.empty(arr.shape[0], dtype=np.int64)
        counts = np.zeros((self.groups, self.tables), dtype=np.int64)
        ok = _group_parts_kernel(
            arr, st, self._num_shards, self._shard_groups, self._sg_starts, order, grouped, counts
        )
        if not ok:  # checked at construction: a bug if it happens
            raise AssertionError("a shard group out of range after construction")
        return order, grouped, counts

    def _checked(self, keys: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = _check_keys(keys)
        st = np.asarray(starts)
        if (
            st.dtype != np.int64
            or st.shape != (self.tables + 1,)
            or st[0] != 0
            or st[-1] != arr.shape[0]
            or (st[1:] < st[:-1]).any()
        ):
            raise BadRowsError(
                f"starts must be int64 [{self.tables + 1}] rising from 0 to {arr.shape[0]} "
                f"keys, got {st.dtype} {st.tolist()[:8]}"
            )
        return arr, np.ascontiguousarray(st)
