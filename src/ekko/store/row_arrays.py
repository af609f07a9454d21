"""A table's rows in contiguous columns indexed by slot, grown by doubling without page-fault
bursts (DESIGN.md §2)."""

from __future__ import annotations

import numpy as np

from ekko.store import layout
from ekko.store._validate import check_int64
from ekko.store.errors import BadRowsError

PREFAULT_MIN_BYTES = 4 << 20
"""Below this size the next capacity's arrays are simply allocated when needed."""

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(keys int64, values float32[, dim], versions int64, wtimes int64, lanes uint8,
shards int32, dead uint8), in the order the table kernels take them."""


def _grown(
    arr: np.ndarray, used: int, cap: int, *, touch: bool, into: np.ndarray | None = None
) -> np.ndarray:
    """``arr``'s first ``used`` rows copied into a zeroed array of ``cap`` rows: ``into`` (the
    already faulted-in array ``RowArrays.prefault`` prepared) or a fresh one.

    Page faults on this VM are expensive and erratic (first touch of 16 MiB measured 7 to
    110 ms), and every node of a cluster grows at the same moment — replicas hold the same
    rows as the source — so a doubling that faults everything at once stalled every event
    loop together: the largest p99 spikes of ``ekko bench latency``. ``touch=True``
    (``reserve``) still faults every page in now, so hot kernels take none later; on the
    write/apply path rows beyond ``used`` are left to calloc's lazy zero pages."""
    out = into if into is not None else np.zeros((cap, *arr.shape[1:]), dtype=arr.dtype)
    out[:used] = arr[:used]
    if touch:
        out[used:] = 0
    return out


class RowArrays:
    """Every row's key, value, version, origin write time, lane, shard and whether it is a
    tombstone (``dead``: a deleted key, its version kept, its values zero), one column each.

    Why apart from the table: growth is its own concern. The columns are replaced when they
    double, so callers read them through ``columns()`` (or the attributes) at each use, never
    keep them across a write or apply.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.cap = capacity
        self.keys = np.zeros(capacity, dtype=np.int64)
        self.values = np.zeros((capacity, dim), dtype=np.float32)
        self.versions = np.zeros(capacity, dtype=np.int64)
        self.wtimes = np.zeros(capacity, dtype=np.int64)
        self.lanes = np.zeros(capacity, dtype=np.uint8)
        self.shards = np.zeros(capacity, dtype=np.int32)
        self.dead = np.zeros(capacity, dtype=np.uint8)
        for a in self.columns():
            a.fill(0)  # pre-touch
        self._row_bytes = sum(a.itemsize * (a.size // capacity) for a in self.columns())
        self.next: Columns | None = None  # see prefault
        self._next_done = 0
        self._growing = False  # grew on the write/apply path: expect to grow again
        layout.bump()

    def columns(self) -> Columns:
        return (
            self.keys, self.values, self.versions, self.wtimes, self.lanes, self.shards, self.dead
        )  # fmt: skip

    def reserve(self, rows: int, used: int) -> None:
        """Grow now, every page faulted in, so ``rows`` rows fit without growing later."""
        self.grow_to(rows, used, touch=True)
        self._growing = False  # sized on purpose: no next capacity to prepare
        self.next = None

    def grow_to(self, needed: int, used: int, *, touch: bool = False) -> None:
        """Double until ``needed`` rows fit, keeping the first ``used``."""
        if needed <= self.cap:
            return
        cap = self.cap
        while cap < needed:
            cap *= 2
        used = min(used, self.cap)  # rows past the old capacity are new (still zero)
        nxt, self.next = self.next, None
        into = nxt if nxt is not None and nxt[0].shape[0] == cap else (None,) * 7
        self.keys, self.values, self.versions, self.wtimes, self.lanes, self.shards, self.dead = (
            _grown(a, used, cap, touch=touch, into=b)
            for a, b in zip(self.columns(), into, strict=True)
        )
        self.cap = cap
        self._growing = not touch
        layout.bump()

    def prefault(self, rows: int) -> None:
        """Fault in the next capacity's arrays a slice per call, from half full on, so the
        doubling finds them ready and only copies (no page faults in one burst).

        The slices keep pace with the rows: the next arrays are fully faulted in when the
        table is 7/8 full, about 5 rows of the next arrays per new row. Costs memory early
        (the next capacity is resident before it is needed) for a flat write latency, so
        only a table that already grew on its own does it; one sized up front by
        ``initial_rows`` or ``reserve`` is expected to stay within that size."""
        cap = self.cap
        half = cap // 2
        if not self._growing or rows <= half or 2 * cap * self._row_bytes < PREFAULT_MIN_BYTES:
            return
        nxt = self.next
        if nxt is None:
            nxt = self.next = tuple(  # type: ignore[assignment]
                np.zeros((2 * cap, *a.shape[1:]), dtype=a.dtype) for a in self.columns()
            )
            self._next_done = 0
        assert nxt is not None
        target = min(2 * cap, -(-2 * cap * (rows - half) // max(1, cap * 3 // 8)))
        if target > self._next_done:
            for a in nxt:
                a[self._next_done : target] = 0  # zero pages already; the write faults them in
            self._next_done = target

    def rows_at(
        self, slots: np.ndarray, rows: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (keys, values, versions, wtimes, lanes) at ``slots`` (of ``rows`` used)."""
        sl = check_slots(slots, rows)
        return self.keys[sl], self.values[sl], self.versions[sl], self.wtimes[sl], self.lanes[sl]

    def view(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views (not copies) of the first ``rows`` rows' (keys, values, versions, wtimes,
        lanes)."""
        n = rows
        return self.keys[:n], self.values[:n], self.versions[:n], self.wtimes[:n], self.lanes[:n]


def check_slots(slots: np.ndarray, rows: int) -> np.ndarray:
    """``slots`` as int64[n] within [0, rows), or a BadRowsError naming the problem."""
    sl = np.asarray(slots)
    if sl.ndim != 1:
        raise BadRowsError(f"slots must be 1-D, got shape {sl.shape}")
    sl = check_int64(sl, sl.shape[0], "slots")
    if sl.shape[0] and (int(sl.min()) < 0 or int(sl.max()) >= rows):
        raise BadRowsError(f"slots must be in [0, {rows}), got [{sl.min()}, {sl.max()}]")
    return sl
