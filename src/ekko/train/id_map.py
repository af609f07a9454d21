"""A vectorised map from raw int64 feature ids to row slots, with removal.

Sorted parallel arrays searched with ``np.searchsorted``: a lookup of a batch is one
O(m log n) call, an insert or a removal one O(n + m) merge, and no step loops in Python per
id. The store's numba ``KeyIndex`` assigns its own dense slots and has no removal; the
trainer's tables reuse the slot of an evicted id, so they need both.
"""

from __future__ import annotations

import numpy as np

MISSING = -1
"""The slot ``lookup`` reports for an id the map does not hold."""


class IdMap:
    """Raw id -> slot, any int64 id (negative and huge included).

    Why sorted arrays: a dynamic embedding's map changes every step by a batch of admitted
    and evicted ids; a merge of two sorted arrays is one vectorised pass, and lookups of a
    whole batch are a single ``searchsorted``.
    """

    def __init__(self) -> None:
        self._ids = np.empty(0, dtype=np.int64)
        self._slots = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ids.size)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots int64 [n] of ``ids`` int64 [n]; ``MISSING`` where absent."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, MISSING, dtype=np.int64)
        if self._ids.size == 0 or ids.size == 0:
            return out
        pos = np.searchsorted(self._ids, ids)
        inside = pos < self._ids.size
        hit = np.zeros(ids.shape, dtype=bool)
        hit[inside] = self._ids[pos[inside]] == ids[inside]
        out[hit] = self._slots[pos[hit]]
        return out

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Map ``ids`` (unique, none held yet) to ``slots``."""
        ids = np.asarray(ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if ids.shape != slots.shape:
            raise ValueError(f"IdMap.insert: ids {ids.shape} and slots {slots.shape} differ")
        if ids.size == 0:
            return
        order = np.argsort(ids, kind="stable")
        ids, slots = ids[order], slots[order]
        if ids.size > 1 and (ids[1:] == ids[:-1]).any():
            raise ValueError("IdMap.insert: ids must be unique")
        if (self.lookup(ids) != MISSING).any():
            raise ValueError("IdMap.insert: an id is mapped already")
        at = np.searchsorted(self._ids, ids)
        self._ids = np.insert(self._ids, at, ids)
        self._slots = np.insert(self._slots, at, slots)

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Unmap ``ids``; returns the slots they held (``MISSING`` for ids not held)."""
        slots = self.lookup(ids)
        held = np.asarray(ids, dtype=np.int64)[slots != MISSING]
        if held.size:
            at = np.unique(np.searchsorted(self._ids, held))
            self._ids = np.delete(self._ids, at)
            self._slots = np.delete(self._slots, at)
        return slots

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (ids, slots), ids ascending."""
        return self._ids.copy(), self._slots.copy()
