"""The answering side of a sync link: turns pulls into rows, parks them when nothing moved.

Sans-IO: it is given messages and the time, and returns ``Ready`` (messages to send, next
wake-up). It reads the store it serves and never writes it. Each connected puller is a
*session*: the responder remembers what it already sent on that session, so several pulls in
flight (a window) each carry new rows instead of the same rows several times, and a pull with
nothing new waits (long-poll) until the store moves.

Beside it: ``responder_session`` (what it remembers of a session) and ``responder_scope``
(the partitions, source history and purge notices a session is answered for).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ekko.protocol.chunk_codec import check_codec
from ekko.protocol.chunk_collector import ChunkCollector, vouched
from ekko.protocol.floors import BadFloorsError, HolderFloors, check_floors
from ekko.protocol.messages import (
    DRAIN_ORDER,
    Catalog,
    CatalogRequest,
    Chunk,
    Error,
    Message,
    PullRequest,
    PullResponse,
)
from ekko.protocol.ready import Ready, SessionId
from ekko.protocol.responder_scope import ResponderScope
from ekko.protocol.responder_session import Parked, Session
from ekko.schedule.pacing import LinkPacer, PacerStats
from ekko.store import Store, Table, UnknownTableError
from ekko.store.placement import Placement
from ekko.store.spec import LANES

HOLDS_QUIET_S = 1.0
"""An empty answer says what the responder holds (a few KB) only once the session has had no
rows for this long: a session that gets rows sees any gap in their bases, and on a paced link
those KB would crowd out the rows."""


@dataclass(frozen=True)
class ResponderConfig:
    """Which of the sync optimisations are on (each can be switched off for the ablation)."""

    use_shard_version: bool = True
    use_cache: bool = True
    long_poll: bool = True
    max_wait_ms: int = 30_000
    max_parked_per_session: int = 256
    # A holder whose floors are older than this no longer holds tombstone purges back; it
    # reconciles when it pulls again (``ekko.protocol.floors``).
    holder_horizon_s: float = 600.0


@dataclass(frozen=True)
class ResponderStats:
    pulls: int
    parked: int
    expired: int
    rows_sent: int
    bytes_sent: int
    sessions: int
    shared_chunks: int = 0  # chunks answered from another session's identical pull
    reconciled_shards: int = 0  # full key lists sent to holders below a purge floor


class Responder(ResponderScope):
    """Answers ``PullRequest``/``CatalogRequest`` from many sessions over one store."""

    def __init__(
        self,
        store: Store,
        config: ResponderConfig | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.store = store
        self.config = config or ResponderConfig()
        # Which partition holds each (table, shard): what a pull naming partitions means.
        self.placement = placement
        self._sessions: dict[SessionId, Session] = {}
        self._pulls = self._parked_total = self._expired = 0
        self._rows_sent = self._bytes_sent = 0
        self._chunks = ChunkCollector(store, use_cache=self.config.use_cache)
        self._lineage = store.lineage_key()
        self.floors = HolderFloors(self.config.holder_horizon_s)
        self._reconciled_shards = 0

    # -- inputs -------------------------------------------------------------------------

    def receive(self, session: SessionId, msg: Message, now: float) -> Ready:
        """Handle one message from ``session``."""
        self._check_lineage()
        sess = self._sessions.setdefault(session, Session())
        sess.sid = session
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
        try:
            check_codec(msg.codec)
        except ValueError as exc:
            ready.sends.append((session, Error(msg.req_id, "bad_codec", str(exc))))
            return ready
        sess.codec = msg.codec
        sess.absorb = msg.absorb
        holding = self.store.holding
        held = holding.partitions if holding is not None and holding.scoped else None
        parts = self._held(msg.partitions, held) if msg.absorb else msg.partitions
        why = sess.scope.ask(parts, self.placement, held) or self._one_source(sess)
        if why is not None:
            ready.sends.append((session, Error(msg.req_id, "bad_partition", why)))
            return ready
        if not msg.absorb:
            self.floors.open(session, now)
            if msg.floors:
                try:
                    floors = self._scoped(sess, check_floors(self.store, msg.floors))
                    self.floors.report(session, floors, now)
                except BadFloorsError as exc:
                    ready.sends.append((session, Error(msg.req_id, "bad_floors", str(exc))))
                    return ready
        if msg.reset:
            sess.forget()
            sess.parked.clear()  # asked against what the puller no longer holds
        if msg.cursors:
            err = self._restate(sess, msg)
            if err is not None:
                ready.sends.append((session, err))
                return ready
        if sess.parked:
            self._park(sess, msg, now)
            self._drain(session, sess, now, ready)
            ready.wake_at = self._next_expiry()
            return ready
        response = self._answer(sess, msg, now, force=not self._may_wait(msg))
        if response is None:
            self._park(sess, msg, now)
        else:
            ready.sends.append((session, response))
        ready.wake_at = self._next_expiry()
        return ready

    def store_changed(self, now: float) -> Ready:
        """The store moved: answer the oldest parked pull of every session that has news."""
        self._check_lineage()
        ready = Ready()
        for sid, sess in self._sessions.items():
            if sess.parked:
                self._drain(sid, sess, now, ready)
        ready.wake_at = self._next_expiry()
        return ready

    def pace(
        self,
        session: SessionId,
        rate_bytes_per_s: float | None,
        now: float,
        *,
        max_unframed: int | None = None,
    ) -> None:
        """Pace ``session``'s answers at ``rate_bytes_per_s`` (its link's bandwidth), or stop
        pacing it (None). A paced session's answers fit the tokens its link has earned, high
        lane first; what does not fit waits at the source, where later writes coalesce it,
        instead of queueing on the link ahead of the next high-lane row.

        ``max_unframed``: a host that reports each message with ``framed`` may ask that at
        most this many answers with rows wait to be framed: rows are then chosen when the
        link can take them, not before a stalled send queue (one that a bandwidth drop
        would otherwise hit whole)."""
        sess = self._sessions.setdefault(session, Session())
        sess.max_unframed = max_unframed if rate_bytes_per_s is not None else None
        if rate_bytes_per_s is None:
            sess.pacer = sess.paced_until = None
            sess.unframed = 0
        elif sess.pacer is None:
            sess.pacer = LinkPacer(rate_bytes_per_s, now=now)
        else:
            sess.pacer.set_rate(rate_bytes_per_s, now)

    def framed(self, session: SessionId, msg: Message, frame_bytes: int, now: float) -> Ready:
        """``msg`` went to ``session`` as a frame of ``frame_bytes``: a paced session's tokens
        are charged the difference to what its answer counted (headers, catalog, knowledge,
        compression), so the pacer holds the link's real byte rate; a session held back by
        ``max_unframed`` may be answered again."""
        ready = Ready()
        sess = self._sessions.get(session)
        if sess is None or sess.pacer is None:
            return ready
        rows = isinstance(msg, PullResponse) and bool(msg.chunks)
        counted = sum(c.nbytes for c in msg.chunks) if isinstance(msg, PullResponse) else 0
        sess.pacer.correct(frame_bytes - counted, now)
        if rows and sess.unframed > 0:
            sess.unframed -= 1
            self._drain(session, sess, now, ready)
            ready.wake_at = self._next_expiry()
        return ready

    def tick(self, now: float) -> Ready:
        """Answer parked pulls whose wait ran out with an empty response, and paced ones whose
        link has earned tokens again."""
        ready = Ready()
        for sid, sess in self._sessions.items():
            if sess.paced_until is not None and sess.paced_until <= now:
                sess.paced_until = None
                self._drain(sid, sess, now, ready)
            if sess.parked and min(p.expires_at for p in sess.parked) <= now:
                # Pulls wait for different times (the puller spreads them): any may be due,
                # not only the oldest; the rest stay parked in their order.
                waiting: deque[Parked] = deque()
                for parked in sess.parked:
                    if parked.expires_at <= now:
                        self._expired += 1
                        ready.sends.append((sid, self._empty(sess, parked.request, now)))
                    else:
                        waiting.append(parked)
                sess.parked = waiting
        ready.wake_at = self._next_expiry()
        return ready

    def close_session(self, session: SessionId, now: float | None = None) -> None:
        """``session`` ended; its floors hold purges back for the horizon after ``now``
        (None: not at all)."""
        self._sessions.pop(session, None)
        if now is None:
            self.floors.close(session, -self.floors.horizon_s)
        else:
            self.floors.close(session, now)

    def pacing(self, now: float) -> dict[SessionId, PacerStats]:
        """Each paced session's pacer at ``now``."""
        return {
            sid: sess.pacer.statistics(now)
            for sid, sess in self._sessions.items()
            if sess.pacer is not None
        }

    def statistics(self) -> ResponderStats:
        return ResponderStats(
            pulls=self._pulls,
            parked=sum(len(s.parked) for s in self._sessions.values()),
            expired=self._expired,
            rows_sent=self._rows_sent,
            bytes_sent=self._bytes_sent,
            sessions=len(self._sessions),
            shared_chunks=self._chunks.hits,
            reconciled_shards=self._reconciled_shards,
        )

    # -- internals ----------------------------------------------------------------------

    def _may_wait(self, req: PullRequest) -> bool:
        return self.config.long_poll and req.wait_ms > 0

    def _park(self, sess: Session, req: PullRequest, now: float) -> None:
        if len(sess.parked) >= self.config.max_parked_per_session:
            oldest = sess.parked.popleft()
            oldest.expires_at = now  # answered empty by the next tick
            sess.parked.appendleft(oldest)
        wait_s = min(req.wait_ms, self.config.max_wait_ms) / 1000.0
        sess.parked.append(Parked(req, now + wait_s))
        self._parked_total += 1

    def _drain(self, sid: SessionId, sess: Session, now: float, ready: Ready) -> Ready:
        while sess.parked:
            response = self._answer(sess, sess.parked[0].request, now, force=False)
            if response is None:
                break
            sess.parked.popleft()
            ready.sends.append((sid, response))
        return ready

    def _next_expiry(self) -> float | None:
        times = [min(p.expires_at for p in s.parked) for s in self._sessions.values() if s.parked]
        times += [s.paced_until for s in self._sessions.values() if s.paced_until is not None]
        return min(times) if times else None

    def _restate(self, sess: Session, req: PullRequest) -> Error | None:
        """A puller restates its knowledge (new session or after a gap): believe it."""
        try:
            for c in req.cursors or ():
                if req.absorb and c.table not in self.store.tables:
                    continue  # a recovering source's table we hold nothing of
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
                sess.purges.restated(table, c.shard, c.lane, c.knowledge)
        except UnknownTableError as exc:
            return Error(req.req_id, "unknown_table", str(exc))
        return None

    def _empty(self, sess: Session, req: PullRequest, now: float) -> PullResponse:
        purge, reconcile = self._purges(sess, max(0, req.max_bytes), now)
        return PullResponse(
            req.req_id, self.store.catalog_version, [], False, self._catalog(sess),
            self._holds(sess, now), *self._history_of(sess), purge, reconcile,
        )  # fmt: skip

    def _holds(self, sess: Session, now: float) -> dict[str, np.ndarray] | None:
        """What this session was sent: a puller below it lost an answer. (Not what the store
        holds: writes since the last answer are news, not a loss, and resyncing them would
        send them twice.)"""
        if sess.rows_at is not None and now - sess.rows_at < HOLDS_QUIET_S:
            return None
        if sess.holds_at is not None and now - sess.holds_at < HOLDS_QUIET_S:
            return None
        sess.holds_at = now
        return {name: sent.copy() for name, sent in sess.sent.items()}

    def _catalog(self, sess: Session) -> list | None:
        if sess.catalog_version == self.store.catalog_version:
            return None
        sess.catalog_version = self.store.catalog_version
        return self.store.specs()

    def _answer(
        self, sess: Session, req: PullRequest, now: float, *, force: bool
    ) -> PullResponse | None:
        """Everything newer than what the session was sent, high lane first, within budget
        (the request's, and the link's tokens when paced).

        Returns ``None`` when there is nothing new, or no tokens yet, and the pull may wait.
        """
        if not force and self._unmoved(sess) and not self._owes(sess):
            return None
        if sess.max_unframed is not None and sess.unframed >= sess.max_unframed:
            return self._empty(sess, req, now) if force else None
        budget = max(0, req.max_bytes)
        pacer = sess.pacer
        if pacer is not None:
            budget = pacer.budget(now, budget)
            if budget == 0:
                if not force:
                    sess.paced_until = now + pacer.wait_hint(now, req.max_bytes)
                    return None
                return self._empty(sess, req, now)
        chunks: list[Chunk] = []
        more = False
        plans = [self._candidates(sess, t) for t in self.store.tables.values()]
        absorb = sess.absorb
        if plans:
            # A budget that runs out must not always favour the first tables: start each
            # answer one table further on.
            k = sess.turn % len(plans)
            plans = plans[k:] + plans[:k]
        for lane in DRAIN_ORDER:
            for table, shards, sent, _seen in plans:
                lane_shards = shards[lane]
                if lane_shards.size == 0:
                    continue
                if more:
                    continue
                chunk, wire, truncated = self._chunks.collect(
                    table, lane, lane_shards, sent, budget, not chunks, sess.codec, absorb
                )
                if truncated:
                    more = True
                    sess.turn += 1
                if chunk is None or wire is None:
                    continue
                chunks.append(wire)
                budget -= wire.nbytes
                sent[chunk.shards, lane] = chunk.knowledge
        if not more:
            for table, _shards, _sent, seen in plans:
                seen[:] = table.shard_version
        owes = self._owes(sess)
        if not chunks and not force and not owes:
            return None
        purge, reconcile = self._purges(sess, budget, now) if owes else (None, None)
        if absorb and not more and reconcile and self._owes(sess):
            more = True  # a recovering source is caught up only once it has every list
        rows = sum(c.rows for c in chunks)
        nbytes = sum(c.nbytes for c in chunks)
        self._rows_sent += rows
        self._bytes_sent += nbytes
        if pacer is not None:
            pacer.spent(nbytes, now)
        if chunks:
            sess.rows_at = now
            if sess.max_unframed is not None:
                sess.unframed += 1
        return PullResponse(
            req.req_id,
            self.store.catalog_version,
            chunks,
            more,
            self._catalog(sess),
            None if chunks else self._holds(sess, now),
            *self._history_of(sess),
            purge,
            reconcile,
        )

    def _unmoved(self, sess: Session) -> bool:
        """No shard moved since this session's last complete answer: nothing to send, and
        the (frequent) pull that finds so parks at the cost of a comparison per table."""
        if not self.config.use_shard_version:
            return False
        for name, table in self.store.tables.items():
            seen = sess.seen.get(name)
            if seen is None or not (seen == table.shard_version).all():
                return False
        return True

    def _candidates(
        self, sess: Session, table: Table
    ) -> tuple[Table, list[np.ndarray], np.ndarray, np.ndarray]:
        sent, seen = sess.state_for(table)
        if self.config.use_shard_version:
            moved = table.shard_version != seen
            wanted = moved[:, None] & (vouched(table, sess.absorb) > sent)
        else:
            wanted = np.ones_like(sent, dtype=bool)
        scope = sess.scope.mask(table, self.placement)
        if scope is not None:
            wanted &= scope[:, None]
        return table, [np.flatnonzero(wanted[:, lane]) for lane in LANES], sent, seen
