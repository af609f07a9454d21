"""Forgetting deletes: a ``Table``'s tombstone purge and its reconcile with an upstream.

Apart from ``table`` because it is its own mechanism with its own state (the purge bar, the
epochs, the counts): the write, apply, lookup and collect paths never read it. Its callers
are the source's tombstone purger, the reconciles of ``ekko.protocol.floors`` and a puller's
check for late copies (``redundant``). It frees slots through the key index and the row
arrays the table owns.
"""

from __future__ import annotations

import numpy as np

from ekko.store._validate import check_int64, check_keys, check_scalar_index
from ekko.store.errors import BadRowsError
from ekko.store.index import KeyIndex, shard_of
from ekko.store.row_arrays import RowArrays
from ekko.store.spec import NUM_LANES


class TablePurging:
    """The purge and reconcile part of ``Table`` (a base class of it, not used alone):
    deleted keys are held as tombstones until every holder has them, then forgotten, their
    slots reused, so a table under delete-and-write churn keeps its size."""

    # The table's state this part reads and frees (``Table`` sets it up).
    _index: KeyIndex
    _rows: RowArrays
    _tombstones: np.ndarray
    dvv: np.ndarray
    shard_version: np.ndarray
    knowledge: np.ndarray
    lane_top: np.ndarray
    name: str
    num_shards: int
    tombstones: int
    _used: int

    def _init_purging(self, num_shards: int) -> None:
        # purge_bar[shard, lane]: a tombstone of that lane at or below it may have been
        # purged here or upstream; a holder whose knowledge of the lane is below it cannot
        # learn those deletes from rows, only by a reconcile (``ekko.protocol.floors``).
        self.purge_bar = np.zeros((num_shards, NUM_LANES), dtype=np.int64)
        self.purge_epoch = 0  # moves whenever purge_bar rises
        # Per shard, moves whenever a reconcile dropped live rows here: holders below this
        # one may hold them too, and reconcile the shard in turn.
        self.reconcile_epoch = np.zeros(num_shards, dtype=np.int64)
        self._purged = 0
        self._reconciled = 0

    @property
    def purge_floor(self) -> np.ndarray:
        """Per shard, the highest version at or below which tombstones were purged."""
        return self.purge_bar.max(axis=1)

    def purge(self, bar: np.ndarray) -> int:
        """Forget the tombstones whose version is at or below their shard's purge floor: the
        caller knows every holder has them. ``bar`` is int64 [shards, lanes] (a holder
        follows its upstream's) or, at the source, int64 [shards] (each shard's floor, the
        bar then being the floor capped by the highest version each lane ever stored: the
        lane's tombstones all lie below it). Their keys leave the index and their slots are
        reused by later new keys, so memory stays flat under churn. Cursors below a shard's
        floor take the full scan from now on (the update cache may name a freed slot).
        Returns how many were purged."""
        b = np.asarray(bar)
        ns = self.num_shards
        if b.ndim == 1:
            b = np.minimum(check_int64(b, ns, "floor")[:, None], self.lane_top)
        if b.shape != (ns, NUM_LANES) or b.dtype.kind not in "iu":
            raise BadRowsError(
                f"table {self.name!r}: a purge bar must be integer ({ns}, {NUM_LANES}),"
                f" got {b.dtype} {b.shape}"
            )
        if b.size and int(b.min()) < 0:
            raise BadRowsError(f"table {self.name!r}: a purge floor must be >= 0")
        if (b > self.purge_bar).any():
            np.maximum(self.purge_bar, b, out=self.purge_bar)
            self.purge_epoch += 1
        if not self.tombstones:
            return 0
        fl = self.purge_floor
        n, r = self._used, self._rows
        gone = (r.dead[:n] != 0) & (r.versions[:n] <= fl[r.shards[:n]])
        slots = np.flatnonzero(gone)
        self._forget(slots, fl)
        self._purged += int(slots.size)
        return int(slots.size)

    def drop_absent(self, shard: int, bar: np.ndarray, keys: np.ndarray) -> int:
        """Reconcile ``shard`` with its upstream's full list of ``keys`` (live and tombstones),
        given the upstream's purge bar of the shard (int64 per lane; it holds each lane
        complete up to it): a row held here at or below its lane's bar whose key the
        upstream does not hold was deleted there, and the tombstone purged before this
        holder saw it (or superseded, in a lane this holder will pull again). Drops those
        keys (tombstones too). Returns the live rows dropped."""
        s = check_scalar_index(shard, self.num_shards, "shard")
        k = check_keys(keys)
        b = np.asarray(bar)
        if b.shape != (NUM_LANES,) or b.dtype.kind not in "iu" or int(b.min()) < 0:
            raise BadRowsError(
                f"table {self.name!r}: a reconcile bar must be {NUM_LANES} integers >= 0,"
                f" got {b.tolist()}"
            )
        n, r = self._used, self._rows
        ver = r.versions[:n]
        mine = np.flatnonzero((r.shards[:n] == s) & (ver > 0) & (ver <= b[r.lanes[:n]]))
        absent = mine[~np.isin(r.keys[mine], k)]
        live = int(np.count_nonzero(r.dead[absent] == 0))
        fl = self.purge_floor
        fl[s] = max(int(fl[s]), int(b.max()))
        self._forget(absent, fl)
        self._reconciled += live
        self._purged += int(absent.size) - live
        if live:
            self.reconcile_epoch[s] += 1
        return live

    def redundant(self, keys: np.ndarray, versions: np.ndarray, lane: int) -> np.ndarray | None:
        """Rows of ``lane`` that a holder must not apply: at or below both its knowledge of
        their shard's lane (it holds them, or what superseded them) and the shard's purge
        floor (what superseded them may be a purged delete, and applying would bring the key
        back). A late duplicate of an old answer is such a row. None: there are none."""
        if not versions.shape[0] or int(versions.min()) > int(self.purge_floor.max()):
            return None
        shards = shard_of(keys, self.num_shards)
        bar = np.minimum(self.knowledge[shards, lane], self.purge_floor[shards])
        out = versions <= bar
        return out if out.any() else None

    def shard_keys(self, shards: np.ndarray) -> list[np.ndarray]:
        """For each of ``shards`` (distinct, ascending), every key it holds, live or a
        tombstone (what a holder reconciles against, ``drop_absent``)."""
        want = np.asarray(shards, dtype=np.int64)
        n, r = self._used, self._rows
        sel = (r.versions[:n] > 0) & np.isin(r.shards[:n], want)
        keys, sh = r.keys[:n][sel], r.shards[:n][sel]
        order = np.argsort(sh, kind="stable")
        counts = np.bincount(np.searchsorted(want, sh), minlength=want.shape[0])
        return np.split(keys[order], np.cumsum(counts)[:-1])

    def _forget(self, slots: np.ndarray, floor: np.ndarray) -> None:
        """Remove the keys at ``slots`` (tombstones or live rows) from the index and free
        their slots."""
        if not slots.size:
            return
        r = self._rows
        self._index.remove(r.keys[slots])
        touched = np.unique(r.shards[slots])
        self._tombstones[0] -= int(np.count_nonzero(r.dead[slots]))
        r.values[slots] = 0
        r.versions[slots] = 0
        r.wtimes[slots] = 0
        r.lanes[slots] = 0
        r.dead[slots] = 0
        self.dvv[touched] = np.maximum(self.dvv[touched], floor[touched])
        self.shard_version[touched] += 1
