"""What rows one node's store may take: the shards of the partitions it holds, within its
memory budget (issue 17).

Why in the store and not at the node's doors: rows enter a store by several paths (a source
write or delete, a replayed log, a puller's apply), and each must be refused the same way
before anything is stored — a row of a shard held elsewhere would be served from a node that
never receives its updates, and a table grown past the machine's memory takes the whole node
down with it. ``Store.set_holding`` has every table ask ``Holding.admit`` first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from ekko.store.errors import StoreError
from ekko.store.index import shard_of
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

if TYPE_CHECKING:
    from ekko.store.table import Table

ROW_OVERHEAD_BYTES = 8 + 8 + 8 + 1 + 4 + 1 + 32
"""Bytes a row takes besides its values: key, version, write time, lane, shard and dead
flag (``RowArrays``), and its share of the key index (two 16-byte buckets at the index's
highest load, 50 %)."""


def row_bytes(dim: int) -> int:
    """What one row of a ``dim``-wide table costs the budget."""
    return 4 * dim + ROW_OVERHEAD_BYTES


class NotHeldError(StoreError):
    """A row of a shard this node does not hold: another partition's node holds it."""


class MemoryBudgetError(StoreError):
    """A table (created, or grown by a write or apply) would take the node past its
    ``max_memory_mb``; nothing was stored."""


class Holding:
    """The partitions a store holds (under ``placement``) and its memory budget.

    Args:
        node: the node's name, for the errors.
        placement: which partition holds each (table, shard); None with ``partitions``
            None: every shard is held.
        partitions: the partitions held (None: all of ``placement``'s).
        max_bytes: the budget of every table's rows and index (``row_bytes``); None: none.
            Counted at a table's creation (its initial rows) and at each write or apply
            that adds keys; arrays grow by doubling, so the process may hold up to twice
            the rows' bytes.
        owner_of: who holds a partition (``"its source is source-p1"``), for a refusal.
    """

    def __init__(
        self,
        node: str,
        placement: Placement | None = None,
        partitions: Iterable[int] | None = None,
        max_bytes: int | None = None,
        owner_of: Callable[[int], str] | None = None,
    ) -> None:
        self.node = node
        self.placement = placement
        self.partitions = None if partitions is None else tuple(sorted(set(partitions)))
        every = (
            self.placement is not None
            and self.partitions is not None
            and (set(self.partitions) == set(range(self.placement.partitions)))
        )
        if every:
            self.partitions = None  # all of them: nothing to check per row
        self.max_bytes = max_bytes
        self.owner_of = owner_of
        self._reserved: dict[str, int] = {}  # table -> rows promised at its creation
        self._held: dict[tuple[str, int], np.ndarray] = {}  # (table, shards) -> bool [shards]

    @property
    def scoped(self) -> bool:
        """Whether some shards are held elsewhere."""
        return self.placement is not None and self.partitions is not None

    def held_shards(self, table: str, num_shards: int) -> np.ndarray:
        """bool [num_shards]: the shards of ``table`` this store holds."""
        key = (table, num_shards)
        mask = self._held.get(key)
        if mask is None:
            mask = np.ones(num_shards, dtype=bool)
            if self.scoped:
                assert self.placement is not None and self.partitions is not None
                mask[:] = np.isin(self.placement.partitions_of(table, num_shards), self.partitions)
            self._held[key] = mask
        return mask

    def initial_rows(self, spec: TableSpec, rows: int) -> int:
        """The share of ``rows`` (a whole table's) this store's shards are due to hold."""
        mask = self.held_shards(spec.name, spec.num_shards)
        return max(1, -(-rows * int(mask.sum()) // spec.num_shards))

    def admit_table(self, tables: Mapping[str, Table], spec: TableSpec, rows: int) -> None:
        """Raise ``MemoryBudgetError`` if a new table of ``rows`` rows does not fit."""
        if self.max_bytes is not None:
            extra = rows * row_bytes(spec.dim)
            used = self.used_bytes(tables)
            if used + extra > self.max_bytes:
                raise MemoryBudgetError(
                    f"node {self.node}: table {spec.name!r} (partitions "
                    f"{self._partitions_text(spec)}) with {rows} initial rows needs "
                    f"{_mb(extra)} MB; the node holds {_mb(used)} MB of its "
                    f"max_memory_mb = {_mb(self.max_bytes)}"
                )
        self._reserved[spec.name] = rows

    def admit(self, tables: Mapping[str, Table], table: Table, keys: np.ndarray) -> None:
        """Raise before ``keys`` (checked int64) enter ``table``: ``NotHeldError`` for a key
        of a shard held elsewhere, ``MemoryBudgetError`` when its new keys do not fit."""
        if keys.shape[0] == 0:
            return
        self.check_held(table, keys)
        if self.max_bytes is None:
            return
        versions, _dead = table.versions_of(keys)
        unknown = keys[versions == 0]
        if unknown.size == 0:
            return
        used = self.used_bytes(tables)
        if self._growth(table, unknown.size) + used <= self.max_bytes:
            return  # fits even if no key repeats: no need to count the distinct ones
        new = np.unique(unknown)
        extra = int(new.size) * row_bytes(table.dim)
        grows = self._growth(table, new.size)
        if used + grows > self.max_bytes:
            new_shards = shard_of(new, table.num_shards)
            parts = sorted({self._partition(table.name, int(s)) for s in np.unique(new_shards)})
            raise MemoryBudgetError(
                f"node {self.node}: table {table.name!r} partition "
                f"{','.join(map(str, parts))}: {new.size} new rows ({_mb(extra)} MB) would "
                f"take the node to {_mb(used + grows)} MB, over its max_memory_mb = "
                f"{_mb(self.max_bytes)}; nothing of this write was stored"
            )

    def check_held(self, table: Table, keys: np.ndarray) -> None:
        """Raise ``NotHeldError`` naming the partition of the first of ``keys`` (int64) in a
        shard held elsewhere. Reads check too: a lookup here would answer such a key "not
        found" while its partition's holders have it."""
        if not self.scoped or keys.shape[0] == 0:
            return
        shards = shard_of(keys, table.num_shards)
        held = self.held_shards(table.name, table.num_shards)
        out = ~held[shards]
        if out.any():
            s = int(shards[np.flatnonzero(out)[0]])
            assert self.placement is not None
            p = self.placement.partition_of(table.name, s)
            owner = f" ({self.owner_of(p)})" if self.owner_of is not None else ""
            raise NotHeldError(
                f"node {self.node}: table {table.name!r} shard {s} is in partition {p}, "
                f"which this node does not hold (it holds {list(self.partitions or ())})"
                f"{owner}; {int(out.sum())} of {keys.shape[0]} keys refused"
            )

    def _growth(self, table: Table, new_rows: int) -> int:
        """Bytes ``new_rows`` more rows add to what the budget counts of ``table`` (rows
        within its creation's promise are counted already)."""
        after = (table.rows + table.tombstones + int(new_rows)) * row_bytes(table.dim)
        return max(0, after - self._table_bytes(table))

    def used_bytes(self, tables: Mapping[str, Table]) -> int:
        """What the budget counts now: each table's rows (or its creation's promise)."""
        return sum(self._table_bytes(t) for t in tables.values())

    def _table_bytes(self, table: Table) -> int:
        rows = max(table.rows + table.tombstones, self._reserved.get(table.name, 0))
        return rows * row_bytes(table.dim)

    def _partition(self, table: str, shard: int) -> int:
        return 0 if self.placement is None else self.placement.partition_of(table, shard)

    def _partitions_text(self, spec: TableSpec) -> str:
        if self.placement is None:
            return "all"
        mask = self.held_shards(spec.name, spec.num_shards)
        parts = self.placement.partitions_of(spec.name, spec.num_shards)[mask]
        return ",".join(str(int(p)) for p in np.unique(parts))


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f}"
