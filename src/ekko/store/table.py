"""One versioned, sharded embedding table: rows in contiguous arrays, an update cache per
shard, and the per-shard counters that sync needs (DESIGN.md §2–§3).

This module holds the table's state and its per-batch path (write, delete, replay, apply,
lookup, collect). Beside it: ``table_bulk`` (whole-table reads, the restore from a
snapshot), ``table_purge`` (tombstone purge and reconcile) and ``table_records`` (the
records it returns, the hooks it calls)."""

from __future__ import annotations

import numpy as np

from ekko.store import _table_kernels as K
from ekko.store._collect_kernel import collect_rows
from ekko.store._validate import (
    DEFAULT_MAX_ABS,
    check_cursors,
    check_dead,
    check_keys,
    check_lanes,
    check_rows,
    check_scalar_index,
    check_values,
    check_write_values,
)
from ekko.store.errors import BadRowsError
from ekko.store.index import KeyIndex, shard_of
from ekko.store.knowledge import after_origin_write, complete_to, merge_many
from ekko.store.row_arrays import RowArrays, check_slots
from ekko.store.spec import HIGH_LANE, LANES, NUM_LANES, TableSpec
from ekko.store.table_bulk import TableBulk
from ekko.store.table_purge import TablePurging
from ekko.store.table_records import AdmitHook, Collected, DeleteHook, TableStats, WriteHook

_NO_INTS = np.zeros(0, dtype=np.int64)  # a source write's versions and wtimes: not read


class Table(TableBulk, TablePurging):
    """A table's rows and sync state, because sync needs more than a key→value map: each row's
    version, origin write time and lane, and per shard a counter, knowledge, a shard version
    and a bounded update cache with its dominator (DESIGN.md §3).

    Rows live table-wide in contiguous arrays indexed by slot (``KeyIndex``); a row's shard is
    ``shard_of(key)``, so shards are logical. A delete is a write too (``delete``): the key
    keeps its slot as a tombstone with the delete's version, so sync carries it like a row and
    a replica applies it by version order; lookups, ``rows`` and ``digest`` see live rows
    only. Not thread-safe: one writer at a time, and no
    lookups while a write or apply may grow the arrays.
    """

    def __init__(
        self,
        spec: TableSpec,
        *,
        origin: int = 0,
        cache_capacity: int = 4096,
        initial_rows: int = 1024,
    ) -> None:
        if spec.dim < 1 or spec.num_shards < 1:
            raise BadRowsError(f"table {spec.name!r}: dim and num_shards must be >= 1: {spec}")
        if cache_capacity < 1:
            raise BadRowsError(f"cache_capacity must be >= 1, got {cache_capacity}")
        self._spec = spec
        self.origin = int(origin)
        # The source's write bound (config, not shape: not synced or persisted; replicas apply).
        self.max_abs = DEFAULT_MAX_ABS
        cap = max(int(initial_rows), 16)
        self._index = KeyIndex(cap)
        self._rows = RowArrays(cap, spec.dim)
        ns = spec.num_shards
        self.counter = np.zeros(ns, dtype=np.int64)
        self.shard_version = np.zeros(ns, dtype=np.int64)
        self.knowledge = np.zeros((ns, NUM_LANES), dtype=np.int64)
        self.dvv = np.zeros(ns, dtype=np.int64)
        # lane_top[shard, lane]: highest version ever stored in that lane (an upper bound on
        # the lane's rows), so ``collect`` skips a cursor at or above it without looking.
        self.lane_top = np.zeros((ns, NUM_LANES), dtype=np.int64)
        # The update cache's rings are written into as rows arrive, slot after slot: left to
        # fault in page by page they made a node's resident memory climb for minutes
        # (10 MB/min on ``ekko bench lifecycle``, 2 x 8 B x shards x capacity a table, until
        # every ring had wrapped), which reads as a leak. Touched here, it is paid at once.
        self._ring_slot = np.full((ns, cache_capacity), 0, dtype=np.int64)
        self._ring_ver = np.full((ns, cache_capacity), 0, dtype=np.int64)
        self._ring_pos = np.zeros(ns, dtype=np.int64)
        self._ring_len = np.zeros(ns, dtype=np.int64)
        self._ring_order = np.zeros((ns, 2), dtype=np.int64)  # (last version, unsorted for)
        self._scratch = np.zeros((4, 0), dtype=np.int64)
        self._cache_hits = 0
        self._full_scans = 0
        self._rows_written = 0
        self._rows_applied = 0
        self._rows_deleted = 0
        self._init_purging(ns)
        self._tombstones = np.zeros(1, dtype=np.int64)  # kept by the kernels
        # The store's write-ahead journal, if any: sees every source write of this table.
        self.on_write: WriteHook | None = None
        self.on_delete: DeleteHook | None = None
        self.admit: AdmitHook | None = None

    # -- shape -------------------------------------------------------------------------------

    @property
    def spec(self) -> TableSpec:
        return self._spec

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def dim(self) -> int:
        return self._spec.dim

    @property
    def num_shards(self) -> int:
        return self._spec.num_shards

    @property
    def rows(self) -> int:
        """Live rows (tombstones are not rows)."""
        return len(self._index) - int(self._tombstones[0])

    @property
    def tombstones(self) -> int:
        """Deleted keys held with their delete's version."""
        return int(self._tombstones[0])

    @property
    def _used(self) -> int:
        """Slots ever used: live rows, tombstones and slots a purge freed (version 0)."""
        return self._index.high_water

    @property
    def capacity(self) -> int:
        return self._rows.cap

    @property
    def cache_capacity(self) -> int:
        return int(self._ring_slot.shape[1])

    def reserve(self, rows: int) -> None:
        """Grow row arrays and index now so ``rows`` rows fit without growing later."""
        self._index.reserve(rows)
        self._rows.reserve(rows, self._used)

    def _scratch_for(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Four reusable int64[n] buffers (already paged in, so hot calls take no faults)."""
        if self._scratch.shape[1] < n:
            self._scratch = np.zeros((4, max(n, 2 * self._scratch.shape[1])), dtype=np.int64)
            self._scratch.fill(0)
        sc = self._scratch
        return sc[0, :n], sc[1, :n], sc[2, :n], sc[3, :n]

    def _insert(self, keys: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, int]:
        """Slots of ``keys`` (new keys inserted) and the first new slot."""
        first_new = self._used
        slots = self._index.insert(keys, out=out)
        # New slots are [first_new, used); they hold version 0 until a kernel stores them.
        self._rows.grow_to(self._used, first_new)
        if self._used > first_new:
            self._rows.prefault(self._used)
        return slots, first_new

    def _ring_args(self) -> tuple[np.ndarray, ...]:
        return (
            self._ring_slot,
            self._ring_ver,
            self._ring_pos,
            self._ring_len,
            self.dvv,
            self._ring_order,
        )

    # -- writes ------------------------------------------------------------------------------

    def write(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        *,
        now_ns: int,
        lanes: np.ndarray | int = HIGH_LANE,
    ) -> np.ndarray:
        """Source write: row i gets version ``++counter[shard]`` in input order (a key repeated
        in the batch: the last one wins). Returns the versions (int64[n])."""
        k = check_keys(keys)
        n = k.shape[0]
        v = check_values(values, n, self.dim)
        check_write_values(v, self.name, self.max_abs)
        ln = check_lanes(lanes, n)
        if self.admit is not None:
            self.admit(self, k)
        out = self._store_origin(k, v, ln, np.zeros(n, np.uint8), now_ns)
        self._rows_written += n
        if self.on_write is not None and n:
            self.on_write(self, k, v, out, int(now_ns), ln)
        return out

    def delete(self, keys: np.ndarray, *, now_ns: int) -> np.ndarray:
        """Source delete: key i gets version ``++counter[shard]`` like a written row, in the
        high lane, and becomes a tombstone (a key the table never held too: a replica may
        hold an older row of it). Returns the versions (int64[n])."""
        k = check_keys(keys)
        n = k.shape[0]
        if self.admit is not None:
            self.admit(self, k)
        ln = np.full(n, HIGH_LANE, np.uint8)
        out = self._store_origin(
            k, np.zeros((n, self.dim), np.float32), ln, np.ones(n, np.uint8), now_ns
        )
        self._rows_deleted += n
        if self.on_delete is not None and n:
            self.on_delete(self, k, out, int(now_ns))
        return out

    def _store_origin(
        self, k: np.ndarray, v: np.ndarray, ln: np.ndarray, dead: np.ndarray, now_ns: int
    ) -> np.ndarray:
        """Store checked rows (or tombstones) at the origin; returns their versions."""
        n = k.shape[0]
        out = np.empty(n, dtype=np.int64)
        if n == 0:
            return out
        sc_slot, sc_shard, sc_aslot, _ = self._scratch_for(n)
        slots, first_new = self._insert(k, sc_slot)
        touched = np.zeros(self.num_shards, dtype=np.bool_)
        K.store_rows(
            True, slots, np.int64(first_new), k, v, _NO_INTS, _NO_INTS, np.int64(now_ns), ln,
            dead, np.int64(self.num_shards), *self._rows.columns(), self._tombstones,
            self.counter, touched, self.lane_top, *self._ring_args(), sc_shard, sc_aslot, out,
        )  # fmt: skip
        self.shard_version[touched] += 1
        after_origin_write(
            self.knowledge, touched, self.counter, lambda: self._rows.shards[slots[:n]], ln,
            replay=False,
        )  # fmt: skip
        return out

    def replay(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        versions: np.ndarray,
        wtimes: np.ndarray,
        lanes: np.ndarray,
        dead: np.ndarray | None = None,
    ) -> int:
        """Redo a logged source write (or delete: ``dead``) at its origin: the rows with
        their logged versions, and the origin's knowledge as ``write`` left it. Idempotent,
        like ``apply``."""
        applied = self.apply(keys, values, versions, wtimes, lanes, dead)
        k, _, ver, _, ln = check_rows(keys, values, versions, wtimes, lanes, self.dim)
        if k.shape[0]:
            shards = shard_of(k, self.num_shards)
            touched = np.zeros(self.num_shards, dtype=np.bool_)
            touched[shards] = True
            top = np.zeros(self.num_shards, dtype=np.int64)  # the counter right after it
            np.maximum.at(top, shards, ver)
            after_origin_write(self.knowledge, touched, top, lambda: shards, ln, replay=True)
            self.shard_version[touched] += 1
        return applied

    def apply(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        versions: np.ndarray,
        wtimes: np.ndarray,
        lanes: np.ndarray | int,
        dead: np.ndarray | None = None,
    ) -> int:
        """Replica apply, last-version-wins: a row is stored only if its version beats the
        stored one, so applying is idempotent and order-insensitive. ``dead[i]`` 1: row i is
        a delete, and the key becomes a tombstone if its version wins. Returns rows stored."""
        k, v, ver, wt, ln = check_rows(keys, values, versions, wtimes, lanes, self.dim)
        n = k.shape[0]
        dd = check_dead(dead, n)
        if n == 0:
            return 0
        if self.admit is not None:
            self.admit(self, k)
        sc_slot, sc_shard, sc_aslot, sc_aver = self._scratch_for(n)
        slots, first_new = self._insert(k, sc_slot)
        touched = np.zeros(self.num_shards, dtype=np.bool_)
        applied = int(
            K.store_rows(
                False, slots, np.int64(first_new), k, v, ver, wt, np.int64(0), ln, dd,
                np.int64(self.num_shards), *self._rows.columns(), self._tombstones,
                self.counter, touched, self.lane_top, *self._ring_args(), sc_shard, sc_aslot,
                sc_aver,
            )
        )  # fmt: skip
        self.shard_version[touched] += 1
        self._rows_applied += applied
        return applied

    def merge_knowledge(self, shard: int, lane: int, knowledge: int) -> None:
        """Raise knowledge[shard, lane] to ``knowledge``; bumps the shard version if it moved."""
        s = check_scalar_index(shard, self.num_shards, "shard")
        ln = check_scalar_index(lane, NUM_LANES, "lane")
        if knowledge > self.knowledge[s, ln]:
            self.knowledge[s, ln] = knowledge
            self.shard_version[s] += 1

    def merge_knowledge_many(
        self, shards: np.ndarray, lane: int, knowledge: np.ndarray
    ) -> np.ndarray:
        """``merge_knowledge`` for many shards of one lane at once (one numpy pass instead of
        a Python call per shard). A shard listed twice takes the higher value. Returns the
        shards whose knowledge moved (their shard version was bumped once each)."""
        ln = check_scalar_index(lane, NUM_LANES, "lane")
        return merge_many(self.knowledge, self.shard_version, shards, ln, knowledge)

    def complete_origin(self) -> None:
        """At a source that recovered: it holds every row of every version up to its
        counters (what it lacks was superseded, or never reached anyone), in every lane; its
        counters sit at or above any knowledge it absorbed."""
        complete_to(self.knowledge, self.counter, self.shard_version)

    # -- reads -------------------------------------------------------------------------------

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values float32[n, dim] zero where missing, versions int64[n] 0 where missing,
        found bool[n]); a deleted key (a tombstone) is missing."""
        k = check_keys(keys)
        n = k.shape[0]
        slots = self._index.lookup(k, out=self._scratch_for(n)[0])
        values = np.empty((n, self.dim), dtype=np.float32)
        versions = np.empty(n, dtype=np.int64)
        found = np.empty(n, dtype=np.bool_)
        r = self._rows
        K.gather_rows(slots, r.values, r.versions, r.dead, values, versions, found)
        return values, versions, found

    def versions_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(versions int64[n], 0 where the key is unknown; dead uint8[n], 1 where it is a
        tombstone) of ``keys``: what the table knows of them, deletes included."""
        k = check_keys(keys)
        slots = self._index.lookup(k)
        held = slots >= 0
        versions = np.zeros(k.shape[0], np.int64)
        dead = np.zeros(k.shape[0], np.uint8)
        versions[held] = self._rows.versions[slots[held]]
        dead[held] = self._rows.dead[slots[held]]
        return versions, dead

    def collect(
        self,
        shards: np.ndarray,
        lanes: np.ndarray,
        after: np.ndarray,
        *,
        use_cache: bool = True,
    ) -> Collected:
        """Slots of rows newer than each cursor (shard, lane, after), from the update cache when
        the cursor covers the shard's dominator, else from one full scan (DESIGN.md §3)."""
        s, ln, a = check_cursors(shards, lanes, after, self.num_shards)
        m = s.shape[0]
        if use_cache:
            # A cursor at or above everything its lane ever held has nothing to collect:
            # answer it from the (empty) cache walk rather than a full scan, and skip the
            # kernel when every cursor is such (the low lane of a source writing only high).
            nothing = self.lane_top[s, ln] <= a
            cached = (a >= self.dvv[s]) | nothing
        else:
            nothing = np.zeros(m, dtype=np.bool_)
            cached = nothing.copy()
        hits = int(cached.sum())
        self._cache_hits += hits
        self._full_scans += m - hits
        if m and nothing.all():
            return Collected(
                slots=np.zeros(0, np.int64), offsets=np.zeros(m + 1, np.int64), full_scan=~cached
            )
        slots, offsets = collect_rows(
            s, ln, a, cached, np.int64(self._used), self._rows.versions, self._rows.lanes,
            self._rows.shards,
            self._ring_slot, self._ring_ver, self._ring_pos, self._ring_len, self._ring_order,
            np.int64(self.num_shards), np.int64(NUM_LANES),
        )  # fmt: skip
        return Collected(slots=slots, offsets=offsets, full_scan=~cached)

    def rows_at(
        self, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (keys, values, versions, wtimes, lanes) at ``slots`` (tombstones among
        them: ``dead_at``)."""
        return self._rows.rows_at(slots, self._used)

    def versions_at(self, slots: np.ndarray) -> np.ndarray:
        """Copy of the versions at ``slots`` (what a responder filters and budgets on before
        it gathers the rows it sends)."""
        return self._rows.versions[check_slots(slots, self._used)]

    def dead_at(self, slots: np.ndarray) -> np.ndarray:
        """Copy of the tombstone flags (uint8, 1: deleted) at ``slots``."""
        return self._rows.dead[check_slots(slots, self._used)]

    def cache_entries(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, versions) in the shard's update cache, oldest first (copies)."""
        s = check_scalar_index(shard, self.num_shards, "shard")
        length = int(self._ring_len[s])
        pos = int(self._ring_pos[s])
        start = (pos - length) % self.cache_capacity
        order = (start + np.arange(length)) % self.cache_capacity
        return self._ring_slot[s, order].copy(), self._ring_ver[s, order].copy()

    def statistics(self) -> TableStats:
        return TableStats(
            rows=self.rows,
            capacity=self._rows.cap,
            cache_hits=self._cache_hits,
            full_scans=self._full_scans,
            rows_written=self._rows_written,
            rows_applied=self._rows_applied,
            tombstones=self.tombstones,
            rows_deleted=self._rows_deleted,
            tombstones_purged=self._purged,
            rows_reconciled=self._reconciled,
            free_slots=self._index.free_slots,
        )


def warm() -> None:
    """Compile (or load from the numba cache) every table kernel once, at start-up."""
    from ekko.store import index
    from ekko.store.holding import Holding
    from ekko.store.placement import Placement
    from ekko.store.store import Store
    from ekko.store.table_frames import frame_plan, lookup_tables

    index.warm()
    t = Table(TableSpec("_warm", 4, 2), cache_capacity=4, initial_rows=16)
    keys = np.arange(10, dtype=np.int64)
    vals = np.ones((10, 4), dtype=np.float32)
    ver = t.write(keys, vals, now_ns=1)
    t.apply(keys, vals, ver + 1, np.zeros(10, dtype=np.int64), 1)
    t.lookup(keys)
    lookup_tables([t], keys, np.array([0, 10]), keys)  # a lookup stream's frame
    t.delete(keys[:3], now_ns=2)
    t.purge(t.counter)
    t.write(keys[:1] + 100, vals[:1], now_ns=3)
    t.apply(keys[:2], vals[:2], ver[:2] + 9, np.zeros(2, dtype=np.int64), 0, np.ones(2, np.uint8))
    t.collect(np.array([0, 1]), np.array([1, 1]), np.array([0, 12]))
    every = np.repeat(np.arange(2), NUM_LANES), np.tile(np.array(LANES), 2)
    t.collect(*every, np.zeros(2 * NUM_LANES, np.int64), use_cache=False)
    t.digest()
    t.digest_partitions(Placement(2))
    s = Store()  # a lookup stream's frame at a holder of one of 2 partitions
    s.set_holding(Holding("_warm", Placement(2), (0,)))
    s.create_table(TableSpec("_warm", 4, 2))
    body = np.concatenate(([1], keys[:1], keys[:1])).astype(np.int64).view(np.uint8)
    frame_plan(s, b"_warm", s.holding).answer(body, 1, True, 24, 1 << 20)
