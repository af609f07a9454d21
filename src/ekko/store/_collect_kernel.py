"""Numba kernel behind ``Table.collect``: which rows each pull cursor is owed.

Kept apart from the write/apply kernels because it is the one read path sync depends on:
cursors answered from the per-shard update cache, the rest by one pass over the table.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _sort_segment(out: np.ndarray, lo: np.int64, hi: np.int64, t_ver: np.ndarray) -> None:
    """Sort out[lo:hi] (slots) by (version, slot) ascending."""
    if hi - lo < 2:
        return
    # Usually already in order (a version-sorted ring read front to back, or one pass of a
    # full scan over a table written in version order): check before paying for two sorts.
    prev = t_ver[out[lo]]
    prev_slot = out[lo]
    ordered = True
    for j in range(lo + 1, hi):
        v = t_ver[out[j]]
        if v < prev or (v == prev and out[j] < prev_slot):
            ordered = False
            break
        prev = v
        prev_slot = out[j]
    if ordered:
        return
    seg = np.sort(out[lo:hi])
    vers = np.empty(hi - lo, dtype=np.int64)
    for j in range(hi - lo):
        vers[j] = t_ver[seg[j]]
    order = np.argsort(vers, kind="mergesort")
    for j in range(hi - lo):
        out[lo + j] = seg[order[j]]


@njit(inline="always")
def _ring_oldest(ring_pos: np.ndarray, ring_len: np.ndarray, s: np.int64, cap: int) -> int:
    """Ring position of shard ``s``'s oldest cached entry."""
    oldest = ring_pos[s] - ring_len[s]
    if oldest < 0:
        oldest += cap
    return oldest


@njit(cache=True, nogil=True)
def collect_rows(
    shards: np.ndarray,
    lanes: np.ndarray,
    after: np.ndarray,
    use_cache: np.ndarray,
    rows: np.int64,
    t_ver: np.ndarray,
    t_lane: np.ndarray,
    t_shard: np.ndarray,
    ring_slot: np.ndarray,
    ring_ver: np.ndarray,
    ring_pos: np.ndarray,
    ring_len: np.ndarray,
    ring_order: np.ndarray,
    num_shards: np.int64,
    num_lanes: np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Slots of rows with shard == shards[c], lane == lanes[c], version > after[c] for every
    cursor c, each segment sorted by version. Cursors with use_cache[c] scan the shard's ring;
    the rest share one pass over the whole table. Returns (slots, offsets[m + 1]).

    ``num_lanes`` is ``len(LANES)``: every lane in ``lanes`` and ``t_lane`` is below it (the
    caller validates), and the chain heads are sized by it, never by a literal."""
    m = shards.shape[0]
    counts = np.zeros(m, dtype=np.int64)

    # Cache cursors: candidate entries from the ring, kept when still the row's current state.
    # First pass: where each cursor's candidates start, so the buffers are sized by the
    # candidates (a few hundred rows per pull) rather than by the rings (up to
    # shards * cache_capacity: megabytes allocated and faulted in on every pull).
    cap = ring_ver.shape[1]
    firsts = np.zeros(m, dtype=np.int64)
    cache_total = 0
    for c in range(m):
        if not use_cache[c]:
            continue
        s = shards[c]
        length = ring_len[s]
        first = 0
        if ring_order[s, 1] == 0:  # sorted: skip the entries at or below the cursor
            oldest = _ring_oldest(ring_pos, ring_len, s, cap)
            a = after[c]
            lo, hi = 0, length
            while lo < hi:
                mid = (lo + hi) // 2
                e = oldest + mid
                if e >= cap:
                    e -= cap
                if ring_ver[s, e] <= a:
                    lo = mid + 1
                else:
                    hi = mid
            first = lo
        firsts[c] = first
        cache_total += length - first
    cache_buf = np.empty(cache_total, dtype=np.int64)
    cache_cur = np.empty(cache_total, dtype=np.int64)
    nc = 0
    for c in range(m):
        if not use_cache[c]:
            continue
        s = shards[c]
        lane = lanes[c]
        a = after[c]
        length = ring_len[s]
        oldest = _ring_oldest(ring_pos, ring_len, s, cap)
        first = firsts[c]
        for i in range(first, length):
            e = oldest + i
            if e >= cap:
                e -= cap
            v = ring_ver[s, e]
            if v <= a:
                continue
            slot = ring_slot[s, e]
            if t_ver[slot] == v and t_lane[slot] == lane:
                cache_buf[nc] = slot
                cache_cur[nc] = c
                nc += 1
                counts[c] += 1

    # Full-scan cursors: one pass; head/nxt chain cursors that share (shard, lane).
    head = np.full((num_shards, num_lanes), -1, dtype=np.int64)
    nxt = np.full(m, -1, dtype=np.int64)
    any_scan = False
    for c in range(m):
        if not use_cache[c]:
            any_scan = True
            nxt[c] = head[shards[c], lanes[c]]
            head[shards[c], lanes[c]] = c
    scan_cap = 1024
    scan_buf = np.empty(scan_cap, dtype=np.int64)
    scan_cur = np.empty(scan_cap, dtype=np.int64)
    ns = 0
    if any_scan:
        for r in range(rows):
            c = head[t_shard[r], t_lane[r]]
            while c >= 0:
                if t_ver[r] > after[c]:
                    if ns == scan_cap:
                        scan_cap *= 2
                        grown = np.empty(scan_cap, dtype=np.int64)
                        grown[:ns] = scan_buf[:ns]
                        scan_buf = grown
                        grown_c = np.empty(scan_cap, dtype=np.int64)
                        grown_c[:ns] = scan_cur[:ns]
                        scan_cur = grown_c
                    scan_buf[ns] = r
                    scan_cur[ns] = c
                    ns += 1
                    counts[c] += 1
                c = nxt[c]

    offsets = np.zeros(m + 1, dtype=np.int64)
    for c in range(m):
        offsets[c + 1] = offsets[c] + counts[c]
    out = np.empty(offsets[m], dtype=np.int64)
    fill = offsets[:m].copy()
    for j in range(nc):
        c = cache_cur[j]
        out[fill[c]] = cache_buf[j]
        fill[c] += 1
    for j in range(ns):
        c = scan_cur[j]
        out[fill[c]] = scan_buf[j]
        fill[c] += 1
    for c in range(m):
        _sort_segment(out, offsets[c], offsets[c + 1], t_ver)
    return out, offsets
