"""Per-key state of unbounded key spaces in fixed memory."""

from __future__ import annotations

import numpy as np


class KeySlots:
    """Fixed float64 arrays per table, indexed by a hash of the key, because the scheduler
    keeps a number per key (heat, drift) for key spaces of billions of ids and must not grow
    with them. Two keys sharing a slot share its value; every user of this makes a shared
    value err towards sending a row sooner, never later.
    """

    def __init__(self, slots: int, arrays: int) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        self._mask = np.uint64(slots - 1)
        self._slots = slots
        self._arrays = arrays
        self._tables: dict[str, tuple[np.ndarray, ...]] = {}

    def of(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key (int64[n])."""
        mixed = np.asarray(keys).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (mixed & self._mask).astype(np.int64)

    def table(self, name: str) -> tuple[np.ndarray, ...]:
        """The arrays of table ``name`` (zeros until first written)."""
        t = self._tables.get(name)
        if t is None:
            t = self._tables[name] = tuple(np.zeros(self._slots) for _ in range(self._arrays))
        return t
