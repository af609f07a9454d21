"""What a responder answers a session from: its partitions, their source's history and the
purge notices it is owed.

Apart from ``responder`` because it is one concern the answering path only asks about: a
store may hold several sources' partitions (``ekko.store.sources``), so each session is
answered from its own partitions' history (lineage and mark, forgotten when that history
is rebuilt), refused when its partitions span histories, bounded to its partitions' shards
in the floors it reports, and sent the purge bars and key lists of those shards only.
"""

from __future__ import annotations

from ekko.protocol.chunk_collector import ChunkCollector
from ekko.protocol.floors import INT64_MAX, Floors, HolderFloors, Scope
from ekko.protocol.ready import SessionId
from ekko.protocol.responder_session import Session
from ekko.store import Store, StoreError
from ekko.store.placement import Placement
from ekko.store.settled import Mark


class ResponderScope:
    """The scope part of ``Responder`` (a base class of it, not used alone)."""

    # The responder's state this part reads and moves (``Responder`` sets it up).
    store: Store
    placement: Placement | None
    floors: HolderFloors
    _sessions: dict[SessionId, Session]
    _chunks: ChunkCollector
    _lineage: tuple[int, ...]
    _reconciled_shards: int

    def _check_lineage(self) -> None:
        """The store was rebuilt under another lineage: what sessions were sent (and the
        memo of answers) describes rows it no longer holds. Forget it; each puller learns the
        new lineage from its next answer and rebuilds. A store of several sources' partitions
        rebuilds one source's at a time: sessions pulling another's go on as they were."""
        key = self.store.lineage_key()  # of every source the store holds
        if key != self._lineage:
            self._lineage = key
            for sess in self._sessions.values():
                if not self.store.multi_source or self._lineage_moved(sess):
                    sess.forget()
            self._chunks.forget()

    def _lineage_moved(self, sess: Session) -> bool:
        """Whether the source history of ``sess``'s partitions is not the one it was last
        answered from."""
        try:
            lineage = self.store.history(sess.scope.partitions).lineage
        except StoreError:
            return True
        return sess.lineage is None or sess.lineage != lineage

    def _held(self, partitions: list[int] | None, held: tuple[int, ...] | None) -> list[int] | None:
        """A recovering source's ``partitions`` narrowed to those this store holds (``held``)
        of a store holding several sources': it asks every holder of any of its partitions
        for all of them, and one holding some of them beside another source's has those to
        give (one history). Unchanged when none is held (refused, naming them) or the store
        holds one source's."""
        if partitions is None or held is None or not self.store.multi_source:
            return partitions
        return [p for p in partitions if p in held] or partitions

    def _one_source(self, sess: Session) -> str | None:
        """Why the session's partitions cannot be answered from one source history (a
        store holding several sources' partitions: ``ekko.store.sources``), or None."""
        try:
            self.store.history(sess.scope.partitions)
        except StoreError as exc:
            return str(exc)
        return None

    def _history_of(self, sess: Session) -> tuple[int, Mark | None]:
        """The lineage and mark an answer to ``sess`` carries: of its partitions' source."""
        parts = sess.scope.partitions
        sess.lineage = self.store.history(parts).lineage
        return sess.lineage, self.store.mark(parts)

    def _owes(self, sess: Session) -> bool:
        """Purge bars or key lists are owed to ``sess`` — a recovering source's absorbing
        session too: a replica that slept past the horizon may still hold rows whose delete
        was purged, and only this holder's bars and key lists keep them out of the source."""
        return sess.purges.owes(self.store, self._scope(sess))

    def _purges(self, sess: Session, budget: int, now: float) -> tuple[dict | None, list | None]:
        if sess.absorb:  # a recovering source reports no floors: what it restated
            floors: Floors | None = sess.purges.restated_knowledge
        else:
            floors = None if sess.sid is None else self.floors.latest(sess.sid)
        purge, keys = sess.purges.take(self.store, floors, budget, self._scope(sess))
        self._reconciled_shards += len(keys or ())
        return purge, keys

    def _scoped(self, sess: Session, floors: Floors) -> Floors:
        """``floors`` (checked copies) bounding only the session's shards: elsewhere it holds
        nothing back. A holder of some partitions knows nothing of the others' shards and
        reports 0 there (a follower of partition 0 under a replica of 0 and 1, a hostile
        puller), which the replica's own reports would carry to those shards' source: it
        would never purge them."""
        scope = self._scope(sess)
        if scope is not None:
            for name, f in floors.items():
                f[~scope(self.store.table(name))] = INT64_MAX
        return floors

    def _scope(self, sess: Session) -> Scope | None:
        """The session's shards per table, if its pulls name partitions (None: all)."""
        if sess.scope.partitions is None or self.placement is None:
            return None
        return lambda table: sess.scope.mask(table, self.placement)
