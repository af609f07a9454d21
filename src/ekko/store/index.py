"""Key → row-slot index: a numba open-addressing hash map from int64 keys to int64 slots.

Slots are dense (0, 1, 2, … in order of first insertion), so a table can keep its rows in
contiguous arrays and use the slot as the row number (DESIGN.md §2). A removed key (a purged
tombstone) leaves a deleted marker in its bucket and its slot on a free list; a new key takes
a freed slot before a new one, so a table under churn reuses its rows' memory. Markers are
swept by a rehash at the same capacity once they fill an eighth of the buckets.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ekko.store import layout
from ekko.store._native import PREFETCH_DISTANCE, prefetch, shard_of_key, splitmix64
from ekko.store._validate import check_keys as _check_keys
from ekko.store.errors import BadRowsError

_EMPTY = -1
_DELETED = -2  # a removed key's bucket: probes pass it, inserts may take it
PREFAULT_MIN_BYTES = 4 << 20
"""Bucket arrays below this size are simply allocated at the rehash."""


@njit(inline="always")
def _bucket(key: np.int64, mask: np.uint64) -> np.intp:
    return np.intp(splitmix64(np.uint64(key)) & mask)


@njit(inline="always")
def _probe(table: np.ndarray, mask: np.uint64, key: np.int64) -> np.intp:
    """The bucket holding ``key``, or the empty bucket that ends its probe (linear probing,
    past deleted markers)."""
    h = _bucket(key, mask)
    while table[2 * h + 1] != _EMPTY and (table[2 * h + 1] == _DELETED or table[2 * h] != key):
        h = np.intp((np.uint64(h) + np.uint64(1)) & mask)
    return h


@njit(inline="always")
def _probe_free(table: np.ndarray, mask: np.uint64, key: np.int64) -> tuple[np.intp, np.intp]:
    """(the bucket holding ``key`` or the empty bucket ending its probe, the first deleted
    marker on the way or -1): where an absent key is best inserted."""
    h = _bucket(key, mask)
    first = np.intp(-1)
    while table[2 * h + 1] != _EMPTY:
        s = table[2 * h + 1]
        if s == _DELETED:
            if first < 0:
                first = h
        elif table[2 * h] == key:
            return h, first
        h = np.intp((np.uint64(h) + np.uint64(1)) & mask)
    return h, first


@njit(inline="always")
def probe_slot(table: np.ndarray, mask: np.uint64, key: np.int64) -> np.int64:
    """The slot of ``key`` in bucket array ``table`` (``KeyIndex.probe_args``), -1 if
    absent: for a kernel that looks keys up and uses their rows in one pass."""
    return table[2 * _probe(table, mask, key) + 1]


@njit(cache=True, nogil=True)
def _lookup_kernel(table: np.ndarray, mask: np.uint64, keys: np.ndarray, out: np.ndarray) -> None:
    # table is flat [2 * cap]: table[2h] = key, table[2h + 1] = slot (-1 when empty).
    n = keys.shape[0]
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            prefetch(table, 2 * _bucket(keys[i + PREFETCH_DISTANCE], mask))
        out[i] = table[2 * _probe(table, mask, keys[i]) + 1]  # -1 (_EMPTY): absent


@njit(cache=True, nogil=True)
def _insert_kernel(
    table: np.ndarray,
    mask: np.uint64,
    keys: np.ndarray,
    out: np.ndarray,
    start: np.int64,
    state: np.ndarray,
    limit: np.int64,
    free: np.ndarray,
) -> np.int64:
    """Insert keys[start:] until done or ``limit`` buckets are taken; returns where it
    stopped. ``state`` = (keys held, slots ever given, deleted markers, free slots): a new key
    takes the last free slot, else the next new one; it reuses a deleted marker on its probe
    path, else takes the empty bucket."""
    n = keys.shape[0]
    for i in range(start, n):
        if i + PREFETCH_DISTANCE < n:
            prefetch(table, 2 * _bucket(keys[i + PREFETCH_DISTANCE], mask))
        k = keys[i]
        h, first = _probe_free(table, mask, k)
        s = table[2 * h + 1]
        if s == _EMPTY:
            if first >= 0:
                h = first
                state[2] -= 1
            elif state[0] + state[2] >= limit:
                return i
            if state[3] > 0:
                state[3] -= 1
                s = free[state[3]]
            else:
                s = state[1]
                state[1] += 1
            table[2 * h] = k
            table[2 * h + 1] = s
            state[0] += 1
        out[i] = s
    return n


@njit(cache=True, nogil=True)
def _remove_kernel(
    table: np.ndarray, mask: np.uint64, keys: np.ndarray, out: np.ndarray, state: np.ndarray,
    free: np.ndarray,
) -> None:  # fmt: skip
    """Remove ``keys`` (absent ones: out -1): each bucket becomes a deleted marker and its
    slot goes on the free list (``free`` has room for every slot ever given)."""
    for i in range(keys.shape[0]):
        h = _probe(table, mask, keys[i])
        s = table[2 * h + 1]
        out[i] = s
        if s >= 0:
            table[2 * h + 1] = _DELETED
            free[state[3]] = s
            state[3] += 1
            state[0] -= 1
            state[2] += 1


@njit(cache=True, nogil=True)
def _rehash_kernel(old: np.ndarray, new: np.ndarray, mask: np.uint64) -> None:
    cap = old.shape[0] // 2
    for j in range(cap):
        s = old[2 * j + 1]
        if s < 0:  # empty, or a deleted marker (swept)
            continue
        k = old[2 * j]
        h = _probe(new, mask, k)  # keys are unique: this is an empty bucket
        new[2 * h] = k
        new[2 * h + 1] = s


@njit(cache=True, nogil=True)
def _shard_kernel(keys: np.ndarray, num_shards: np.int64, out: np.ndarray) -> None:
    for i in range(keys.shape[0]):
        out[i] = shard_of_key(keys[i], num_shards)


def shard_of(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard of each key: splitmix64(key) % num_shards, the same on every node (int64[n])."""
    if num_shards < 1:
        raise BadRowsError(f"num_shards must be >= 1, got {num_shards}")
    arr = _check_keys(keys)
    out = np.empty(arr.shape[0], dtype=np.int64)
    _shard_kernel(arr, np.int64(num_shards), out)
    return out


def _out_buffer(out: np.ndarray | None, n: int) -> np.ndarray:
    if out is None:
        return np.empty(n, dtype=np.int64)
    if out.dtype != np.int64 or out.ndim != 1 or out.shape[0] < n:
        raise BadRowsError(f"out must be int64 with >= {n} entries, got {out.dtype} {out.shape}")
    return out[:n]


def _capacity_for(entries: int) -> int:
    cap = 16
    while cap < 2 * entries:
        cap *= 2
    return cap


class KeyIndex:
    """Vectorised int64 → dense-slot map, because per-key Python dicts are far too slow for
    tens of millions of feature ids (DESIGN.md §2).

    Open addressing with linear probing, load (keys and deleted markers) kept at or below
    50 %; keys are hashed with splitmix64 so sequential or strided ids spread evenly. Not
    thread-safe: callers serialise inserts with lookups. ``capacity`` is the number of keys to
    hold before the first rehash.
    """

    def __init__(self, capacity: int = 1024) -> None:
        cap = _capacity_for(max(int(capacity), 1))
        self._table = np.full(2 * cap, _EMPTY, dtype=np.int64)
        # (keys held, slots ever given, deleted markers, free slots), kept by the kernels
        self._state = np.zeros(4, dtype=np.int64)
        self._free = np.zeros(0, dtype=np.int64)  # freed slots, the last taken first
        self._next: np.ndarray | None = None  # see _prefault
        self._next_done = 0
        self._growing = False  # rehashed on the insert path: expect to rehash again
        layout.bump()

    def __len__(self) -> int:
        return int(self._state[0])

    @property
    def _size(self) -> int:
        return int(self._state[0])

    @property
    def high_water(self) -> int:
        """Slots ever given: every slot in use is below it (freed ones are reused first)."""
        return int(self._state[1])

    @property
    def free_slots(self) -> int:
        """Slots freed by ``remove`` and not taken again yet."""
        return int(self._state[3])

    @property
    def capacity(self) -> int:
        """Number of buckets (the map holds at most half as many keys)."""
        return self._table.shape[0] // 2

    def _mask(self) -> np.uint64:
        return np.uint64(self.capacity - 1)

    def probe_args(self) -> tuple[np.ndarray, np.uint64]:
        """(bucket array, mask) for ``probe_slot`` in a kernel; valid until the next insert
        or remove (either may rehash into a new array)."""
        return self._table, np.uint64(self._table.shape[0] // 2 - 1)

    def reserve(self, entries: int) -> None:
        """Grow (rehash) now so that ``entries`` keys fit without a rehash later."""
        if 2 * entries > self.capacity:
            self._rehash(_capacity_for(entries))
        self._growing = False  # sized on purpose: no next capacity to prepare
        self._next = None

    def _rehash(self, cap: int) -> None:
        new, self._next = self._next, None
        if new is not None and new.shape[0] == 2 * cap:
            new[self._next_done :] = _EMPTY
        else:
            new = np.full(2 * cap, _EMPTY, dtype=np.int64)
        _rehash_kernel(self._table, new, np.uint64(cap - 1))
        self._table = new
        self._state[2] = 0  # the markers were swept
        layout.bump()

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Remove ``keys``; returns the slot each held (-1: absent), now free for a later
        insert. Rehashes at the same capacity once deleted markers fill an eighth of the
        buckets (they lengthen every probe that passes them)."""
        arr = _check_keys(keys)
        out = np.empty(arr.shape[0], dtype=np.int64)
        if self._free.shape[0] < self.high_water:
            grown = np.zeros(max(self.high_water, 2 * self._free.shape[0]), np.int64)
            grown[: self.free_slots] = self._free[: self.free_slots]
            self._free = grown
        _remove_kernel(self._table, self._mask(), arr, out, self._state, self._free)
        if 8 * int(self._state[2]) > self.capacity:
            self._rehash(self.capacity)
        return out

    def _prefault(self) -> None:
        """Prepare the next (doubled) bucket array a slice per insert, from a quarter full
        on, so the rehash at half full finds it allocated, filled and faulted in: page faults
        on this VM are slow and erratic, and one burst of them stalled every node at once
        (see ``Table._prefault``). Done when the map is 7/16 full. Only once the map has
        rehashed on its own: one sized by ``capacity`` or ``reserve`` is expected to fit."""
        cap = self.capacity
        quarter = cap // 4
        if not self._growing or self._size <= quarter or 4 * cap * 8 < PREFAULT_MIN_BYTES:
            return
        if self._next is None:
            self._next = np.empty(4 * cap, dtype=np.int64)
            self._next_done = 0
        n = self._next.shape[0]
        target = min(n, -(-n * (self._size - quarter) // max(1, cap * 3 // 16)))
        if target > self._next_done:
            self._next[self._next_done : target] = _EMPTY
            self._next_done = target

    def lookup(self, keys: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Slot of each key (int64[n]); -1 where the key is absent. ``out``: optional int64
        buffer of at least n entries to fill (saves page faults on a fresh array)."""
        arr = _check_keys(keys)
        out = _out_buffer(out, arr.shape[0])
        _lookup_kernel(self._table, self._mask(), arr, out)
        return out

    def insert(self, keys: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Slot of each key, inserting absent ones; new keys get the next slots in order of
        first appearance, duplicates in one call share a slot. ``out`` as in ``lookup``."""
        arr = _check_keys(keys)
        n = arr.shape[0]
        out = _out_buffer(out, n)
        start = 0
        while True:
            start = int(
                _insert_kernel(
                    self._table, self._mask(), arr, out, np.int64(start), self._state,
                    np.int64(self.capacity // 2), self._free,
                )
            )  # fmt: skip
            if start >= n:
                self._prefault()
                return out
            if 4 * int(self._state[2]) >= self.capacity // 2:  # mostly markers: sweep them
                self._rehash(self.capacity)
                continue
            # Full at 50 %: double (at least), then resume where the kernel stopped.
            self._rehash(_capacity_for(self._size + min(n - start, self._size + 1)))
            self._growing = True


def warm() -> None:
    """Compile (or load from cache) every index kernel, so first calls show no JIT pause."""
    idx = KeyIndex(16)
    keys = np.arange(40, dtype=np.int64)
    idx.insert(keys)
    idx.lookup(keys)
    idx.remove(keys[:20])
    idx.insert(keys[:5])
    shard_of(keys, 4)
