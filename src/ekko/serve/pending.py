"""Predictions waiting for their label: a bounded ring indexed by prediction sequence number.

Ids are ``prefix << 32 | counter``: a random per-process prefix (21 bits, so every id stays
below 2**53 and survives JSON in any client) and a 32-bit counter; on counter wrap a new
prefix is drawn. The sequence number ``epoch << 32 | counter`` indexes a ring of
``capacity`` slots, so remembering and joining are O(batch) array operations, and the oldest
prediction is evicted when the ring wraps onto it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

_COUNTER_BITS = 32
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_PREFIX_BITS = 21
_EMPTY = -1


@dataclass(frozen=True)
class Joined:
    """Result of ``PendingPredictions.take``: the matched predictions and the misses.

    ``index`` int64 [m] positions in the input of the matched ids, ``ctr`` float32 [m] and
    ``variant`` uint8 [m] what was predicted for them; ``unknown`` ids never issued here,
    evicted, already answered, or repeated within the batch.
    """

    index: np.ndarray
    ctr: np.ndarray
    variant: np.ndarray
    unknown: int
    shadow: np.ndarray  # float32 [m]: the baseline's shadow prediction, NaN where none


class PendingPredictions:
    """Remembers (ctr, variant) per prediction id until its label arrives or it is evicted.

    Why a ring and not a dict: predict is the hot path (tens of thousands of ids per second);
    a dict insert per id costs more than the lookup of its embedding rows. Each id is joined
    at most once: a second label for the same prediction counts as unknown.
    """

    def __init__(self, capacity: int, *, prefix: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"max_pending must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._seq = np.full(self.capacity, _EMPTY, dtype=np.int64)
        self._ctr = np.zeros(self.capacity, dtype=np.float32)
        self._variant = np.zeros(self.capacity, dtype=np.uint8)
        self._shadow = np.full(self.capacity, np.nan, dtype=np.float32)
        self._next = 0  # next sequence number
        first = prefix if prefix is not None else self._draw_prefix(None)
        self._prefixes: dict[int, int] = {first: 0}  # prefix -> epoch (the last two epochs)
        self._prefix = first
        self.evicted = 0
        self._live = 0

    @staticmethod
    def _draw_prefix(avoid: int | None) -> int:
        while True:
            p = secrets.randbits(_PREFIX_BITS) | 1  # never 0: ids are never small integers
            if p != avoid:
                return p

    def __len__(self) -> int:
        """Predictions still waiting for a label."""
        return self._live

    @property
    def issued(self) -> int:
        return self._next

    def add(
        self, ctr: np.ndarray, variant: np.ndarray, shadow: np.ndarray | None = None
    ) -> np.ndarray:
        """Remember predictions (and optional shadow predictions of the baseline, NaN where
        none); returns their ids (int64 [n], unique, < 2**53)."""
        n = int(ctr.shape[0])
        if shadow is None:
            shadow = np.full(n, np.nan, dtype=np.float32)
        ids = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:  # a batch may straddle a counter wrap
            counter = self._next & _COUNTER_MASK
            take = min(n - done, (1 << _COUNTER_BITS) - counter)
            seq = np.arange(self._next, self._next + take, dtype=np.int64)
            ids[done : done + take] = (self._prefix << _COUNTER_BITS) | (seq & _COUNTER_MASK)
            part = slice(done, done + take)
            self._store(seq, ctr[part], variant[part], shadow[part])
            self._next += take
            done += take
            if self._next & _COUNTER_MASK == 0:
                self._new_epoch()
        return ids

    def _new_epoch(self) -> None:
        epoch = self._next >> _COUNTER_BITS
        self._prefix = self._draw_prefix(self._prefix)
        self._prefixes = {p: e for p, e in self._prefixes.items() if e == epoch - 1}
        self._prefixes[self._prefix] = epoch

    def _store(
        self, seq: np.ndarray, ctr: np.ndarray, variant: np.ndarray, shadow: np.ndarray
    ) -> None:
        if seq.shape[0] > self.capacity:  # only the newest fit
            self.evicted += int(seq.shape[0] - self.capacity)
            keep = slice(-self.capacity, None)
            seq, ctr, variant, shadow = seq[keep], ctr[keep], variant[keep], shadow[keep]
        slots = seq % self.capacity
        overwritten = int((self._seq[slots] != _EMPTY).sum())
        self.evicted += overwritten
        self._live += int(seq.shape[0]) - overwritten
        self._seq[slots] = seq
        self._ctr[slots] = ctr
        self._variant[slots] = variant
        self._shadow[slots] = shadow

    def take(self, ids: np.ndarray) -> Joined:
        """Join ids to their predictions and forget them (each id joins once)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = int(ids.shape[0])
        prefix = ids >> _COUNTER_BITS
        seq = np.full(n, _EMPTY, dtype=np.int64)
        for p, epoch in self._prefixes.items():
            mine = prefix == p
            seq[mine] = (epoch << _COUNTER_BITS) | (ids[mine] & _COUNTER_MASK)
        # Repeats within the batch: only the first occurrence may match.
        _, first = np.unique(ids, return_index=True)
        once = np.zeros(n, dtype=bool)
        once[first] = True
        slots = np.where(seq >= 0, seq % self.capacity, 0)
        hit = once & (seq >= 0) & (self._seq[slots] == seq)
        index = np.flatnonzero(hit)
        hs = slots[index]
        joined = Joined(
            index,
            self._ctr[hs].copy(),
            self._variant[hs].copy(),
            n - len(index),
            self._shadow[hs].copy(),
        )
        self._seq[hs] = _EMPTY
        self._live -= len(index)
        return joined
