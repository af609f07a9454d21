"""Which partition holds each (table, shard): the placement every process of a partitioned
cluster shares (issue 17).

Why a stable hash of the table's name and not the tables' order: tables are created while the
cluster runs (a new model, a trainer's first write), and a placement that moved existing
shards whenever a table appeared would move their rows between servers. Each table's shards
are dealt round-robin from a start its name picks, so every partition holds an equal share
(±1 shard) of every table with at least as many shards as partitions.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import numpy as np


class PlacementError(ValueError):
    """A placement that cannot be used: a bad partition count, or an override naming a shard
    or partition that does not exist."""


class Placement:
    """Maps (table, shard) to a partition in ``[0, partitions)``; ``overrides`` pin whole
    tables (``{table: partition}``) — small dense tables, say, kept on one partition."""

    def __init__(self, partitions: int, overrides: Mapping[str, int] | None = None) -> None:
        if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
            raise PlacementError(f"partitions must be an integer >= 1, got {partitions!r}")
        self.partitions = partitions
        self.overrides = dict(overrides or {})
        for table, p in self.overrides.items():
            if not 0 <= p < partitions:
                raise PlacementError(
                    f"table {table!r} is pinned to partition {p}, which is not in [0, {partitions})"
                )

    def start(self, table: str) -> int:
        """The partition of the table's shard 0."""
        pinned = self.overrides.get(table)
        if pinned is not None:
            return pinned
        return zlib.crc32(table.encode()) % self.partitions

    def partition_of(self, table: str, shard: int) -> int:
        if shard < 0:
            raise PlacementError(f"table {table!r}: shard must be >= 0, got {shard}")
        if table in self.overrides:
            return self.overrides[table]
        return (self.start(table) + shard) % self.partitions

    def partitions_of(self, table: str, num_shards: int) -> np.ndarray:
        """int64 [num_shards]: each shard's partition."""
        if table in self.overrides:
            return np.full(num_shards, self.overrides[table], dtype=np.int64)
        return (self.start(table) + np.arange(num_shards, dtype=np.int64)) % self.partitions

    def shards_of(self, table: str, num_shards: int, partitions: Iterable[int]) -> np.ndarray:
        """int64: the table's shards held by any of ``partitions``, ascending."""
        wanted = np.asarray(sorted(set(partitions)), dtype=np.int64)
        bad = wanted[(wanted < 0) | (wanted >= self.partitions)]
        if bad.size:
            raise PlacementError(f"partition {int(bad[0])} is not in [0, {self.partitions})")
        return np.flatnonzero(np.isin(self.partitions_of(table, num_shards), wanted))
