"""Numba kernels behind ``Table``: the per-row loops of write, apply, lookup, collect, digest.

Each kernel is one pass over its batch with software prefetch a few rows ahead; Python code
in ``table.py`` only validates, grows arrays and calls these.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ekko.store._native import (
    PREFETCH_DISTANCE,
    prefetch,
    prefetch_w,
    shard_of_key,
    splitmix64,
)

_LINE_F32 = 16  # float32 per 64-byte cache line


@njit(cache=True, nogil=True)
def push_ring(
    app_shard: np.ndarray,
    app_slot: np.ndarray,
    app_ver: np.ndarray,
    count: np.int64,
    ring_slot: np.ndarray,
    ring_ver: np.ndarray,
    ring_pos: np.ndarray,
    ring_len: np.ndarray,
    dvv: np.ndarray,
    ring_order: np.ndarray,
) -> None:
    """Push ``count`` (shard, slot, version) entries, in order, into the per-shard rings.

    Same result as pushing one by one, but each shard's ring is written at most once per
    slot: entries that would fall out within this batch only fold into the dominator. Every
    version that leaves a ring raises ``dvv`` (DESIGN.md §3).

    ``ring_order[s] = (last version pushed, pushes until sorted)``: a push below the last
    one restarts the countdown at ``cap``; once it reaches 0 every entry in the ring is in
    version order (always so at the source), and ``collect_rows`` binary-searches it."""
    ns = ring_slot.shape[0]
    cap = ring_slot.shape[1]
    k = np.zeros(ns, dtype=np.int64)
    for a in range(count):
        k[app_shard[a]] += 1
    skip = np.zeros(ns, dtype=np.int64)
    wpos = np.zeros(ns, dtype=np.int64)
    for s in range(ns):
        if k[s] == 0:
            continue
        length = ring_len[s]
        pos = ring_pos[s]
        evict_old = min(length, max(0, length + k[s] - cap))
        p = pos - length
        if p < 0:
            p += cap
        for _ in range(evict_old):
            if ring_ver[s, p] > dvv[s]:
                dvv[s] = ring_ver[s, p]
            p += 1
            if p == cap:
                p = 0
        skip[s] = max(0, k[s] - cap)
        wpos[s] = (pos + skip[s]) % cap
        ring_len[s] = min(cap, length + k[s])
        ring_pos[s] = (pos + k[s]) % cap
    seen = np.zeros(ns, dtype=np.int64)
    for a in range(count):
        s = app_shard[a]
        if app_ver[a] < ring_order[s, 0]:
            ring_order[s, 1] = cap
        elif ring_order[s, 1] > 0:
            ring_order[s, 1] -= 1
        ring_order[s, 0] = app_ver[a]
        if seen[s] < skip[s]:
            seen[s] += 1
            if app_ver[a] > dvv[s]:
                dvv[s] = app_ver[a]
            continue
        p = wpos[s]
        ring_slot[s, p] = app_slot[a]
        ring_ver[s, p] = app_ver[a]
        p += 1
        if p == cap:
            p = 0
        wpos[s] = p


@njit(inline="always")
def _prefetch_row(
    slot: np.int64,
    flat_values: np.ndarray,
    dim: np.int64,
    t_ver: np.ndarray,
    t_wtime: np.ndarray,
    t_lane: np.ndarray,
) -> None:
    prefetch(t_ver, slot)
    prefetch_w(t_wtime, slot)
    prefetch_w(t_lane, slot)
    base = slot * dim
    j = 0
    while j < dim:
        prefetch_w(flat_values, base + j)
        j += _LINE_F32


@njit(cache=True, nogil=True)
def write_rows(
    slots: np.ndarray,
    first_new: np.int64,
    keys: np.ndarray,
    values: np.ndarray,
    lanes: np.ndarray,
    now_ns: np.int64,
    num_shards: np.int64,
    t_keys: np.ndarray,
    t_values: np.ndarray,
    t_ver: np.ndarray,
    t_wtime: np.ndarray,
    t_lane: np.ndarray,
    t_shard: np.ndarray,
    counter: np.ndarray,
    touched: np.ndarray,
    lane_top: np.ndarray,
    ring_slot: np.ndarray,
    ring_ver: np.ndarray,
    ring_pos: np.ndarray,
    ring_len: np.ndarray,
    dvv: np.ndarray,
    ring_order: np.ndarray,
    app_shard: np.ndarray,
    out_versions: np.ndarray,
) -> None:
    """Source write: every row gets ``++counter[shard]`` in input order and is stored."""
    n = keys.shape[0]
    dim = t_values.shape[1]
    flat = t_values.reshape(-1)
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch_row(slots[i + PREFETCH_DISTANCE], flat, dim, t_ver, t_wtime, t_lane)
        slot = slots[i]
        k = keys[i]
        s = shard_of_key(k, num_shards)
        if slot >= first_new:
            t_keys[slot] = k
            t_shard[slot] = s
        v = counter[s] + 1
        counter[s] = v
        touched[s] = True
        t_ver[slot] = v
        t_wtime[slot] = now_ns
        t_lane[slot] = lanes[i]
        if v > lane_top[s, lanes[i]]:
            lane_top[s, lanes[i]] = v
        for j in range(dim):
            t_values[slot, j] = values[i, j]
        app_shard[i] = s
        out_versions[i] = v
    push_ring(
        app_shard,
        slots,
        out_versions,
        n,
        ring_slot,
        ring_ver,
        ring_pos,
        ring_len,
        dvv,
        ring_order,
    )


@njit(cache=True, nogil=True)
def apply_rows(
    slots: np.ndarray,
    first_new: np.int64,
    keys: np.ndarray,
    values: np.ndarray,
    versions: np.ndarray,
    wtimes: np.ndarray,
    lanes: np.ndarray,
    num_shards: np.int64,
    t_keys: np.ndarray,
    t_values: np.ndarray,
    t_ver: np.ndarray,
    t_wtime: np.ndarray,
    t_lane: np.ndarray,
    t_shard: np.ndarray,
    counter: np.ndarray,
    touched: np.ndarray,
    lane_top: np.ndarray,
    ring_slot: np.ndarray,
    ring_ver: np.ndarray,
    ring_pos: np.ndarray,
    ring_len: np.ndarray,
    dvv: np.ndarray,
    ring_order: np.ndarray,
    app_shard: np.ndarray,
    app_slot: np.ndarray,
    app_ver: np.ndarray,
) -> np.int64:
    """Replica apply, last-version-wins: store row i only if its version beats the stored
    one (slots >= first_new are new and hold version 0). Returns the number stored."""
    n = keys.shape[0]
    dim = t_values.shape[1]
    flat = t_values.reshape(-1)
    applied = 0
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch_row(slots[i + PREFETCH_DISTANCE], flat, dim, t_ver, t_wtime, t_lane)
        slot = slots[i]
        v = versions[i]
        if v <= t_ver[slot]:
            continue
        k = keys[i]
        s = shard_of_key(k, num_shards)
        if slot >= first_new:
            t_keys[slot] = k
            t_shard[slot] = s
        if v > counter[s]:
            counter[s] = v
        touched[s] = True
        t_ver[slot] = v
        t_wtime[slot] = wtimes[i]
        t_lane[slot] = lanes[i]
        if v > lane_top[s, lanes[i]]:
            lane_top[s, lanes[i]] = v
        for j in range(dim):
            t_values[slot, j] = values[i, j]
        app_shard[applied] = s
        app_slot[applied] = slot
        app_ver[applied] = v
        applied += 1
    push_ring(
        app_shard,
        app_slot,
        app_ver,
        applied,
        ring_slot,
        ring_ver,
        ring_pos,
        ring_len,
        dvv,
        ring_order,
    )
    return applied


@njit(cache=True, nogil=True)
def gather_rows(
    slots: np.ndarray,
    t_values: np.ndarray,
    t_ver: np.ndarray,
    out_values: np.ndarray,
    out_ver: np.ndarray,
    found: np.ndarray,
) -> None:
    """Copy rows at ``slots`` (-1 = missing → zeros, version 0)."""
    n = slots.shape[0]
    dim = t_values.shape[1]
    flat = t_values.reshape(-1)
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            ahead = slots[i + PREFETCH_DISTANCE]
            if ahead >= 0:
                prefetch(t_ver, ahead)
                base = ahead * dim
                j = 0
                while j < dim:
                    prefetch(flat, base + j)
                    j += _LINE_F32
        slot = slots[i]
        if slot < 0:
            found[i] = False
            out_ver[i] = 0
            for j in range(dim):
                out_values[i, j] = 0.0
        else:
            found[i] = True
            out_ver[i] = t_ver[slot]
            for j in range(dim):
                out_values[i, j] = t_values[slot, j]


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
) -> tuple[np.ndarray, np.ndarray]:
    """Slots of rows with shard == shards[c], lane == lanes[c], version > after[c] for every
    cursor c, each segment sorted by version. Cursors with use_cache[c] scan the shard's ring;
    the rest share one pass over the whole table. Returns (slots, offsets[m + 1])."""
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
    head = np.full((num_shards, 2), -1, dtype=np.int64)
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


_SEED = np.uint64(0xD6E8FEB86659FD93)
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_R31 = np.uint64(31)
_R33 = np.uint64(33)
_W32 = np.uint64(32)


@njit(inline="always")
def _round(acc: np.uint64, x: np.uint64) -> np.uint64:
    # xxhash64 round: cheap, and every input bit reaches the accumulator.
    acc = acc + x * _P2
    acc = (acc << _R31) | (acc >> _R33)
    return acc * _P1


@njit(cache=True, nogil=True)
def digest_rows(keys: np.ndarray, versions: np.ndarray, words: np.ndarray) -> np.uint64:
    """Sum over rows (mod 2**64) of a 64-bit mix of (key, version, value bits as uint32)."""
    total = np.uint64(0)
    n = keys.shape[0]
    w = words.shape[1]
    for r in range(n):
        acc = splitmix64(np.uint64(keys[r]) ^ _SEED)
        acc = splitmix64(acc ^ np.uint64(versions[r]))
        j = 0
        while j + 1 < w:
            x = np.uint64(words[r, j]) | (np.uint64(words[r, j + 1]) << _W32)
            acc = _round(acc, x)
            j += 2
        if j < w:
            acc = _round(acc, np.uint64(words[r, j]))
        total += splitmix64(acc)
    return total
