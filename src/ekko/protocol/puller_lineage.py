"""Which source history a puller's rows belong to, and the rebuild when it is another.

Apart from ``puller`` because it is its own mechanism over the puller's session: every
answer names the responder's lineage, and a puller holding another cannot merge by version,
so it pulls everything into a staging store and puts it in place once the responder has
nothing more for it (``Store.replace_with``); a source that restarted (another epoch in the
answer's mark) takes knowledge back to the part its disk backed. The request and response
loop in ``puller`` asks this part where rows go (``_into``) and whether to take them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ekko.protocol.floors import Reconciles
from ekko.store import Store
from ekko.store.settled import Mark
from ekko.store.sources import History

if TYPE_CHECKING:
    from ekko.protocol.puller import PullerConfig, _InFlight
    from ekko.protocol.puller_apply import Pending


class PullerLineage:
    """The lineage part of ``Puller`` (a base class of it, not used alone)."""

    # The puller's state this part reads and moves (``Puller`` sets it up).
    store: Store
    config: PullerConfig
    absorb: bool
    reconciles: Reconciles
    caught_up: bool
    refused_lineage: int | None
    rebuilds: int
    epoch_changes: int
    _staging: Store | None
    _staging_from: int
    _reset_pending: bool
    _restate_all: bool
    _first_req: int
    _next_id: int
    _in_flight: dict[int, _InFlight]
    _pending: dict[tuple[str, int, int], list[Pending]]
    _resync: set[tuple[str, int, int]]

    @property
    def rebuilding(self) -> bool:
        """Pulling another lineage into a fresh store, not yet in place."""
        return self._staging is not None

    @property
    def _into(self) -> Store:
        return self._staging if self._staging is not None else self.store

    @property
    def _history(self) -> History:
        """The source history this link pulls: of its partitions in the served store (a
        store of several sources keeps one per source), or the staging store's one."""
        if self._staging is not None:
            return self._staging.history()
        return self.store.history(self.config.partitions)

    def _same_lineage(self, lineage: int) -> bool:
        """Whether rows of ``lineage`` may be merged into what we hold; if not, start a
        rebuild (or, absorbing, refuse the upstream)."""
        history = self._history
        if lineage == 0 or lineage == history.lineage:
            return True  # 0: an upstream that has not learnt a lineage holds no rows
        parts = None if self._staging is not None else self._parts()
        if history.lineage == 0 and not self._into.holds_rows(parts):
            history.lineage = lineage  # nothing held yet: adopt
            return True
        if self.absorb:
            self.refused_lineage = lineage
            self.caught_up = True
            return False
        self._staging = Store(origin=self.store.origin, cache_capacity=self.store.cache_capacity)
        self.reconciles.clear()
        self._staging.lineage = lineage
        self._staging_from = self._next_id + 1
        self._reset_pending = True
        self._restate_all = True
        self._in_flight.clear()  # their answers are ignored: everything comes again
        self._pending.clear()
        self._resync.clear()
        return False

    def _epoch_changed(self, mark: Mark) -> None:
        """The upstream answers for another source process (it restarted): what our
        knowledge claimed beyond its old disk may rest on writes it lost. Take knowledge back
        to the settled part and restate it; rows above come again (apply is idempotent)."""
        self._into.settle_back(mark, None if self._staging is not None else self._parts())
        self._restate_all = True
        self._pending.clear()
        self._resync.clear()
        self.epoch_changes += 1

    def _settled(self, req_id: int) -> None:
        """The responder had nothing more for this session when it answered ``req_id``."""
        if self._staging is not None:
            if req_id >= self._staging_from:
                self.store.replace_with(self._staging, self._parts())
                self._staging = None
                self.reconciles.clear()  # lists for the old store's rows
                self.rebuilds += 1
            return
        if req_id >= self._first_req:
            self.caught_up = True

    def _parts(self) -> tuple[int, ...] | None:
        """The partitions naming this link's history in a store of several sources."""
        return self.config.partitions if self.store.multi_source else None
