"""Numba kernels behind ``Table``: the per-row loops of write, apply, lookup, digest (collect
is in ``_collect_kernel``).

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
    version order (always so at the source), and ``_collect_kernel.collect_rows``
    binary-searches it."""
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
def store_rows(
    source: bool,
    slots: np.ndarray,
    first_new: np.int64,
    keys: np.ndarray,
    values: np.ndarray,
    versions: np.ndarray,
    wtimes: np.ndarray,
    now_ns: np.int64,
    lanes: np.ndarray,
    dead: np.ndarray,
    num_shards: np.int64,
    t_keys: np.ndarray,
    t_values: np.ndarray,
    t_ver: np.ndarray,
    t_wtime: np.ndarray,
    t_lane: np.ndarray,
    t_shard: np.ndarray,
    t_dead: np.ndarray,
    tombstones: np.ndarray,
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
    """Store a batch and push what it stored into the update rings; returns rows stored.

    ``source``: a source write, every row gets ``++counter[shard]`` in input order and the
    write time ``now_ns`` (``versions`` and ``wtimes`` are not read). Otherwise a replica
    apply, last-version-wins: row i is stored with ``versions[i]``, ``wtimes[i]`` only if it
    beats the stored version (slots >= first_new are new and hold version 0). ``app_*``
    receive the stored rows' (shard, slot, version) in order (at a source: every row's).

    ``dead[i]`` 1: row i is a tombstone (a delete: key and version kept, values stored as
    zeros whatever ``values`` holds); ``tombstones[0]`` counts the table's tombstones."""
    n = keys.shape[0]
    dim = t_values.shape[1]
    flat = t_values.reshape(-1)
    applied = 0
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch_row(slots[i + PREFETCH_DISTANCE], flat, dim, t_ver, t_wtime, t_lane)
        slot = slots[i]
        k = keys[i]
        if source:
            s = shard_of_key(k, num_shards)
            v = counter[s] + 1
            counter[s] = v
            wt = now_ns
        else:
            v = versions[i]
            if v <= t_ver[slot]:
                continue
            s = shard_of_key(k, num_shards)
            if v > counter[s]:
                counter[s] = v
            wt = wtimes[i]
        if slot >= first_new or t_ver[slot] == 0:  # a new slot, or one a purge freed
            t_keys[slot] = k
            t_shard[slot] = s
        was_dead = t_dead[slot]  # 0 for a new slot; a repeated key: its earlier row
        touched[s] = True
        t_ver[slot] = v
        t_wtime[slot] = wt
        t_lane[slot] = lanes[i]
        t_dead[slot] = dead[i]
        tombstones[0] += np.int64(dead[i]) - np.int64(was_dead)
        if v > lane_top[s, lanes[i]]:
            lane_top[s, lanes[i]] = v
        if dead[i]:
            for j in range(dim):
                t_values[slot, j] = 0.0
        else:
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
    t_dead: np.ndarray,
    out_values: np.ndarray,
    out_ver: np.ndarray,
    found: np.ndarray,
) -> None:
    """Copy rows at ``slots`` (-1 = missing, or a tombstone → zeros, version 0)."""
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
        if slot < 0 or t_dead[slot]:
            found[i] = False
            out_ver[i] = 0
            for j in range(dim):
                out_values[i, j] = 0.0
        else:
            found[i] = True
            out_ver[i] = t_ver[slot]
            for j in range(dim):
                out_values[i, j] = t_values[slot, j]


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


@njit(inline="always")
def _row_digest(key: np.int64, version: np.int64, words: np.ndarray, r: int, w: int) -> np.uint64:
    """The 64-bit mix of one row: its key, version and ``w`` value words (row ``r``)."""
    acc = splitmix64(np.uint64(key) ^ _SEED)
    acc = splitmix64(acc ^ np.uint64(version))
    j = 0
    while j + 1 < w:
        acc = _round(acc, np.uint64(words[r, j]) | (np.uint64(words[r, j + 1]) << _W32))
        j += 2
    if j < w:
        acc = _round(acc, np.uint64(words[r, j]))
    return splitmix64(acc)


@njit(cache=True, nogil=True)
def digest_rows(
    keys: np.ndarray, versions: np.ndarray, words: np.ndarray, dead: np.ndarray
) -> np.uint64:
    """Sum over live rows (mod 2**64) of a 64-bit mix of (key, version, value bits as
    uint32); tombstones count for nothing, so a holder of one digests as one that never held
    the key."""
    total = np.uint64(0)
    n = keys.shape[0]
    w = words.shape[1]
    for r in range(n):
        if dead[r] or versions[r] == 0:  # a tombstone, or a slot a purge freed
            continue
        total += _row_digest(keys[r], versions[r], words, r, w)
    return total


@njit(cache=True, nogil=True)
def digest_rows_by_group(
    keys: np.ndarray,
    versions: np.ndarray,
    words: np.ndarray,
    dead: np.ndarray,
    n: np.int64,
    w: np.int64,
    shard_group: np.ndarray,
    num_shards: np.int64,
    out: np.ndarray,
    groups: np.int64,
) -> bool:
    """``digest_rows`` split by the group (a partition) of each row's shard: ``out[g]`` is the
    sum (mod 2**64) over the live rows among the first ``n`` whose shard (of ``num_shards``)
    ``shard_group`` maps to ``g`` (of ``groups``), each row's ``w`` value words mixed as
    ``digest_rows`` does, so the groups' digests sum to the table's. Every size is an argument
    (the caller checks them against the arrays); False if a shard's group is out of range."""
    for g in range(groups):
        out[g] = np.uint64(0)
    for r in range(n):
        if dead[r] or versions[r] == 0:  # a tombstone, or a slot a purge freed
            continue
        g = shard_group[shard_of_key(keys[r], num_shards)]
        if g < 0 or g >= groups:
            return False
        out[g] += _row_digest(keys[r], versions[r], words, r, w)
    return True
