"""Optional deferral of insignificant changes, with a staleness bound (DESIGN.md §5).

A row whose change is tiny (p_g below ``min_significance``) is not written to the source
store at once: it is held at the source, and its latest value is written no later than
``max_staleness_s`` after it was first held. Since held rows are not in the store, the next
change of such a row is measured against the value replicas last received, so drift
accumulates in |Δ| and a row that has drifted far enough is sent at once. The bound is on
staleness at replicas: rewriting a held row keeps its first-deferral time.

Bookkeeping is vectorised: per table a ``KeyIndex`` (numba open-addressing map) gives each
held key a dense slot; per slot the first-deferral time (NaN when not held) and optionally
the latest value. Release order is kept in a FIFO of (time, keys) batches, one per call, so
``due`` touches only what it releases (lazy deletion: a FIFO entry whose key was sent or
re-held since is skipped). Slots of released keys are reclaimed by compacting when most
slots are free.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ekko.store import KeyIndex


@dataclass(frozen=True)
class Released:
    """Held rows of one table whose time is up: write them (``values`` are their latest
    values when the deferrer was given values, else None: fetch them from the producer)."""

    table: str
    keys: np.ndarray
    values: np.ndarray | None
    held_since: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def last_occurrence(keys: np.ndarray) -> np.ndarray | None:
    """For each row, the index of the last row with the same key (int64[n]); None when the
    keys are all distinct (the common case, detected with one sort)."""
    n = keys.shape[0]
    if n < 2:
        return None
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    dup = ks[1:] == ks[:-1]
    if not dup.any():
        return None
    run_end = np.flatnonzero(np.append(~dup, True))  # positions (in sorted order) ending a run
    run_len = np.diff(np.append(-1, run_end))
    out = np.empty(n, dtype=np.int64)
    out[order] = np.repeat(order[run_end], run_len)
    return out


class _Held:
    """Held rows of one table."""

    def __init__(self, dim: int | None) -> None:
        self.dim = dim
        self.index = KeyIndex(1024)
        self.keys = np.zeros(1024, dtype=np.int64)
        self.first = np.full(1024, np.nan, dtype=np.float64)
        self.values = np.zeros((1024, dim), dtype=np.float32) if dim is not None else None
        self.fifo: deque[tuple[float, np.ndarray]] = deque()
        self.count = 0  # slots currently held

    def grow(self, slots: int) -> None:
        cap = self.first.shape[0]
        if slots <= cap:
            return
        new_cap = max(slots, 2 * cap)
        self.keys = np.concatenate([self.keys, np.zeros(new_cap - cap, np.int64)])
        self.first = np.concatenate([self.first, np.full(new_cap - cap, np.nan)])
        if self.values is not None:
            extra = np.zeros((new_cap - cap, self.values.shape[1]), np.float32)
            self.values = np.concatenate([self.values, extra])

    def clear(self, keys: np.ndarray) -> int:
        """Stop holding ``keys`` (those held); returns how many were held."""
        slots = self.index.lookup(keys)
        slots = slots[slots >= 0]
        cleared = np.unique(slots[~np.isnan(self.first[slots])])
        self.first[cleared] = np.nan
        self.count -= int(cleared.size)
        if len(self.index) > 4 * self.count + 65_536:
            self.compact()
        return int(cleared.size)

    def compact(self) -> None:
        """Rebuild the index from the keys still held (slots of released keys are reused)."""
        used = len(self.index)
        live = np.flatnonzero(~np.isnan(self.first[:used]))
        keys = self.keys[live]
        first = self.first[live]
        values = self.values[live] if self.values is not None else None
        cap = max(1024, 2 * live.size)
        self.index = KeyIndex(cap)
        self.index.insert(keys)  # distinct keys: slots 0..live.size-1 in order
        self.keys = np.zeros(cap, np.int64)
        self.keys[: live.size] = keys
        self.first = np.full(cap, np.nan)
        self.first[: live.size] = first
        if values is not None:
            self.values = np.zeros((cap, values.shape[1]), np.float32)
            self.values[: live.size] = values


class Deferrer:
    """Holds insignificant row changes back, because most optimizer steps move most rows by
    a hair and sending each of them wastes WAN bytes; the staleness bound keeps replicas from
    drifting for longer than the operator allowed.

    A row is held when ``significance < min_significance`` and it is eligible (callers make
    new keys ineligible: replicas must learn of a key at once). A row sent now clears any
    hold on its key (its newest value is going out). Within one batch, a repeated key follows
    its last occurrence, as ``Table.write`` does. Time is passed in; ``now`` should not go
    backwards (a smaller ``now`` is treated as the largest seen so far).
    """

    def __init__(self, min_significance: float, max_staleness_s: float) -> None:
        if not (min_significance >= 0 and math.isfinite(min_significance)):
            raise ValueError(f"min_significance must be finite and >= 0, got {min_significance}")
        if not (max_staleness_s >= 0 and math.isfinite(max_staleness_s)):
            raise ValueError(f"max_staleness_s must be finite and >= 0, got {max_staleness_s}")
        self.min_significance = float(min_significance)
        self.max_staleness_s = float(max_staleness_s)
        self._tables: dict[str, _Held] = {}
        self._now = -math.inf
        self._deferred = 0  # row-holds started (a rewrite of a held row is not counted)
        self._released = 0

    def _clock(self, now: float) -> float:
        self._now = max(self._now, float(now))
        return self._now

    def split(
        self,
        table: str,
        keys: np.ndarray,
        significance: np.ndarray,
        now: float,
        *,
        values: np.ndarray | None = None,
        eligible: np.ndarray | None = None,
    ) -> np.ndarray:
        """Decide the batch: bool[n] mask of rows to send (write) now; the others are held.

        ``values`` (float[n, dim]): keep the held rows' latest values, so ``due`` can hand
        them back (a table is either always given values or never).
        """
        t = self._clock(now)
        k = np.ascontiguousarray(keys, dtype=np.int64)
        n = k.shape[0]
        sig = np.asarray(significance, dtype=np.float64)
        if sig.shape != (n,):
            raise ValueError(f"significance must have shape ({n},), got {sig.shape}")
        hold = sig < self.min_significance
        if eligible is not None:
            hold &= np.asarray(eligible, dtype=bool)
        last = last_occurrence(k)
        if last is not None:
            hold = hold[last]  # every occurrence follows the last one
        held = self._tables.get(table)
        if held is None:
            if not hold.any():
                return ~hold
            dim = None if values is None else int(np.shape(values)[1])
            held = self._tables[table] = _Held(dim)
        if (values is None) != (held.values is None):
            raise ValueError(f"table {table!r}: give values on every call or on none")
        if held.count and not hold.all():
            held.clear(k[~hold])  # rows going out now: their newest value goes with them
        hold_idx = np.flatnonzero(hold)
        if hold_idx.size:
            if last is not None:  # one row per key: its last occurrence
                hold_idx = hold_idx[last[hold_idx] == hold_idx]
            hk = k[hold_idx]
            slots = held.index.insert(hk)
            held.grow(len(held.index))
            held.keys[slots] = hk
            fresh = np.isnan(held.first[slots])
            if fresh.any():
                held.first[slots[fresh]] = t
                held.fifo.append((t, hk[fresh].copy()))
                held.count += int(fresh.sum())
                self._deferred += int(fresh.sum())
            if held.values is not None:
                assert values is not None
                held.values[slots] = np.asarray(values)[hold_idx]
        return ~hold

    def discard(self, table: str, keys: np.ndarray) -> int:
        """Drop the holds of ``keys`` of ``table``: their held values are never released (a
        rollback wrote these rows since). Returns how many rows were held."""
        held = self._tables.get(table)
        if held is None or not held.count:
            return 0
        return held.clear(np.ascontiguousarray(keys, dtype=np.int64))

    def due(self, now: float) -> list[Released]:
        """Rows whose first deferral is at least ``max_staleness_s`` before ``now``: they
        are no longer held; the caller writes them."""
        t = self._clock(now)
        return self._release(lambda first: first + self.max_staleness_s <= t)

    def flush(self) -> list[Released]:
        """Release every held row (shutdown, or deferral switched off)."""
        return self._release(lambda first: True)

    def _release(self, ready: Callable[[float], bool]) -> list[Released]:
        out: list[Released] = []
        for name, held in self._tables.items():
            parts: list[np.ndarray] = []
            while held.fifo and ready(held.fifo[0][0]):
                t0, keys = held.fifo.popleft()
                slots = held.index.lookup(keys)
                slots = slots[slots >= 0]  # compaction dropped keys no longer held
                live = slots[held.first[slots] == t0]  # still held since t0 (not sent/re-held)
                if live.size:
                    parts.append(live)
            if not parts:
                continue
            # A key held, sent and held again at one same ``now`` is queued twice: once only.
            slots = np.unique(np.concatenate(parts))
            first = held.first[slots].copy()
            vals = held.values[slots].copy() if held.values is not None else None
            out.append(Released(name, held.keys[slots].copy(), vals, first))
            held.first[slots] = np.nan
            held.count -= int(slots.size)
            self._released += int(slots.size)
            if len(held.index) > 4 * held.count + 65_536:
                held.compact()
        return out

    def next_due(self) -> float | None:
        """When to call ``due`` next: never later than the first release, possibly earlier
        (if the rows queued first were sent since, that call finds nothing). None when
        nothing is queued."""
        times = [h.fifo[0][0] for h in self._tables.values() if h.fifo]
        return min(times) + self.max_staleness_s if times else None

    def held(self, table: str | None = None) -> int:
        """Rows currently held (in ``table``, or in all tables)."""
        if table is not None:
            h = self._tables.get(table)
            return h.count if h else 0
        return sum(h.count for h in self._tables.values())

    def held_since(self, table: str, keys: np.ndarray) -> np.ndarray:
        """First-deferral time of each key (float64[n]); NaN where the key is not held."""
        h = self._tables.get(table)
        k = np.ascontiguousarray(keys, dtype=np.int64)
        if h is None:
            return np.full(k.shape[0], np.nan)
        slots = h.index.lookup(k)
        out = np.full(k.shape[0], np.nan)
        ok = slots >= 0
        out[ok] = h.first[slots[ok]]
        return out

    @property
    def rows_deferred(self) -> int:
        """Holds started so far (monotone)."""
        return self._deferred

    @property
    def rows_released(self) -> int:
        """Held rows released by ``due``/``flush`` so far (monotone)."""
        return self._released
