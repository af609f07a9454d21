"""A dict-backed table with ``Table``'s semantics: slow, small and obviously correct.

Hypothesis tests run random operation sequences against both and compare (the fast-vs-naive
pattern of etcd raft's ``quorum/quick_test.go``). It hashes, shards and digests in plain
Python, independently of the numba kernels, so it checks those too.
"""

from __future__ import annotations

import numpy as np

from ekko.store._validate import (
    DEFAULT_MAX_ABS,
    check_cursors,
    check_dead,
    check_int64,
    check_keys,
    check_lanes,
    check_scalar_index,
    check_values,
    check_versions,
    check_write_values,
)
from ekko.store.errors import BadRowsError
from ekko.store.spec import HIGH_LANE, LANES, TableSpec
from ekko.store.table_records import Collected

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on a Python int (two's complement for negative keys)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def shard_of_key(key: int, num_shards: int) -> int:
    return splitmix64(key & _M64) % num_shards


def _round(acc: int, x: int) -> int:
    acc = (acc + x * 0xC2B2AE3D27D4EB4F) & _M64
    acc = ((acc << 31) | (acc >> 33)) & _M64
    return (acc * 0x9E3779B185EBCA87) & _M64


def row_digest(key: int, version: int, value: np.ndarray) -> int:
    """The per-row 64-bit mix that ``Table.digest`` sums (mod 2**64)."""
    words = [int(w) for w in np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)]
    acc = splitmix64((key & _M64) ^ 0xD6E8FEB86659FD93)
    acc = splitmix64(acc ^ (version & _M64))
    j = 0
    while j + 1 < len(words):
        acc = _round(acc, words[j] | (words[j + 1] << 32))
        j += 2
    if j < len(words):
        acc = _round(acc, words[j])
    return splitmix64(acc)


class ReferenceTable:
    """Naive model of ``Table``: a dict from key to slot and Python lists of row fields, so
    the fast table's results can be checked against something simple enough to trust."""

    def __init__(self, spec: TableSpec, *, origin: int = 0) -> None:
        self.spec = spec
        self.origin = origin
        self.max_abs = DEFAULT_MAX_ABS
        ns = spec.num_shards
        self.slot_of: dict[int, int] = {}
        self.keys: list[int] = []
        self.values: list[np.ndarray] = []
        self.versions: list[int] = []
        self.wtimes: list[int] = []
        self.lanes: list[int] = []
        self.dead: list[int] = []
        self.free: list[int] = []  # slots a purge freed, the last one taken first
        self.counter = [0] * ns
        self.shard_version = [0] * ns
        self.knowledge = [[0] * len(LANES) for _ in range(ns)]

    @property
    def rows(self) -> int:
        return len(self.slot_of) - sum(self.dead)

    @property
    def tombstones(self) -> int:
        return sum(self.dead)

    def _slot(self, key: int) -> int:
        if key not in self.slot_of:
            if self.free:
                slot = self.free.pop()
                self.keys[slot] = key
            else:
                slot = len(self.keys)
                self.keys.append(key)
                self.values.append(np.zeros(self.spec.dim, dtype=np.float32))
                self.versions.append(0)
                self.wtimes.append(0)
                self.lanes.append(0)
                self.dead.append(0)
            self.slot_of[key] = slot
        return self.slot_of[key]

    def purge(self, floor: np.ndarray) -> int:
        # Floors only rise, and never above a version the shard has issued: a tombstone at
        # or below any floor given so far goes.
        fl = np.minimum(check_int64(floor, self.spec.num_shards, "floor"), self.counter)
        self._floor = fl = np.maximum(getattr(self, "_floor", fl), fl)
        gone = [
            slot
            for slot, key in enumerate(self.keys)
            if self.dead[slot]
            and self.versions[slot] <= fl[shard_of_key(key, self.spec.num_shards)]
        ]
        for slot in gone:
            del self.slot_of[self.keys[slot]]
            self.versions[slot] = self.wtimes[slot] = self.lanes[slot] = self.dead[slot] = 0
            self.free.append(slot)
        for s in {shard_of_key(self.keys[slot], self.spec.num_shards) for slot in gone}:
            self.shard_version[s] += 1
        return len(gone)

    def _store(
        self, slot: int, value: np.ndarray, version: int, wtime: int, lane: int, dead: int = 0
    ) -> None:
        self.values[slot] = np.zeros_like(value) if dead else value.copy()
        self.versions[slot] = version
        self.wtimes[slot] = wtime
        self.lanes[slot] = lane
        self.dead[slot] = dead

    def delete(self, keys: np.ndarray, *, now_ns: int) -> np.ndarray:
        k = check_keys(keys)
        out = []
        touched = set()
        for key in k.tolist():
            s = shard_of_key(key, self.spec.num_shards)
            self.counter[s] += 1
            zero = np.zeros(self.spec.dim, dtype=np.float32)
            self._store(self._slot(key), zero, self.counter[s], now_ns, HIGH_LANE, 1)
            out.append(self.counter[s])
            touched.add(s)
        for s in touched:
            self.shard_version[s] += 1
            self.knowledge[s][HIGH_LANE] = self.counter[s]
        return np.array(out, dtype=np.int64)

    def write(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        *,
        now_ns: int,
        lanes: np.ndarray | int = HIGH_LANE,
    ) -> np.ndarray:
        k = check_keys(keys)
        v = check_values(values, k.shape[0], self.spec.dim)
        check_write_values(v, self.spec.name, self.max_abs)
        ln = check_lanes(lanes, k.shape[0])
        out = []
        touched: dict[int, set[int]] = {}
        for i, key in enumerate(k.tolist()):
            s = shard_of_key(key, self.spec.num_shards)
            self.counter[s] += 1
            self._store(self._slot(key), v[i], self.counter[s], now_ns, int(ln[i]))
            out.append(self.counter[s])
            touched.setdefault(s, set()).add(int(ln[i]))
        for s, lanes_written in touched.items():
            self.shard_version[s] += 1
            for lane in lanes_written:
                self.knowledge[s][lane] = self.counter[s]
        return np.array(out, dtype=np.int64)

    def apply(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        versions: np.ndarray,
        wtimes: np.ndarray,
        lanes: np.ndarray | int,
        dead: np.ndarray | None = None,
    ) -> int:
        k = check_keys(keys)
        n = k.shape[0]
        dd = check_dead(dead, n)
        v = check_values(values, n, self.spec.dim)
        ver = check_versions(versions, n)
        wt = check_int64(wtimes, n, "wtimes")
        ln = check_lanes(lanes, n)
        applied = 0
        touched = set()
        for i, key in enumerate(k.tolist()):
            slot = self._slot(key)
            if int(ver[i]) > self.versions[slot]:
                s = shard_of_key(key, self.spec.num_shards)
                self._store(slot, v[i], int(ver[i]), int(wt[i]), int(ln[i]), int(dd[i]))
                self.counter[s] = max(self.counter[s], int(ver[i]))
                touched.add(s)
                applied += 1
        for s in touched:
            self.shard_version[s] += 1
        return applied

    def merge_knowledge(self, shard: int, lane: int, knowledge: int) -> None:
        s = check_scalar_index(shard, self.spec.num_shards, "shard")
        ln = check_scalar_index(lane, len(LANES), "lane")
        if knowledge > self.knowledge[s][ln]:
            self.knowledge[s][ln] = knowledge
            self.shard_version[s] += 1

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = check_keys(keys)
        values = np.zeros((k.shape[0], self.spec.dim), dtype=np.float32)
        versions = np.zeros(k.shape[0], dtype=np.int64)
        found = np.zeros(k.shape[0], dtype=np.bool_)
        for i, key in enumerate(k.tolist()):
            slot = self.slot_of.get(key)
            if slot is not None and not self.dead[slot]:
                values[i] = self.values[slot]
                versions[i] = self.versions[slot]
                found[i] = True
        return values, versions, found

    def collect(
        self,
        shards: np.ndarray,
        lanes: np.ndarray,
        after: np.ndarray,
        *,
        use_cache: bool = True,
    ) -> Collected:
        """Same answer as ``Table.collect``, always by scanning every row."""
        s, ln, a = check_cursors(shards, lanes, after, self.spec.num_shards)
        segments = []
        for c in range(s.shape[0]):
            hits = [
                slot
                for slot, key in enumerate(self.keys)
                if shard_of_key(key, self.spec.num_shards) == s[c]
                and self.lanes[slot] == ln[c]
                and self.versions[slot] > a[c]
            ]
            hits.sort(key=lambda slot: (self.versions[slot], slot))
            segments.append(hits)
        offsets = np.zeros(len(segments) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(h) for h in segments])
        flat = [slot for h in segments for slot in h]
        return Collected(
            slots=np.array(flat, dtype=np.int64),
            offsets=offsets,
            full_scan=np.ones(len(segments), dtype=np.bool_),
        )

    def rows_at(
        self, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        sl = [int(x) for x in np.asarray(slots)]
        if any(not 0 <= x < len(self.keys) for x in sl):
            raise BadRowsError(f"slots must be in [0, {len(self.keys)})")
        return (
            np.array([self.keys[x] for x in sl], dtype=np.int64),
            np.array([self.values[x] for x in sl], dtype=np.float32).reshape(
                len(sl), self.spec.dim
            ),
            np.array([self.versions[x] for x in sl], dtype=np.int64),
            np.array([self.wtimes[x] for x in sl], dtype=np.int64),
            np.array([self.lanes[x] for x in sl], dtype=np.uint8),
        )

    def dead_at(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.dead[int(x)] for x in np.asarray(slots)], dtype=np.uint8)

    def digest_partitions(self, partition_of_shard: list[int], partitions: int) -> dict[int, int]:
        """``digest`` per partition: rows grouped by ``partition_of_shard[shard of key]``."""
        totals = dict.fromkeys(range(partitions), 0)
        for slot, key in enumerate(self.keys):
            if self.dead[slot] or self.versions[slot] == 0:
                continue
            p = partition_of_shard[shard_of_key(key, self.spec.num_shards)]
            totals[p] += row_digest(key, self.versions[slot], self.values[slot])
        return {p: t & _M64 for p, t in totals.items()}

    def digest(self) -> int:
        total = 0
        for slot, key in enumerate(self.keys):
            if self.dead[slot] or self.versions[slot] == 0:  # a tombstone, or a freed slot
                continue
            total += row_digest(key, self.versions[slot], self.values[slot])
        return total & _M64
