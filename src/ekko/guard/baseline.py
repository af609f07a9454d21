"""The baseline model's store: the replica's own updates, applied ``lag_s`` late.

A replica already receives every update; the baseline is the same stream delayed. The rows
each pulled response applied (the puller's ``Ready.applied``, the one apply port) are queued
with their arrival time and applied to a second ``Store`` once
they are ``lag_s`` old, so the baseline is the online state of ``lag_s`` ago without any
extra WAN traffic. Apply is last-version-wins, so a rollback's restore rows (new versions of
old values) supersede the poisoned rows in the baseline too. Once a rollback is complete the
guard re-anchors the baseline on the restored state (``reanchor``): see there why.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ekko.protocol.messages import Chunk, ShardKeys
from ekko.protocol.ready import Applied
from ekko.store import Store, shard_of
from ekko.store.spec import TableSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Arrival:
    at: float
    tables: tuple[TableSpec, ...]
    chunks: tuple[Chunk, ...]
    purges: dict[str, np.ndarray] | None = None  # bars the replica followed, after the rows
    dropped: tuple[ShardKeys, ...] = ()  # key lists it reconciled against, after the rows


class LaggedStore:
    """A ``Store`` that follows another replica's applied updates ``lag_s`` seconds late.

    Why a delay queue rather than a second puller: the rows are already here; a second
    session would double WAN bytes for a model that serves < 1 % of traffic. ``freeze()``
    stops the clock (the guard freezes the baseline while the online model is corrupted, so
    poisoned rows still in the queue never reach it); ``drop_written_after`` discards queued
    rows written after a rollback's healthy point (the rollback undoes them anyway).

    Args:
        lag_s: delay between a response's arrival and its application here.
        cache_capacity: the store's update-cache capacity.
    """

    def __init__(self, lag_s: float, cache_capacity: int = 4096) -> None:
        if not lag_s >= 0:
            raise ValueError(f"LaggedStore.lag_s must be >= 0, got {lag_s!r}")
        self.lag_s = float(lag_s)
        self.store = Store(cache_capacity=cache_capacity)
        self._queue: deque[_Arrival] = deque()
        self.frozen = False
        self.rows_queued = 0
        self.rows_applied = 0
        self.rows_dropped = 0
        self.rows_reanchored = 0
        self.applied_until = float("-inf")  # arrival time of the newest applied response

    def offer(self, applied: Applied, now: float) -> None:
        """Queue the rows one pulled response applied (its new tables and row chunks, in
        plain arrays: the puller's ``Ready.applied``), arrived at ``now`` (this store's
        clock). A chunk still holding a codec block is refused here, at once, rather than
        failing ``lag_s`` later in ``advance``."""
        tables, chunks = applied.tables, applied.chunks
        for c in chunks:
            if c.block is not None or c.meta is not None:
                raise ValueError(
                    f"LaggedStore.offer: chunk of table {c.table!r} is still codec-encoded; "
                    f"offer the decoded rows the puller applied"
                )
        if (
            not tables
            and not any(c.rows for c in chunks)
            and not (applied.purges or applied.dropped)
        ):
            return
        rows = tuple(c for c in chunks if c.rows)
        self._queue.append(_Arrival(now, tables, rows, applied.purges, applied.dropped))
        self.rows_queued += sum(c.rows for c in chunks)

    def advance(self, now: float) -> int:
        """Apply every queued response at least ``lag_s`` old (none while frozen)."""
        if self.frozen:
            return 0
        applied = 0
        while self._queue and self._queue[0].at + self.lag_s <= now:
            arrival = self._queue.popleft()
            for spec in arrival.tables:
                self.store.create_table(spec)
            for c in arrival.chunks:
                if c.table not in self.store.tables:
                    continue  # the table's spec was dropped with an earlier arrival
                lanes = np.full(c.rows, c.lane, np.uint8)
                applied += self.store.table(c.table).apply(
                    c.keys, c.values, c.versions, c.wtimes, lanes, c.dead
                )
                self.rows_queued -= c.rows
            self._follow(arrival)
            self.applied_until = arrival.at
        self.rows_applied += applied
        return applied

    def _follow(self, arrival: _Arrival) -> None:
        """What the replica did after the rows: reconciles, then purges (so the baseline's
        tombstones are bounded as the replica's are, and it keeps no row deleted while the
        replica was away)."""
        for sk in arrival.dropped:
            t = self.store.tables.get(sk.table)
            if t is not None and 0 <= sk.shard < t.num_shards:
                t.drop_absent(sk.shard, np.asarray(sk.bar, np.int64), sk.keys)
        for name, bar in (arrival.purges or {}).items():
            t = self.store.tables.get(name)
            if t is not None and bar.shape == t.purge_bar.shape:
                t.purge(bar)

    def reanchor(self, restored: Store, watermark: Mapping[str, np.ndarray | list]) -> int:
        """The baseline of ``watermark``'s tables becomes the restored state now: every row
        of ``restored`` (the replica's store, holding the rollback) at or below the
        watermark (table -> the sources' knowledge after the restore, shards x lanes) is
        applied here at once, frozen or not; returns the rows that changed.

        Why: after a rollback the online model is the restore point's, and the frozen
        baseline is the online state of ``lag_s`` before the redirect, which is newer than
        the restore point whenever the rollback goes back further than the lag (the margin,
        a slow detection). Judged against that newer baseline, the restored model looked
        worse than it (below the floor, or a CUSUM alarm) and every report after the
        quarantine started another rollback restoring nothing (17 in 30 s, c230f60). The
        restored state is what the sources vouch for, so it is the reference a relapse is
        measured against until the model is healthy again.

        Only versions the watermark covers are taken: a replica whose restore arrived after
        the quarantine already holds newer training rows, and those must not reach the
        baseline unjudged (a key rewritten since keeps its frozen baseline row). Other
        tables (other models sharing this store) are left to lag. The queue is kept: what
        it holds is older than what was applied here (last version wins, it changes
        nothing) or newer than the restore (applied ``lag_s`` after its arrival once the
        baseline is released)."""
        changed = 0
        for name, marks in watermark.items():
            src = restored.tables.get(name)
            if src is None:
                continue
            m = np.asarray(marks, np.int64)
            if m.shape != src.knowledge.shape:
                raise ValueError(
                    f"LaggedStore.reanchor: watermark[{name!r}] has shape {m.shape}, table "
                    f"{name!r} has knowledge {src.knowledge.shape}"
                )
            keys, values, versions, wtimes, lanes, dead = src.all_slots()
            bar = m[shard_of(keys, src.num_shards), lanes.astype(np.int64)]
            mine = (versions > 0) & (versions <= bar)
            if not mine.any():
                continue
            table = self.store.create_table(src.spec)
            changed += table.apply(
                keys[mine], values[mine], versions[mine], wtimes[mine], lanes[mine], dead[mine]
            )
        self.rows_reanchored += changed
        return changed

    def freeze(self) -> None:
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    def drop_written_after(self, wall_ns: int) -> int:
        """Discard queued rows whose origin write time is after ``wall_ns``; returns how many."""
        dropped = 0
        kept: deque[_Arrival] = deque()
        for a in self._queue:
            chunks = []
            for c in a.chunks:
                keep = c.wtimes <= wall_ns
                n = int((~keep).sum())
                if n == 0:
                    chunks.append(c)
                    continue
                dropped += n
                if keep.any():
                    chunks.append(_subset(c, keep))
            kept.append(_Arrival(a.at, a.tables, tuple(chunks), a.purges, a.dropped))
        self._queue = kept
        self.rows_queued -= dropped
        self.rows_dropped += dropped
        return dropped

    @property
    def pending(self) -> int:
        return len(self._queue)


def _subset(c: Chunk, keep: np.ndarray) -> Chunk:
    """The rows of ``c`` where ``keep``; shard bookkeeping is irrelevant to the baseline."""
    return Chunk(
        table=c.table, lane=c.lane, shards=c.shards[:0], bases=c.bases[:0],
        knowledge=c.knowledge[:0], counts=c.counts[:0], keys=c.keys[keep],
        values=c.values[keep], versions=c.versions[keep], wtimes=c.wtimes[keep],
        origin=c.origin, dead=None if c.dead is None else c.dead[keep],
    )  # fmt: skip
