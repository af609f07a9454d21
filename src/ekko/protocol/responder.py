"""The answering side of a sync link: turns pulls into rows, parks them when nothing moved.

Sans-IO: it is given messages and the time, and returns ``Ready`` (messages to send, next
wake-up). It reads the store it serves and never writes it. Each connected puller is a
*session*: the responder remembers what it already sent on that session, so several pulls in
flight (a window) each carry new rows instead of the same rows several times, and a pull with
nothing new waits (long-poll) until the store moves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ekko.protocol.messages import (
    LANES,
    Catalog,
    CatalogRequest,
    Chunk,
    Error,
    Message,
    PullRequest,
    PullResponse,
)
from ekko.protocol.ready import Ready, SessionId
from ekko.store import Store, Table, UnknownTableError

ROW_OVERHEAD_BYTES = 24  # key + version + wtime


@dataclass(frozen=True)
class ResponderConfig:
    """Which of the sync optimisations are on (each can be switched off for the ablation)."""

    use_shard_version: bool = True
    use_cache: bool = True
    long_poll: bool = True
    max_wait_ms: int = 30_000
    max_parked_per_session: int = 256


@dataclass(frozen=True)
class ResponderStats:
    pulls: int
    parked: int
    expired: int
    rows_sent: int
    bytes_sent: int
    sessions: int


@dataclass
class _Parked:
    request: PullRequest
    expires_at: float


@dataclass
class _Session:
    sent: dict[str, np.ndarray] = field(default_factory=dict)  # table -> int64 [S, lanes]
    seen: dict[str, np.ndarray] = field(default_factory=dict)  # table -> int64 [S]
    catalog_version: int = -1
    parked: deque[_Parked] = field(default_factory=deque)

    def state_for(self, table: Table) -> tuple[np.ndarray, np.ndarray]:
        sent = self.sent.get(table.name)
        if sent is None:
            sent = self.sent[table.name] = np.zeros((table.num_shards, len(LANES)), np.int64)
            self.seen[table.name] = np.full(table.num_shards, -1, np.int64)
        return sent, self.seen[table.name]


class Responder:
    """Answers ``PullRequest``/``CatalogRequest`` from many sessions over one store."""

    def __init__(self, store: Store, config: ResponderConfig | None = None) -> None:
        self.store = store
        self.config = config or ResponderConfig()
        self._sessions: dict[SessionId, _Session] = {}
        self._pulls = self._parked_total = self._expired = 0
        self._rows_sent = self._bytes_sent = 0

    # -- inputs -------------------------------------------------------------------------

    def receive(self, session: SessionId, msg: Message, now: float) -> Ready:
        """Handle one message from ``session``."""
        sess = self._sessions.setdefault(session, _Session())
        ready = Ready()
        if isinstance(msg, CatalogRequest):
            ready.sends.append(
                (
                    session,
                    Catalog(msg.req_id, self.store.catalog_version, self.store.specs()),
                )
            )
            return ready
        if not isinstance(msg, PullRequest):
            ready.sends.append(
                (session, Error(getattr(msg, "req_id", -1), "unexpected", type(msg).__name__))
            )
            return ready
        self._pulls += 1
        if msg.cursors:
            err = self._restate(sess, msg)
            if err is not None:
                ready.sends.append((session, err))
                return ready
        if sess.parked:
            self._park(sess, msg, now)
            return self._drain(session, sess, now, ready)
        response = self._answer(sess, msg, force=not self._may_wait(msg))
        if response is None:
            self._park(sess, msg, now)
        else:
            ready.sends.append((session, response))
        ready.wake_at = self._next_expiry()
        return ready

    def store_changed(self, now: float) -> Ready:
        """The store moved: answer the oldest parked pull of every session that has news."""
        ready = Ready()
        for sid, sess in self._sessions.items():
            if sess.parked:
                self._drain(sid, sess, now, ready)
        ready.wake_at = self._next_expiry()
        return ready

    def tick(self, now: float) -> Ready:
        """Answer parked pulls whose wait ran out with an empty response."""
        ready = Ready()
        for sid, sess in self._sessions.items():
            while sess.parked and sess.parked[0].expires_at <= now:
                parked = sess.parked.popleft()
                self._expired += 1
                ready.sends.append((sid, self._empty(sess, parked.request)))
        ready.wake_at = self._next_expiry()
        return ready

    def close_session(self, session: SessionId) -> None:
        self._sessions.pop(session, None)

    def statistics(self) -> ResponderStats:
        return ResponderStats(
            pulls=self._pulls,
            parked=sum(len(s.parked) for s in self._sessions.values()),
            expired=self._expired,
            rows_sent=self._rows_sent,
            bytes_sent=self._bytes_sent,
            sessions=len(self._sessions),
        )

    # -- internals ----------------------------------------------------------------------

    def _may_wait(self, req: PullRequest) -> bool:
        return self.config.long_poll and req.wait_ms > 0

    def _park(self, sess: _Session, req: PullRequest, now: float) -> None:
        if len(sess.parked) >= self.config.max_parked_per_session:
            oldest = sess.parked.popleft()
            oldest.expires_at = now  # answered empty by the next tick
            sess.parked.appendleft(oldest)
        wait_s = min(req.wait_ms, self.config.max_wait_ms) / 1000.0
        sess.parked.append(_Parked(req, now + wait_s))
        self._parked_total += 1

    def _drain(self, sid: SessionId, sess: _Session, now: float, ready: Ready) -> Ready:
        while sess.parked:
            response = self._answer(sess, sess.parked[0].request, force=False)
            if response is None:
                break
            sess.parked.popleft()
            ready.sends.append((sid, response))
        return ready

    def _next_expiry(self) -> float | None:
        times = [s.parked[0].expires_at for s in self._sessions.values() if s.parked]
        return min(times) if times else None

    def _restate(self, sess: _Session, req: PullRequest) -> Error | None:
        """A puller restates its knowledge (new session or after a gap): believe it."""
        try:
            for c in req.cursors or ():
                table = self.store.table(c.table)
                sent, seen = sess.state_for(table)
                if not (0 <= c.shard < table.num_shards) or c.lane not in LANES:
                    return Error(
                        req.req_id,
                        "bad_cursor",
                        f"table {c.table!r} has {table.num_shards} shards and lanes {LANES}; "
                        f"got shard {c.shard} lane {c.lane}",
                    )
                sent[c.shard, c.lane] = c.knowledge
                seen[c.shard] = -1
        except UnknownTableError as exc:
            return Error(req.req_id, "unknown_table", str(exc))
        return None

    def _empty(self, sess: _Session, req: PullRequest) -> PullResponse:
        return PullResponse(
            req.req_id, self.store.catalog_version, [], False, self._catalog(sess), self._holds()
        )

    def _holds(self) -> dict[str, np.ndarray]:
        return {name: t.knowledge.copy() for name, t in self.store.tables.items()}

    def _catalog(self, sess: _Session) -> list | None:
        if sess.catalog_version == self.store.catalog_version:
            return None
        sess.catalog_version = self.store.catalog_version
        return self.store.specs()

    def _answer(self, sess: _Session, req: PullRequest, *, force: bool) -> PullResponse | None:
        """Everything newer than what the session was sent, high lane first, within budget.

        Returns ``None`` when there is nothing new and the pull may wait.
        """
        budget = max(0, req.max_bytes)
        chunks: list[Chunk] = []
        more = False
        plans = [self._candidates(sess, t) for t in self.store.tables.values()]
        for lane in LANES:
            for table, shards, sent, _seen in plans:
                lane_shards = shards[lane]
                if lane_shards.size == 0:
                    continue
                if more:
                    continue
                chunk, truncated = self._collect(table, lane, lane_shards, sent, budget, not chunks)
                if truncated:
                    more = True
                if chunk is None:
                    continue
                chunks.append(chunk)
                budget -= chunk.nbytes
                sent[chunk.shards, lane] = chunk.knowledge
        if not more:
            for table, _shards, _sent, seen in plans:
                seen[:] = table.shard_version
        if not chunks and not force:
            return None
        rows = sum(c.rows for c in chunks)
        self._rows_sent += rows
        self._bytes_sent += sum(c.nbytes for c in chunks)
        return PullResponse(
            req.req_id, self.store.catalog_version, chunks, more, self._catalog(sess),
            None if chunks else self._holds(),
        )

    def _candidates(
        self, sess: _Session, table: Table
    ) -> tuple[Table, list[np.ndarray], np.ndarray, np.ndarray]:
        sent, seen = sess.state_for(table)
        if self.config.use_shard_version:
            moved = table.shard_version != seen
            wanted = moved[:, None] & (table.knowledge > sent)
        else:
            wanted = np.ones_like(sent, dtype=bool)
        return table, [np.flatnonzero(wanted[:, lane]) for lane in LANES], sent, seen

    def _collect(
        self,
        table: Table,
        lane: int,
        shards: np.ndarray,
        sent: np.ndarray,
        budget: int,
        first: bool,
    ) -> tuple[Chunk | None, bool]:
        bases = sent[shards, lane].copy()
        have = table.knowledge[shards, lane].copy()
        collected = table.collect(
            shards, np.full(shards.size, lane, np.int64), bases, use_cache=self.config.use_cache
        )
        keys, values, versions, wtimes, _lanes = table.rows_at(collected.slots)
        counts = np.diff(collected.offsets)
        # A relay may hold rows above its own knowledge (a transfer still in progress); it
        # passes on only what its knowledge vouches for.
        keep = versions <= np.repeat(have, counts)
        if not keep.all():
            seg = np.repeat(np.arange(shards.size), counts)
            counts = np.bincount(seg[keep], minlength=shards.size).astype(np.int64)
            keys, values, versions, wtimes = keys[keep], values[keep], versions[keep], wtimes[keep]
        knowledge = np.maximum(have, bases)
        row_bytes = ROW_OVERHEAD_BYTES + 4 * table.dim
        max_rows = budget // row_bytes
        truncated = False
        if len(keys) > max_rows:
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
            keys, values = keys[:max_rows], values[:max_rows]
            versions, wtimes = versions[:max_rows], wtimes[:max_rows]
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
            keys, values = keys[keep_rows], values[keep_rows]
            versions, wtimes = versions[keep_rows], wtimes[keep_rows]
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
            origin=self.store.origin,
        )
        return chunk, truncated
