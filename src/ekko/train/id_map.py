"""A vectorised map from raw int64 feature ids to row slots, with removal.

A numba open-addressing hash map (linear probing, splitmix64 like the store's ``KeyIndex``),
every operation one compiled call over a batch: O(batch) per step, whatever the table's size.
The store's index assigns its own dense slots and never removes a key; a dynamic table reuses
the slot of an evicted id, so it needs both. A removed key leaves a tombstone bucket (probes
go on past it, an insert may take it); the buckets are rebuilt when live keys and tombstones
fill three quarters of them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ekko.store._native import splitmix64

MISSING = -1
"""The slot ``lookup`` reports for an id the map does not hold."""

_EMPTY = -1  # a bucket's slot: never used ...
_GONE = -2  # ... or its key was removed (a tombstone)


@njit(inline="always")
def _home(key: np.int64, mask: np.uint64) -> np.intp:
    return np.intp(splitmix64(np.uint64(key)) & mask)


@njit(cache=True, nogil=True)
def _lookup_kernel(keys, slots, mask, ids, out) -> None:  # type: ignore[no-untyped-def]
    for i in range(ids.shape[0]):
        h = _home(ids[i], mask)
        out[i] = _EMPTY
        while slots[h] != _EMPTY:
            if slots[h] >= 0 and keys[h] == ids[i]:
                out[i] = slots[h]
                break
            h = np.intp((np.uint64(h) + np.uint64(1)) & mask)


@njit(cache=True, nogil=True)
def _insert_kernel(keys, slots, mask, ids, new_slots) -> int:  # type: ignore[no-untyped-def]
    """Insert ids (none held) into the first tombstone or empty bucket of their probe;
    returns how many took an empty one (the count of used buckets grows by that)."""
    fresh = 0
    for i in range(ids.shape[0]):
        h = _home(ids[i], mask)
        spot = -1
        while slots[h] != _EMPTY:
            if slots[h] == _GONE and spot < 0:
                spot = h
            h = np.intp((np.uint64(h) + np.uint64(1)) & mask)
        if spot < 0:
            spot = h
            fresh += 1
        keys[spot] = ids[i]
        slots[spot] = new_slots[i]
    return fresh


@njit(cache=True, nogil=True)
def _remove_kernel(keys, slots, mask, ids, out) -> int:  # type: ignore[no-untyped-def]
    removed = 0
    for i in range(ids.shape[0]):
        h = _home(ids[i], mask)
        out[i] = _EMPTY
        while slots[h] != _EMPTY:
            if slots[h] >= 0 and keys[h] == ids[i]:
                out[i] = slots[h]
                slots[h] = _GONE
                removed += 1
                break
            h = np.intp((np.uint64(h) + np.uint64(1)) & mask)
    return removed


class IdMap:
    """Raw id -> slot, any int64 id (negative and huge included).

    Why a hash map of its own: a dynamic embedding's map changes every step by a batch of
    admitted and evicted ids; each batch costs one compiled pass over the batch, not over
    the map. ``capacity``: ids it holds before it first grows (a table's row budget).
    """

    def __init__(self, capacity: int = 16) -> None:
        self._alloc(self._buckets_for(capacity))
        self._live = 0

    @staticmethod
    def _buckets_for(entries: int) -> int:
        cap = 16
        while cap < 2 * entries:
            cap *= 2
        return cap

    def _alloc(self, cap: int) -> None:
        self._keys = np.zeros(cap, dtype=np.int64)
        self._slots = np.full(cap, _EMPTY, dtype=np.int64)
        self._mask = np.uint64(cap - 1)
        self._used = 0  # live keys and tombstones

    def __len__(self) -> int:
        return self._live

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots int64 [n] of ``ids`` int64 [n]; ``MISSING`` where absent."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty(ids.shape[0], dtype=np.int64)
        _lookup_kernel(self._keys, self._slots, self._mask, ids, out)
        return out

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Map ``ids`` (unique, none held yet) to ``slots`` (>= 0)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        if ids.shape != slots.shape:
            raise ValueError(f"IdMap.insert: ids {ids.shape} and slots {slots.shape} differ")
        if ids.size == 0:
            return
        if (slots < 0).any():
            raise ValueError("IdMap.insert: slots must be >= 0")
        ordered = np.sort(ids)
        if (ordered[1:] == ordered[:-1]).any():
            raise ValueError("IdMap.insert: ids must be unique")
        if (self.lookup(ids) != MISSING).any():
            raise ValueError("IdMap.insert: an id is mapped already")
        self._make_room(ids.size)
        self._used += _insert_kernel(self._keys, self._slots, self._mask, ids, slots)
        self._live += ids.size

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Unmap ``ids`` (unique); returns the slots they held (``MISSING`` for ids not held)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty(ids.shape[0], dtype=np.int64)
        self._live -= _remove_kernel(self._keys, self._slots, self._mask, ids, out)
        return out

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of every mapping, ids ascending."""
        live = self._slots >= 0
        ids, slots = self._keys[live], self._slots[live]
        order = np.argsort(ids, kind="stable")
        return ids[order], slots[order]

    def _make_room(self, extra: int) -> None:
        """Rebuild the buckets (larger when live ids would pass half of them) before
        ``extra`` inserts would fill three quarters with live ids and tombstones."""
        cap = self._slots.shape[0]
        if 2 * (self._live + extra) > cap:
            cap = self._buckets_for(self._live + extra)
        elif 4 * (self._used + extra) <= 3 * cap:
            return
        ids, slots = self.items()
        self._alloc(cap)
        self._used = _insert_kernel(self._keys, self._slots, self._mask, ids, slots)
