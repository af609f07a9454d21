"""A memory budget per node: the bytes a model's dynamic tables may hold together.

A row budget per table splits a node's memory evenly whatever the traffic: a table whose ids
repeat (a user table) holds rows nobody looks up while a busy one (an item table on a
drifting stream) evicts rows it still needs. The budget here is shared: when a table admits
ids past it, the least valuable rows of ALL the model's tables leave, by the tables' policy
(LRU: the oldest last-touched step; LFU: the lowest aged frequency, ties the least recently
used; rate: the fewest expected lookups per step). For that the scores must compare across
tables, so the tables count steps on one clock (``open_step``: a step is the lookups of every
table before a backward pass) and age their frequencies together (every ``lfu_aging`` x the
tables' row budgets summed sightings of all of them, as one table ages after ``lfu_aging`` x
its own).

Bytes are counted as the store counts them (``ekko.store.holding.row_bytes``: 4 B a value
plus key, version, write time, lane, shard, dead flag and the key index's share), so the
rows a node's store holds of the model stay within the budget; tombstones the evictions
leave are the store's until purged (``ekko.node.tombstone_purge``). Evictions are the
tables' own (``Slots.evict``): the publisher deletes them from the store like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ekko.store.holding import row_bytes
from ekko.train.eviction import RANKED_KINDS, EvictionConfig, RowStats, scores

if TYPE_CHECKING:
    from ekko.train.slots import Slots

__all__ = ["MemoryBudget", "MemoryBudgetStatistics", "row_bytes"]

MAX_BUDGET_BYTES = 1 << 60


@dataclass(frozen=True)
class MemoryBudgetStatistics:
    """``max_bytes`` the budget, ``used_bytes`` what the tables' rows take now (never above
    it after a lookup), ``rows`` those rows, ``evicted`` rows that left for the budget."""

    max_bytes: int
    used_bytes: int
    rows: int
    evicted: int


class MemoryBudget:
    """The bytes the rows of several dynamic tables may take together, with the evictions
    that keep them within.

    Why one object over the tables and not a per-table share: which table deserves the
    memory is a matter of traffic, known only at run time; the globally least valuable row
    leaves first, wherever it is.

    Args:
        max_bytes: the budget (rows x ``row_bytes(dim)``).
        eviction: the tables' policy; ``RANKED_KINDS`` evict across tables for new ids,
            any other kind turns new ids away (they read the default row) while it is full.
    """

    def __init__(self, max_bytes: int, eviction: EvictionConfig) -> None:
        if not 0 < max_bytes <= MAX_BUDGET_BYTES:
            raise ValueError(f"memory budget must be in [1, 2**60] bytes: {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.eviction = eviction
        self.step = 0  # the shared step clock the tables' steps count on
        self.evicted = 0
        self._tables: list[Slots] = []
        self._sightings = 0  # of every table, since the frequencies were last halved
        # the step's ranking of the rows evictable when it was first needed: (table, slot,
        # id) by score, consumed from ``_cursor``; a row touched or freed since is skipped
        self._order_step = -1
        self._order = (np.empty(0, np.int64),) * 3
        self._cursor = 0

    @property
    def kind(self) -> str:
        """The tables' eviction kind (``eviction.kind``)."""
        return self.eviction.kind

    def attach(self, table: Slots) -> None:
        """Share the budget with ``table`` (done by ``Slots`` when given one)."""
        if table.row_bytes <= 0:
            raise ValueError(f"a table under a memory budget needs row_bytes: {table.row_bytes}")
        self._tables.append(table)

    @property
    def used_bytes(self) -> int:
        return sum(t.rows * t.row_bytes for t in self._tables)

    def open_step(self, last: int) -> int:
        """The step a table whose last step was ``last`` starts: the current one if it has
        not looked up in it yet, else a new one."""
        if last >= self.step:
            self.step += 1
        return self.step

    def sighted(self, n: int) -> None:
        """``n`` more sightings of ids in any table; halve every table's frequencies when
        they pass ``lfu_aging`` x the tables' row budgets summed."""
        self._sightings += n
        period = self.eviction.lfu_aging * sum(t.budget for t in self._tables)
        if self._sightings >= max(1, int(period)):  # as Slots ages alone
            for t in self._tables:
                t.halve_frequencies()
            self._sightings = 0

    def make_room(self, table: Slots, rows: int, *, evict: bool, idle_only: bool) -> int:
        """How many of ``rows`` new rows of ``table`` fit, evicting (with ``evict``, under
        ``RANKED_KINDS``) the least valuable rows of every table first; ``idle_only``: only rows
        of aged frequency 0, the least recently used first."""
        free = self.max_bytes - self.used_bytes
        need = rows * table.row_bytes - free
        if need > 0 and evict and self.kind in RANKED_KINDS:
            self._evict(need, "lru" if idle_only else self.kind, idle_only)
            free = self.max_bytes - self.used_bytes
        return max(0, min(rows, free // table.row_bytes))

    def _ranked(self, kind: str, idle_only: bool) -> tuple[np.ndarray, ...]:
        """(table index, slot, id) of every evictable row, the lowest score first."""
        parts = [(i, *t.evictable(idle_only)) for i, t in enumerate(self._tables)]
        owner = np.concatenate([np.full(p[1].size, p[0], dtype=np.int64) for p in parts])
        slots = np.concatenate([p[1] for p in parts])
        stats = RowStats.concat([p[2] for p in parts])
        score = scores(kind, stats, self.step, self.eviction)
        order = np.argsort(score, kind="stable")
        ids = np.concatenate([self._tables[i].ids_of(s) for i, s, *_ in parts])
        return owner[order], slots[order], ids[order]

    def _evict(self, need: int, kind: str, idle_only: bool) -> None:
        """Evict the lowest-scored evictable rows of all tables until ``need`` bytes are free
        (or none is left to evict). The ranking is made once a step (every table's lookup
        may need it): a row looked up or freed since is passed over, the rest keep their
        order (what changes within a step is the frequency of rows looked up in it, and
        those may not leave)."""
        if idle_only:  # rare (admission's idle_rows): ranked afresh, among idle rows only
            order, cursor = self._ranked(kind, idle_only=True), 0
        else:
            if self._order_step != self.step:
                self._order, self._cursor = self._ranked(kind, idle_only=False), 0
                self._order_step = self.step
            order, cursor = self._order, self._cursor
        owner, slots, ids = order
        size = np.asarray([t.row_bytes for t in self._tables], dtype=np.int64)
        while need > 0 and cursor < owner.size:
            end = min(owner.size, cursor + 2 * -(-need // int(size.min())) + 16)
            o, s, k = owner[cursor:end], slots[cursor:end], ids[cursor:end]
            ok = np.zeros(o.size, dtype=bool)
            for i in np.unique(o):
                mine = o == i
                ok[mine] = self._tables[int(i)].still_evictable(s[mine], k[mine])
            cum = np.cumsum(np.where(ok, size[o], 0))
            stop = min(o.size, int(np.searchsorted(cum, need)) + 1)
            take = ok[:stop]
            for i in np.unique(o[:stop][take]):
                gone = s[:stop][take & (o[:stop] == i)]
                self._tables[int(i)].evict(gone, "node_memory")
                self.evicted += int(gone.size)
            need -= int(cum[stop - 1])
            cursor += stop
        if not idle_only:
            self._cursor = cursor

    def statistics(self) -> MemoryBudgetStatistics:
        return MemoryBudgetStatistics(
            self.max_bytes, self.used_bytes, sum(t.rows for t in self._tables), self.evicted
        )
