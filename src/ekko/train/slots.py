"""The row bookkeeping of a dynamic table: which id holds which row, admission, eviction.

Plain numpy, apart from the ``nn.Module`` that owns the rows' values (assigning attributes
of a module goes through its ``__setattr__``, several times slower than a plain object's, on
a path that runs for every table of every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ekko.train.admission import Admission, AdmissionConfig
from ekko.train.eviction import (
    EVICTION_REASONS,
    RANKED_KINDS,
    EvictionConfig,
    RowStats,
    expired,
    victims,
)
from ekko.train.id_map import MISSING, IdMap
from ekko.train.memory_budget import MemoryBudget


@dataclass(frozen=True)
class SlotStatistics:
    """Counters since construction. ``admitted``: ids given a row; ``rejected``: ids a
    training step read from the default row (not admitted, or no row free), once per step
    they appear in; ``evicted``: rows freed by LRU / LFU / TTL, ``evicted_by`` the same by
    reason (``EVICTION_REASONS``: the table's row budget, the model's memory budget at the
    node, TTL); ``rows``: rows holding an id now (never above ``row_budget``)."""

    rows: int
    row_budget: int
    admitted: int
    rejected: int
    evicted: int
    evicted_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVICTION_REASONS, 0))


class Slots:
    """Raw id -> row slot in [0, budget), with admission and eviction; ``budget`` is the
    default slot every id without a row reads.

    Why apart from the module: it is the policy, testable without torch; the module applies
    its decisions (fresh rows and optimizer state for evicted slots) to the parameter.

    ``memory``: a budget of bytes shared with other tables (``MemoryBudget``), each row
    costing ``row_bytes``; it may evict rows of this table while another one looks up:
    ``take_freed`` hands them over.
    """

    def __init__(
        self,
        budget: int,
        admission: AdmissionConfig,
        eviction: EvictionConfig,
        *,
        memory: MemoryBudget | None = None,
        row_bytes: int = 0,
    ) -> None:
        self.budget = budget
        self.default = budget
        self.eviction = eviction
        self._map = IdMap(budget)
        self._admission = Admission(admission)
        self._idle_rows = admission.idle_rows
        self._ids = np.full(budget, MISSING, dtype=np.int64)
        self._occupied = np.zeros(budget, dtype=bool)
        self._touched_step = np.zeros(budget, dtype=np.int64)
        self._touched_at = np.zeros(budget, dtype=np.float64)
        self._freq = np.zeros(budget, dtype=np.int64)
        self._born_step = np.zeros(budget, dtype=np.int64)  # for "rate" eviction
        self._seen = np.zeros(budget, dtype=np.int64)  # sightings since admission, not aged
        self._sightings = 0  # since the frequencies were last halved
        self._aging = max(1, int(eviction.lfu_aging * budget))  # sightings between halvings
        self._free = np.arange(budget - 1, -1, -1, dtype=np.int64)  # a stack: pops 0, 1, …
        self._n_free = budget
        self._step = 0
        self._step_open = False  # a training lookup happened since the last end_step
        self._next_expiry = -np.inf
        self._gone: list[np.ndarray] = []  # ids freed since the last take_freed
        self._gone_slots: list[np.ndarray] = []  # ... and their slots
        self.admitted = 0
        self.rejected = 0
        self.evicted_by = dict.fromkeys(EVICTION_REASONS, 0)
        self.row_bytes = row_bytes
        self._memory = memory
        if memory is not None:
            memory.attach(self)

    @property
    def evicted(self) -> int:
        return sum(self.evicted_by.values())

    @property
    def rows(self) -> int:
        return self.budget - self._n_free

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` [n]; the default slot for ids without a row. Changes nothing."""
        slots = self._map.lookup(ids)
        slots[slots == MISSING] = self.default
        return slots

    def end_step(self) -> None:
        """The training step's backward pass ran: the next lookup starts a new step."""
        self._step_open = False

    def assign(self, ids: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A training lookup of ``ids`` [n] at time ``now``: touch the rows held, expire,
        admit and evict. Returns (slots [n], evicted ids, their slots). Lookups until
        ``end_step`` are one step: no row any of them read is evicted (their gradients are
        still to come)."""
        if not self._step_open:
            mem = self._memory
            self._step = self._step + 1 if mem is None else mem.open_step(self._step)
            self._step_open = True
        uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        slots = self._map.lookup(uniq)
        hit = slots != MISSING
        held = slots[hit]
        self._touched_step[held] = self._step
        self._touched_at[held] = now
        self._freq[held] += counts[hit]
        self._seen[held] += counts[hit]
        if self._memory is not None:
            self._memory.sighted(ids.size)  # the tables sharing it age together
        else:
            self._sightings += ids.size
            if self._sightings >= self._aging:
                self.halve_frequencies()
                self._sightings = 0
        self._expire(now)
        miss = np.flatnonzero(~hit)
        if miss.size:
            admit = self._admission.admit(uniq[miss], counts[miss])
            placed, got = self._rows_for(miss[admit], counts, idle_only=False)
            if self._idle_rows:  # the turned away may take free or idle rows
                more, got_more = self._rows_for(miss[~admit], counts, idle_only=True)
                placed = np.concatenate([placed, more])
                got = np.concatenate([got, got_more])
            self._place(uniq[placed], got, counts[placed], now)
            slots[placed] = got
            self.admitted += got.size
            self.rejected += miss.size - got.size
        slots[slots == MISSING] = self.default
        gone_ids, gone_slots = self.take_freed()
        return slots[inverse.reshape(-1)], gone_ids, gone_slots

    def take_freed(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) evicted since the last call: by this table's lookups, or by another
        table's under a shared ``MemoryBudget`` (their slots need fresh rows too)."""
        empty = np.empty(0, dtype=np.int64)
        ids = np.concatenate(self._gone) if self._gone else empty
        slots = np.concatenate(self._gone_slots) if self._gone_slots else empty
        self._gone, self._gone_slots = [], []
        return ids, slots

    def halve_frequencies(self) -> None:
        """LFU ranks recent frequency: what an id was drifts away."""
        self._freq >>= 1

    def evictable(self, idle_only: bool = False) -> tuple[np.ndarray, RowStats]:
        """(slots, their statistics) of the rows eviction may take: all rows held but those
        looked up in the open step (their gradients are still to come); ``idle_only``: of
        aged frequency 0 only."""
        pool = self._occupied.copy()
        if self._step_open:
            pool &= self._touched_step != self._step
        if idle_only:
            pool &= self._freq == 0
        slots = np.flatnonzero(pool)
        stats = RowStats(
            self._touched_step[slots], self._freq[slots], self._born_step[slots], self._seen[slots]
        )
        return slots, stats

    def still_evictable(self, slots: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """bool [n]: whether each of ``slots`` still holds the id of ``ids`` it held when
        ranked and is still evictable (not looked up in the open step)."""
        ok = self._occupied[slots] & (self._ids[slots] == ids)
        if self._step_open:
            ok &= self._touched_step[slots] != self._step
        return ok

    def ids_of(self, slots: np.ndarray) -> np.ndarray:
        """The ids rows ``slots`` hold (``MISSING`` for a free one)."""
        return self._ids[slots]

    def evict(self, slots: np.ndarray, reason: str) -> None:
        """Free the rows ``slots`` (evictable ones) for ``reason`` (``EVICTION_REASONS``)."""
        self._free_slots(np.asarray(slots, dtype=np.int64), reason)

    def load(self, ids: np.ndarray, now: float) -> np.ndarray:
        """Slots for ``ids`` (unique) past admission and without eviction: a resume from the
        store. ``MISSING`` for the ids beyond the free rows."""
        slots = self._map.lookup(ids)
        new = np.flatnonzero(slots == MISSING)
        got = self._allocate(new.size, evict=False)
        placed = new[: got.size]
        self._place(ids[placed], got, np.ones(got.size, dtype=np.int64), now)
        slots[placed] = got
        return slots

    def drop(self, ids: np.ndarray) -> np.ndarray:
        """Free the rows of those ``ids`` held, counting no eviction: the store no longer
        holds them (a rollback deleted the ids created since its healthy point). Returns
        their slots, for fresh rows; nothing goes to ``take_freed`` (nothing to delete)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        slots = self._map.lookup(ids)
        held = slots != MISSING
        ids, slots = ids[held], slots[held]
        if slots.size:
            self._release(ids, slots)
        return slots

    def keys_of(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of the ``slots`` holding an id now (not the default, not freed)."""
        slots = np.asarray(slots, dtype=np.int64)
        slots = slots[(slots >= 0) & (slots < self.budget)]
        slots = slots[self._occupied[slots]]
        return self._ids[slots], slots

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of every row holding an id."""
        return self.keys_of(np.flatnonzero(self._occupied))

    def _place(self, ids: np.ndarray, slots: np.ndarray, counts: np.ndarray, now: float) -> None:
        self._map.insert(ids, slots)
        self._ids[slots] = ids
        self._occupied[slots] = True
        self._touched_step[slots] = self._step
        self._touched_at[slots] = now
        self._freq[slots] = counts
        self._born_step[slots] = self._step
        self._seen[slots] = counts

    def _rows_for(
        self, wanted: np.ndarray, counts: np.ndarray, *, idle_only: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows for the unique ids at positions ``wanted``, the most sighted first (``counts``
        by position). Returns (positions placed, their slots)."""
        wanted = wanted[np.argsort(-counts[wanted], kind="stable")]
        got = self._allocate(wanted.size, evict=True, idle_only=idle_only)
        return wanted[: got.size], got

    def _allocate(self, k: int, *, evict: bool, idle_only: bool = False) -> np.ndarray:
        """Up to ``k`` free slots, evicting under LRU / LFU / rate when the free ones are too few
        (with ``idle_only``, only rows of aged frequency 0, least recently used first), and
        within the memory budget (which may evict rows of any table sharing it)."""
        kind = self.eviction.kind
        if evict and k > self._n_free and kind in RANKED_KINDS:
            candidates, stats = self.evictable(idle_only)
            rank = "lru" if idle_only else kind
            need = k - self._n_free
            out = victims(rank, candidates, stats, need, self._step, self.eviction)
            self._free_slots(out, "row_budget")
        take = min(k, self._n_free)
        if self._memory is not None and take:
            take = self._memory.make_room(self, take, evict=evict, idle_only=idle_only)
        self._n_free -= take
        return self._free[self._n_free : self._n_free + take][::-1].copy()

    def _expire(self, now: float) -> None:
        ttl = self.eviction.ttl_s
        if ttl is None or now < self._next_expiry:
            return
        self._free_slots(expired(self._occupied, self._touched_at, now, ttl), "ttl")
        occupied = self._touched_at[self._occupied]
        # touch times only rise, so the oldest one bounds the next expiry from below
        self._next_expiry = (occupied.min() if occupied.size else now) + ttl

    def _free_slots(self, slots: np.ndarray, reason: str) -> None:
        """Unmap the ids of ``slots`` (kept with the slots for ``take_freed``), free them."""
        if slots.size == 0:
            return
        ids = self._ids[slots]
        self._gone.append(ids)
        self._gone_slots.append(slots)
        self._release(ids, slots)
        self.evicted_by[reason] += int(slots.size)

    def _release(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Unmap ``ids`` and put their ``slots`` back on the free stack."""
        self._map.remove(ids)
        self._ids[slots] = MISSING
        self._occupied[slots] = False
        self._freq[slots] = 0
        self._free[self._n_free : self._n_free + slots.size] = slots
        self._n_free += slots.size

    def statistics(self) -> SlotStatistics:
        return SlotStatistics(
            self.rows, self.budget, self.admitted, self.rejected, self.evicted,
            dict(self.evicted_by),
        )  # fmt: skip
