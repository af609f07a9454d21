"""The row bookkeeping of a dynamic table: which id holds which row, admission, eviction.

Plain numpy, apart from the ``nn.Module`` that owns the rows' values (assigning attributes
of a module goes through its ``__setattr__``, several times slower than a plain object's, on
a path that runs for every table of every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ekko.train.admission import Admission, AdmissionConfig
from ekko.train.eviction import EvictionConfig, expired, victims
from ekko.train.id_map import MISSING, IdMap


@dataclass(frozen=True)
class SlotStatistics:
    """Counters since construction. ``admitted``: ids given a row; ``rejected``: ids a
    training step read from the default row (not admitted, or no row free), once per step
    they appear in; ``evicted``: rows freed by LRU / LFU / TTL; ``rows``: rows holding an id
    now (never above ``row_budget``)."""

    rows: int
    row_budget: int
    admitted: int
    rejected: int
    evicted: int


class Slots:
    """Raw id -> row slot in [0, budget), with admission and eviction; ``budget`` is the
    default slot every id without a row reads.

    Why apart from the module: it is the policy, testable without torch; the module applies
    its decisions (fresh rows and optimizer state for evicted slots) to the parameter.
    """

    def __init__(self, budget: int, admission: AdmissionConfig, eviction: EvictionConfig) -> None:
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
        self._sightings = 0  # since the frequencies were last halved
        self._aging = 10 * budget  # sightings between halvings
        self._free = np.arange(budget - 1, -1, -1, dtype=np.int64)  # a stack: pops 0, 1, …
        self._n_free = budget
        self._step = 0
        self._step_open = False  # a training lookup happened since the last end_step
        self._next_expiry = -np.inf
        self._gone: list[np.ndarray] = []  # ids freed in the current call
        self.admitted = 0
        self.rejected = 0
        self.evicted = 0

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
            self._step += 1
            self._step_open = True
        uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        slots = self._map.lookup(uniq)
        hit = slots != MISSING
        held = slots[hit]
        self._touched_step[held] = self._step
        self._touched_at[held] = now
        self._freq[held] += counts[hit]
        self._sightings += ids.size
        if self._sightings >= self._aging:
            self._freq >>= 1  # LFU ranks recent frequency: what an id was drifts away
            self._sightings = 0
        gone = [self._expire(now)]
        miss = np.flatnonzero(~hit)
        if miss.size:
            admit = self._admission.admit(uniq[miss], counts[miss])
            placed, got = self._rows_for(miss[admit], counts, gone, idle_only=False)
            if self._idle_rows:  # the turned away may take free or idle rows
                more, got_more = self._rows_for(miss[~admit], counts, gone, idle_only=True)
                placed = np.concatenate([placed, more])
                got = np.concatenate([got, got_more])
            self._place(uniq[placed], got, counts[placed], now)
            slots[placed] = got
            self.admitted += got.size
            self.rejected += miss.size - got.size
        slots[slots == MISSING] = self.default
        gone_ids = np.concatenate(self._gone) if self._gone else np.empty(0, dtype=np.int64)
        self._gone = []
        return slots[inverse.reshape(-1)], gone_ids, np.concatenate(gone)

    def load(self, ids: np.ndarray, now: float) -> np.ndarray:
        """Slots for ``ids`` (unique) past admission and without eviction: a resume from the
        store. ``MISSING`` for the ids beyond the free rows."""
        slots = self._map.lookup(ids)
        new = np.flatnonzero(slots == MISSING)
        got, _ = self._allocate(new.size, evict=False)
        placed = new[: got.size]
        self._place(ids[placed], got, np.ones(got.size, dtype=np.int64), now)
        slots[placed] = got
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

    def _rows_for(
        self, wanted: np.ndarray, counts: np.ndarray, gone: list[np.ndarray], *, idle_only: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows for the unique ids at positions ``wanted``, the most sighted first (``counts``
        by position); the slots evicted for them go to ``gone``. Returns (positions placed,
        their slots)."""
        wanted = wanted[np.argsort(-counts[wanted], kind="stable")]
        got, evicted = self._allocate(wanted.size, evict=True, idle_only=idle_only)
        gone.append(evicted)
        return wanted[: got.size], got

    def _allocate(
        self, k: int, *, evict: bool, idle_only: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` free slots, evicting under LRU / LFU when the free ones are too few
        (with ``idle_only``, only rows of aged frequency 0, least recently used first);
        returns (slots, the slots evicted for them, still to be released)."""
        kind = self.eviction.kind
        out = np.empty(0, dtype=np.int64)
        if evict and k > self._n_free and kind in ("lru", "lfu"):
            # rows looked up in this step stay: their gradients are still to come
            pool = self._occupied & (self._touched_step != self._step)
            if idle_only:
                pool &= self._freq == 0
            candidates = np.flatnonzero(pool)
            rank = "lru" if idle_only else kind
            out = victims(rank, candidates, self._touched_step, self._freq, k - self._n_free)
            self._free_slots(out)
        take = min(k, self._n_free)
        self._n_free -= take
        return self._free[self._n_free : self._n_free + take][::-1].copy(), out

    def _expire(self, now: float) -> np.ndarray:
        ttl = self.eviction.ttl_s
        if ttl is None or now < self._next_expiry:
            return np.empty(0, dtype=np.int64)
        out = expired(self._occupied, self._touched_at, now, ttl)
        self._free_slots(out)
        occupied = self._touched_at[self._occupied]
        # touch times only rise, so the oldest one bounds the next expiry from below
        self._next_expiry = (occupied.min() if occupied.size else now) + ttl
        return out

    def _free_slots(self, slots: np.ndarray) -> None:
        """Unmap the ids of ``slots`` (kept for the caller in ``_gone``), free the slots."""
        if slots.size == 0:
            return
        ids = self._ids[slots]
        self._gone.append(ids)
        self._map.remove(ids)
        self._ids[slots] = MISSING
        self._occupied[slots] = False
        self._freq[slots] = 0
        self._free[self._n_free : self._n_free + slots.size] = slots
        self._n_free += slots.size
        self.evicted += slots.size

    def statistics(self) -> SlotStatistics:
        return SlotStatistics(self.rows, self.budget, self.admitted, self.rejected, self.evicted)
