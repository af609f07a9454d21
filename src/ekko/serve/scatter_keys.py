"""Which partition holds each key of a lookup, and one table's rows put back together from
its partitions' answers.

Pure array work over the cluster's ``Placement`` (no holders, no time): a scatter splits
each table's keys by partition with ``PartitionKeys.split`` and merges the answers with
``merge_rows``, in the keys' order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ekko.client.wire import TableRows
from ekko.serve.errors import ModelNotReady
from ekko.store import group_by_shard, shard_of
from ekko.store.placement import Placement

Where = list[tuple[int, np.ndarray | None]]
"""(partition, positions of its keys in a table's keys; None: all of them), per partition."""


class PartitionKeys:
    """Maps a table's keys to the partitions holding them.

    Why an object: each table's shard -> partition array is computed once per shard count
    and reused by every scatter.

    Args:
        placement: which partition holds each (table, shard).
        num_shards: a table's shard count (the node's catalog, or the holders' listing),
            read at every split (a table's count may become known later).
    """

    def __init__(self, placement: Placement, num_shards: Callable[[str], int]) -> None:
        self.placement = placement
        self.num_shards = num_shards
        self._shard_parts_of: dict[tuple[str, int], np.ndarray] = {}  # each shard's partition

    def _shard_parts(self, table: str) -> tuple[int, np.ndarray]:
        """The table's shard count and each shard's partition."""
        n = self.num_shards(table)
        of = self._shard_parts_of.get((table, n))
        if of is None:
            of = self._shard_parts_of[table, n] = self.placement.partitions_of(table, n)
        return n, of

    def partition_of_keys(self, table: str, keys: np.ndarray) -> np.ndarray:
        """int64 [n]: the partition holding each key of ``table``."""
        if self.placement.partitions == 1:
            return np.zeros(keys.shape[0], dtype=np.int64)
        n, of = self._shard_parts(table)
        return of[shard_of(keys, n)]

    def split(self, table: str, keys: np.ndarray) -> Where:
        """Each partition holding some of ``table``'s ``keys``, in partition order, with the
        positions of its keys (None when it holds them all)."""
        if self.placement.partitions == 1:
            return [(0, None)]
        if keys.shape[0] == 1:
            return [(int(self.partition_of_keys(table, keys)[0]), None)]
        _, of = self._shard_parts(table)
        order, counts = group_by_shard(keys, of, self.placement.partitions)
        out: Where = []
        end = 0
        for p, c in enumerate(counts.tolist()):
            if c:
                out.append((p, order[end : end + c]))
                end += c
        if len(out) == 1:
            return [(out[0][0], None)]
        return out


def merge_rows(
    table: str,
    keys: np.ndarray,
    known: np.ndarray | None,
    where: Where,
    answers: Mapping[int, Mapping[str, TableRows]],
) -> TableRows:
    """One table's ``TableRows`` over all its keys from the partitions' answers."""
    if len(where) == 1 and where[0][1] is None:
        return answers[where[0][0]][table]
    n = keys.shape[0]
    dims = {answers[p][table].values.shape[1] for p, _ in where}
    if len(dims) > 1:
        raise ModelNotReady(f"table {table!r}: its partitions answer rows of dims {sorted(dims)}")
    dim = dims.pop()
    versions = np.empty(n, dtype=np.int64)
    found = np.empty(n, dtype=np.uint8)
    for p, idx in where:
        rows = answers[p][table]
        versions[idx] = rows.versions
        found[idx] = rows.found
    if known is None:  # every row came with its values
        values = np.empty((n, dim), dtype=np.float32)
        for p, idx in where:
            values[idx] = answers[p][table].values
        return TableRows(table, versions, found, values)
    changed = versions != known
    rank = np.cumsum(changed) - 1
    values = np.empty((int(rank[-1]) + 1 if n else 0, dim), dtype=np.float32)
    for p, idx in where:
        rows = answers[p][table]
        values[rank[idx[changed[idx]]]] = rows.values
    return TableRows(table, versions, found, values)
