"""A ``Table`` whole: every row or slot at once, its digest, and its restore from a snapshot.

Apart from ``table`` because these are not the sync path (a key or a batch of keys at a
time): they serve snapshots (``all_slots`` out, ``restore_rows`` in), the checks that
compare holders (``digest``, ``all_rows``, ``deleted``) and the split of a store by source
(``ekko.store.sources``). They read the row arrays up to the slots ever used, and a
restore fills the table's counters, knowledge and purge bar in one go.
"""

from __future__ import annotations

import numpy as np

from ekko.store import _table_kernels as K
from ekko.store import layout
from ekko.store._validate import check_dead, check_int64, check_rows
from ekko.store.errors import BadRowsError
from ekko.store.index import KeyIndex, shard_of
from ekko.store.placement import Placement
from ekko.store.row_arrays import RowArrays
from ekko.store.spec import NUM_LANES


class TableBulk:
    """The whole-table part of ``Table`` (a base class of it, not used alone)."""

    # The table's state this part reads, and a restore fills (``Table`` sets it up).
    _index: KeyIndex
    _rows: RowArrays
    _tombstones: np.ndarray
    _ring_pos: np.ndarray
    _ring_len: np.ndarray
    _ring_order: np.ndarray
    counter: np.ndarray
    knowledge: np.ndarray
    shard_version: np.ndarray
    dvv: np.ndarray
    lane_top: np.ndarray
    purge_bar: np.ndarray
    name: str
    dim: int
    num_shards: int
    tombstones: int
    _used: int

    def all_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every live row's (keys, values, versions, wtimes, lanes): views (not copies) while
        the table holds no tombstone, else copies of the live rows."""
        rows = self._rows.view(self._used)
        if not self.tombstones and not self._index.free_slots:
            return rows
        live = (self._rows.dead[: self._used] == 0) & (rows[2] > 0)
        return tuple(a[live] for a in rows)  # type: ignore[return-value]

    def all_slots(
        self,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every slot's (keys, values, versions, wtimes, lanes, dead): live rows and tombstones
        (what a snapshot keeps); views unless a purge freed slots (then copies without them)."""
        columns = (*self._rows.view(self._used), self._rows.dead[: self._used])
        if not self._index.free_slots:
            return columns
        held = columns[2] > 0
        return tuple(c[held] for c in columns)  # type: ignore[return-value]

    def deleted(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of every tombstone's (keys, versions)."""
        n = self._used
        dead = self._rows.dead[:n] != 0
        return self._rows.keys[:n][dead], self._rows.versions[:n][dead]

    def digest(self) -> int:
        """Order-independent 64-bit hash of every live row's (key, version, value bits):
        tombstones count for nothing."""
        keys, values, versions, _, _ = self._rows.view(self._used)
        dead = self._rows.dead[: self._used]
        return int(K.digest_rows(keys, versions, values.view(np.uint32), dead))

    def digest_partitions(self, placement: Placement) -> dict[int, int]:
        """``digest`` per partition of ``placement``: ``{p: digest of the live rows whose
        shard the placement puts on p}`` for every partition (0 where it holds none). The
        values sum (mod 2**64) to ``digest()``; a holder of partition p and p's source hold
        the same rows there iff their p digests agree (whatever else either holds)."""
        parts = placement.partitions
        groups = np.ascontiguousarray(placement.partitions_of(self.name, self.num_shards))
        keys, values, versions, _, _ = self._rows.view(self._used)
        dead = self._rows.dead[: self._used]
        words = values.view(np.uint32)
        n = keys.shape[0]
        if not (versions.shape[0] == dead.shape[0] == words.shape[0] == n):
            raise AssertionError(f"table {self.name!r}: row arrays of unequal lengths")
        out = np.zeros(parts, dtype=np.uint64)
        ok = K.digest_rows_by_group(
            keys, versions, words, dead, np.int64(n), np.int64(words.shape[1]),
            groups, np.int64(self.num_shards), out, np.int64(parts),
        )  # fmt: skip
        if not ok:  # partitions_of is in range by construction: a bug if it happens
            raise AssertionError(f"table {self.name!r}: a shard's partition out of range")
        return {p: int(out[p]) for p in range(parts)}

    def restore_rows(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        versions: np.ndarray,
        wtimes: np.ndarray,
        lanes: np.ndarray,
        *,
        counter: np.ndarray,
        knowledge: np.ndarray,
        shard_version: np.ndarray,
        dead: np.ndarray | None = None,
        purge_bar: np.ndarray | None = None,
    ) -> None:
        """Fill an empty table from a snapshot. The update cache starts empty, so the dominator
        is set to the shard's highest version: cursors below it take the full-scan path."""
        if self._used:
            raise BadRowsError(f"table {self.name!r}: restore_rows needs an empty table")
        k, v, ver, wt, ln = check_rows(keys, values, versions, wtimes, lanes, self.dim)
        n = k.shape[0]
        dd = check_dead(dead, n)
        ns = self.num_shards
        cnt = check_int64(counter, ns, "counter")
        sv = check_int64(shard_version, ns, "shard_version")
        kn = np.asarray(knowledge)
        if kn.ndim == 2 and kn.shape[0] == ns and 0 < kn.shape[1] < NUM_LANES:
            # A snapshot from before the new-key lane: it held nothing in the lanes it lacks.
            kn = np.pad(kn, ((0, 0), (0, NUM_LANES - kn.shape[1])))
        if kn.shape != (ns, NUM_LANES) or kn.dtype.kind not in "iu":
            raise BadRowsError(
                f"knowledge must be integer ({ns}, {NUM_LANES}), got {kn.dtype} {kn.shape}"
            )
        shards = shard_of(k, ns)
        top = np.zeros(ns, dtype=np.int64)
        np.maximum.at(top, shards, ver)
        if (top > cnt).any():
            raise BadRowsError(f"table {self.name!r}: a row's version is above its counter")
        index = KeyIndex(max(n, 16))
        slots = index.insert(k)
        if len(index) != n:
            raise BadRowsError(f"table {self.name!r}: duplicate keys in restored rows")
        self._index = index
        layout.bump()
        self._rows.grow_to(n, 0)
        for column, rows in zip(self._rows.columns(), (k, v, ver, wt, ln, shards, dd), strict=True):
            column[slots] = rows
        self._rows.values[slots[dd != 0]] = 0
        self._tombstones[0] = int(np.count_nonzero(dd))
        self.counter[:] = cnt
        self.lane_top[:] = 0
        np.maximum.at(self.lane_top, (shards, ln.astype(np.int64)), ver)
        self.knowledge[:] = kn
        self.shard_version[:] = sv
        self.dvv[:] = cnt
        if purge_bar is not None:
            pb = np.asarray(purge_bar)
            if pb.shape != (ns, NUM_LANES) or pb.dtype.kind not in "iu":
                raise BadRowsError(
                    f"purge_bar must be integer ({ns}, {NUM_LANES}), got {pb.dtype} {pb.shape}"
                )
            self.purge_bar[:] = pb
        self._ring_pos[:] = 0
        self._ring_len[:] = 0
        self._ring_order[:] = 0
