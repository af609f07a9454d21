"""How a puller applies what an answer carries, and holds knowledge back across gaps.

Apart from ``puller`` because it is the store-facing half of a pull: each chunk's rows are
applied at once (idempotent; late copies of purged deletes dropped), but knowledge rises
only for shards whose chunk base it covers, so lost, duplicated and reordered answers never
claim rows the store does not hold. A range that arrived before the one below it waits as
``Pending`` until that one arrives; one that waits too long, or a shard the upstream says it
holds more of, is resynced by cursor (``puller`` sends those requests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ekko.protocol.chunk_codec import decode_chunk, keep_rows
from ekko.protocol.messages import Chunk
from ekko.quality.latency import LatencyHistogram
from ekko.store import Store


@dataclass
class Pending:
    """A chunk range that arrived before the range below it."""

    base: int
    knowledge: int
    since: float


class PullerApply:
    """The apply part of ``Puller`` (a base class of it, not used alone)."""

    # The puller's state this part reads and moves (``Puller`` sets it up).
    latency: LatencyHistogram | None
    _into: Store
    _pending: dict[tuple[str, int, int], list[Pending]]
    _resync: set[tuple[str, int, int]]
    _behind: int
    _gaps: int
    _stale_rows: int
    _rows_applied: int
    _rows_received: int
    _bytes: int

    def _check_holds(self, holds: dict[str, np.ndarray]) -> None:
        """The upstream says it holds more than we do yet sent nothing: resync those
        (table, shard, lane) by cursor (unless a held gap will cover them)."""
        for name, theirs in holds.items():
            table = self._into.tables.get(name)
            if table is None or theirs.shape != table.knowledge.shape:
                continue
            for s, lane in np.argwhere(theirs > table.knowledge):
                key = (name, int(s), int(lane))
                if key not in self._pending:
                    self._resync.add(key)
                    self._behind += 1

    def _apply(self, chunk: Chunk, now: float) -> Chunk:
        """Apply one chunk (decoded first); returns it decoded."""
        table = self._into.table(chunk.table)
        wire_bytes = chunk.nbytes
        chunk = decode_chunk(chunk, table.dim)
        if chunk.rows:
            stale = table.redundant(chunk.keys, chunk.versions, chunk.lane)
            if stale is not None:
                chunk = keep_rows(chunk, ~stale)
                self._stale_rows += int(stale.sum())
        n = chunk.rows
        if n:
            self._rows_applied += table.apply(
                chunk.keys, chunk.values, chunk.versions, chunk.wtimes, chunk.lane, chunk.dead
            )
            self._rows_received += n
            self._bytes += wire_bytes
            if self.latency is not None:
                self.latency.record_ns(int(now * 1e9) - chunk.wtimes)
        have = table.knowledge[chunk.shards, chunk.lane]
        covered = chunk.bases <= have
        if covered.any():
            merged = np.maximum(have, chunk.knowledge)[covered]
            table.merge_knowledge_many(chunk.shards[covered], chunk.lane, merged)
        if covered.all():
            if self._pending:
                self._settle(chunk.table, chunk.lane, chunk.shards)
            return chunk
        for i in np.flatnonzero(~covered):
            key = (chunk.table, int(chunk.shards[i]), chunk.lane)
            self._pending.setdefault(key, []).append(
                Pending(int(chunk.bases[i]), int(chunk.knowledge[i]), now)
            )
            self._gaps += 1
        self._settle(chunk.table, chunk.lane, chunk.shards)
        return chunk

    def _settle(self, table_name: str, lane: int, shards: np.ndarray) -> None:
        """Ranges that waited for the one below them merge once it arrived."""
        table = self._into.table(table_name)
        for s in shards.tolist():
            key = (table_name, s, lane)
            pend = self._pending.get(key)
            if not pend:
                continue
            pend.sort(key=lambda p: p.base)
            k = int(table.knowledge[s, lane])
            while pend and pend[0].base <= k:
                k = max(k, pend.pop(0).knowledge)
            table.merge_knowledge(s, lane, k)
            if not pend:
                del self._pending[key]
