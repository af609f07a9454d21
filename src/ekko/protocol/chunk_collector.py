"""A responder's rows for one (table, lane): collected within a row budget into a Chunk, and
remembered so sessions in step share one answer (DESIGN.md §3–§4)."""

from __future__ import annotations

import msgspec
import numpy as np

from ekko.protocol.chunk_codec import encode_chunk, row_bytes
from ekko.protocol.messages import Chunk
from ekko.store import Store, Table

ROW_OVERHEAD_BYTES = 24  # key + version + wtime
_MEMO_ENTRIES = 8
_MEMO_BYTES = 32 << 20


class ChunkCollector:
    """Collects chunks for a responder and remembers the last few.

    Why a memo: sessions in step (every DC leader parked on the source's latest write) ask for
    the same range at the same store state. Answered once, all of them get the same Chunk
    object (the transport then encodes it once too: ``SHARED_PARTS``). Keyed by the range, the
    budget and the shards' versions, which move with every change to a shard's rows or
    knowledge, so a hit is exactly what collecting again would give.
    """

    def __init__(self, store: Store, *, use_cache: bool = True) -> None:
        self._store = store
        self._use_cache = use_cache
        self._memo: dict[tuple, tuple[Table, Chunk | None, Chunk | None, bool]] = {}
        self._bytes = 0
        self.hits = 0  # chunks answered from the memo

    def forget(self) -> None:
        """The store changed lineage: nothing remembered describes its rows any more."""
        self._memo.clear()
        self._bytes = 0

    def collect(
        self,
        table: Table,
        lane: int,
        shards: np.ndarray,
        sent: np.ndarray,
        budget: int,
        first: bool,
        codec: str | None,
        absorb: bool = False,
    ) -> tuple[Chunk | None, Chunk | None, bool]:
        """(the chunk, its wire form under ``codec``, whether the budget truncated it)."""
        bases = sent[shards, lane]  # fancy index: a copy
        max_rows = budget // row_bytes(codec, table.dim, ROW_OVERHEAD_BYTES)
        key = (
            table.name, lane, max_rows, first, codec, shards.tobytes(), bases.tobytes(),
            table.shard_version[shards].tobytes(), absorb,
        )  # fmt: skip
        hit = self._memo.get(key)
        if hit is not None and hit[0] is table:
            self.hits += 1
            return hit[1], hit[2], hit[3]
        chunk, truncated = collect_chunk(
            table, lane, shards, bases, max_rows, first=first, origin=self._store.origin,
            absorb=absorb, use_cache=self._use_cache,
        )  # fmt: skip
        wire = chunk
        if chunk is not None and absorb:
            wire = _claim_knowledge(table, chunk, self._store.settled_of(table.name))
        if wire is not None and codec is not None:
            wire = encode_chunk(wire, codec)
        self._remember(key, (table, chunk, wire, truncated))
        return chunk, wire, truncated

    def _remember(self, key: tuple, entry: tuple[Table, Chunk | None, Chunk | None, bool]) -> None:
        size = entry[1].nbytes if entry[1] is not None else 0
        if size > _MEMO_BYTES:
            return
        memo = self._memo
        while memo and (len(memo) >= _MEMO_ENTRIES or self._bytes + size > _MEMO_BYTES):
            old = memo.pop(next(iter(memo)))  # oldest first (dicts keep insertion order)
            self._bytes -= old[1].nbytes if old[1] is not None else 0
        memo[key] = entry
        self._bytes += size


def _claim_knowledge(table: Table, chunk: Chunk, settled: np.ndarray | None) -> Chunk:
    """An answer to a recovering source carries rows above this store's knowledge too (a
    transfer in progress), but claims complete only what the store holds complete: the source
    pulls its other replicas from the knowledge it merged, and a claim up to the highest row
    here skipped another replica's rows in the gap below it (found by ``ekko sim``, seed 1137).
    And only the part of it the old source's disk backed (``settled``): knowledge beyond it
    may have skipped a row whose newer version the source lost, and another replica's older
    row — now the newest anywhere — would be skipped too (seed 5015).
    The chunk itself (what the session was sent) keeps the version it reached."""
    held = table.knowledge[chunk.shards, chunk.lane]
    if settled is None or settled.shape != table.knowledge.shape:
        held = np.zeros_like(held)
    else:
        held = np.minimum(held, settled[chunk.shards, chunk.lane])
    claim = np.maximum(np.minimum(chunk.knowledge, held), chunk.bases)
    return msgspec.structs.replace(chunk, knowledge=claim)


def collect_chunk(
    table: Table,
    lane: int,
    shards: np.ndarray,
    bases: np.ndarray,
    max_rows: int,
    *,
    first: bool,
    origin: int,
    absorb: bool = False,
    use_cache: bool = True,
) -> tuple[Chunk | None, bool]:
    """The rows of ``lane`` above ``bases`` in ``shards`` that the table's knowledge vouches
    for, at most ``max_rows`` (at least one when ``first``, so an answer always progresses),
    cut at a row so the last shard's knowledge is its last row sent; and whether the budget
    cut it. None when no shard moved."""
    have = vouched(table, absorb)[shards, lane]  # fancy index: a copy
    collected = table.collect(
        shards, np.full(shards.size, lane, np.int64), bases, use_cache=use_cache
    )
    # Budget and filters work on slots and versions; only the rows that go out are
    # gathered. (Gathering first cost a catch-up pull a copy of every row it did not
    # send, and the truncated chunk's views pinned those copies while it waited to be
    # sent: gigabytes at a source serving three replicas a 1 M-row table.)
    slots = collected.slots
    if slots.size == 0:  # knowledge only (e.g. a lane nobody writes): no row gathering
        knowledge = np.maximum(have, bases)
        moved = knowledge > bases
        if not moved.any():
            return None, False
        empty = np.zeros(0, np.int64)
        chunk = Chunk(
            table=table.name, lane=lane, shards=shards[moved].astype(np.int64),
            bases=bases[moved], knowledge=knowledge[moved],
            counts=np.zeros(int(moved.sum()), np.int64), keys=empty,
            values=np.zeros((0, table.dim), np.float32), versions=empty, wtimes=empty,
            origin=origin,
        )  # fmt: skip
        return chunk, False
    versions = table.versions_at(slots)
    counts = np.diff(collected.offsets)
    # A relay may hold rows above its own knowledge (a transfer still in progress); it
    # passes on only what its knowledge vouches for.
    keep = versions <= np.repeat(have, counts)
    if not keep.all():
        seg = np.repeat(np.arange(shards.size), counts)
        counts = np.bincount(seg[keep], minlength=shards.size).astype(np.int64)
        slots, versions = slots[keep], versions[keep]
    knowledge = np.maximum(have, bases)
    truncated = False
    if len(slots) > max_rows:
        max_rows = max(max_rows, 1 if first else 0)
        truncated = True
        ends = np.cumsum(counts)
        cut = int(np.searchsorted(ends, max_rows, side="left"))  # shard holding the cut
        if max_rows == 0:
            return None, True
        starts = ends - counts
        taken = max_rows - int(starts[cut])
        # Shards before ``cut`` go whole; shard ``cut`` goes up to its last sent row.
        last = int(starts[cut]) + taken - 1
        if taken > 0:
            knowledge[cut] = versions[last]
            counts = counts[: cut + 1].copy()
            counts[cut] = taken
            m = cut + 1
        else:
            counts = counts[:cut]
            m = cut
        shards, bases, knowledge = shards[:m], bases[:m], knowledge[:m]
        slots, versions = slots[:max_rows], versions[:max_rows]
    moved = (knowledge > bases) | (counts > 0)
    if not moved.any():
        return None, truncated
    if not moved.all():
        keep_rows = np.repeat(moved, counts)
        shards, bases, knowledge, counts = (
            shards[moved],
            bases[moved],
            knowledge[moved],
            counts[moved],
        )
        slots, versions = slots[keep_rows], versions[keep_rows]
    keys, values, versions, wtimes, _lanes = table.rows_at(slots)  # fresh, not views
    dead = table.dead_at(slots) if table.tombstones else None
    chunk = Chunk(
        table=table.name,
        lane=lane,
        shards=shards.astype(np.int64),
        bases=bases,
        knowledge=knowledge,
        counts=counts.astype(np.int64),
        keys=keys,
        values=values,
        versions=versions,
        wtimes=wtimes,
        origin=origin,
        dead=dead if dead is not None and dead.any() else None,
    )
    return chunk, truncated


def vouched(table: Table, absorb: bool) -> np.ndarray:
    """What a session may be sent up to, per (shard, lane): the table's knowledge, or for a
    recovering source every version the lane ever stored (``lane_top``)."""
    return np.maximum(table.knowledge, table.lane_top) if absorb else table.knowledge
