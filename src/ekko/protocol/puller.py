"""The pulling side of a sync link: keeps pulls in flight and applies what comes back.

Sans-IO: ``start``/``receive``/``tick`` take the time and return ``Ready``. The puller writes
rows into its store (an in-memory structure, like raft's ``Storage``) and advances knowledge
only where a chunk's base is covered, so lost, duplicated and reordered responses never
claim rows the store does not hold. Gaps are repaired by restating knowledge (a resync).

Every answer names the responder's lineage (the source history its rows belong to). A
puller whose store holds another lineage cannot merge by version — the same version may be
another row — so it rebuilds: pulls everything into a fresh store from nothing and, once the
responder has nothing more for it, puts that store's tables in place of its own (rows the
new lineage lacks are gone, exactly). A store holding partitions of several sources keeps a
lineage per source (``ekko.store.sources``): a puller's partitions are one source's, and it
checks, adopts and rebuilds only that source's history and shards. ``absorb`` pullers (a
restarting source pulling from its replicas) never rebuild: they take rows of their own
lineage and refuse any other.

Beside it: ``puller_lineage`` (the lineage check and the rebuild) and ``puller_apply`` (the
apply and its gaps); this module keeps the session: requests in flight, timeouts, answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ekko.protocol.chunk_codec import check_codec
from ekko.protocol.floors import Floors, Reconciles, holder_floors, lowest
from ekko.protocol.messages import (
    Catalog,
    Cursor,
    Error,
    Message,
    PullRequest,
    PullResponse,
)
from ekko.protocol.puller_apply import Pending, PullerApply
from ekko.protocol.puller_lineage import PullerLineage
from ekko.protocol.ready import Applied, Ready
from ekko.protocol.traffic import TrafficTally
from ekko.quality.latency import LatencyHistogram
from ekko.store import Store
from ekko.store.spec import LANES

LINK = "upstream"

WAIT_SPREAD = 4
"""The window's pulls wait 1 to ``WAIT_SPREAD`` times ``wait_ms`` at the responder, in turn.
Why: any parked pull is answered as soon as rows arrive, so how long the others wait changes
no latency, only how often an idle link turns over: with every pull at ``wait_ms`` the whole
window (32) expired together each ``wait_ms``, answered empty and sent again at once, a third
of a partition leader's CPU while it served lookups; spread, half as many expire, one by one.
"""


@dataclass(frozen=True)
class PullerConfig:
    """How hard to pull. ``window`` pulls stay in flight so a long-polled change meets a
    waiting pull at the responder; with ``wait_ms == 0`` it polls every ``poll_interval_ms``."""

    max_bytes: int = 8 << 20
    wait_ms: int = 1000
    window: int = 16
    poll_interval_ms: int = 100
    request_timeout_ms: int = 5000
    gap_timeout_ms: int = 200
    codec: str | None = None  # rows as a RowBlock with this codec (lossy on WAN, e.g. int8)
    # Bytes all pulls in flight may ask for together: each asks min(max_bytes, this / window).
    # A window of full-size answers queued behind one another (a catch-up of a large table)
    # would otherwise take longer to arrive than the request timeout.
    max_bytes_in_flight: int = 32 << 20
    partitions: tuple[int, ...] | None = None  # pull these partitions' shards only
    # How often pulls report the floors of this holder and those below it (tombstone purge).
    floor_report_ms: int = 5000

    def validate(self) -> PullerConfig:
        check_codec(self.codec)
        for name in (
            "max_bytes",
            "window",
            "request_timeout_ms",
            "max_bytes_in_flight",
            "floor_report_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"PullerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.wait_ms < 0 or self.poll_interval_ms < 0:
            raise ValueError("PullerConfig.wait_ms and poll_interval_ms must be >= 0")
        return self


@dataclass(frozen=True)
class PullerStats:
    responses: int
    rows_received: int
    rows_applied: int
    bytes_received: int
    gaps: int
    resyncs: int
    timeouts: int
    errors: int
    in_flight: int
    pending_chunks: int = 0  # chunk ranges held until the range below them arrives
    epoch_changes: int = 0  # source restarts met: knowledge taken back to the settled part
    stale_rows: int = 0  # rows not applied: below knowledge and the purge floor (late copies)
    reconciled_shards: int = 0  # shards reconciled against the upstream's key lists
    rows_reconciled: int = 0  # rows those reconciles dropped (deleted upstream, purged)
    refused_notices: int = 0  # purge bars and key lists that did not fit (not applied)


@dataclass
class _InFlight:
    sent_at: float
    deadline: float


@dataclass
class Puller(PullerLineage, PullerApply):
    """Pulls one upstream into ``store``. One instance per connection (session)."""

    store: Store
    config: PullerConfig = field(default_factory=PullerConfig)
    # Write-to-apply latency of the rows applied here (None: the driver measures it from
    # ``Ready.applied``, as a node does).
    latency: LatencyHistogram | None = field(default_factory=LatencyHistogram)
    traffic: TrafficTally | None = None  # reported upstream on each request
    absorb: bool = False  # a source recovering from a replica: never rebuild, refuse others
    # The floors of the holders pulling from this one (its responder's ``HolderFloors``):
    # reported upstream with its own (``ekko.protocol.floors``).
    floors: Callable[[float], Floors | None] | None = None

    def __post_init__(self) -> None:
        self.config.validate()
        self._staging: Store | None = None  # rebuilding from another lineage into this
        self._staging_from = 0  # the first request of the rebuild
        self._reset_pending = False  # until the upstream answered a request with ``reset``
        self._forget_asked = False  # the next request asks the upstream to forget (``reset``)
        # The upstream's catalog version of the last catalog received (0: a store that never
        # created a table has no catalog to miss).
        self._catalog_seen = 0
        self._first_req = 1
        self.caught_up = False  # an answer said the responder has nothing more for us
        self.refused_lineage: int | None = None  # absorb: the upstream's other lineage
        self.rebuilds = 0  # stores replaced by another lineage's
        self.epoch_changes = 0  # knowledge taken back to settled: the source restarted
        self._next_id = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._pending: dict[tuple[str, int, int], list[Pending]] = {}
        self._resync: set[tuple[str, int, int]] = set()
        self._behind = 0  # cursors resynced because an empty answer showed we lag
        self._restate_all = True
        self._next_poll: float | None = None
        self._responses = self._rows_received = self._rows_applied = self._bytes = 0
        self._gaps = self._resyncs = self._timeouts = self._errors = 0
        self._stale_rows = 0
        self.reconciles = Reconciles()  # key lists waiting for this holder to catch up
        self._next_report: float | None = None  # None: report on the next request

    # -- inputs -------------------------------------------------------------------------

    def start(self, now: float) -> Ready:
        """A fresh session: restate all knowledge, then fill the window."""
        self._restate_all = True
        self._first_req = self._next_id + 1
        self.caught_up = False
        self._catalog_seen = 0
        self._next_report = None
        return self._fill(now)

    def receive(self, msg: Message, now: float) -> Ready:
        if isinstance(msg, PullResponse):
            self._in_flight.pop(msg.req_id, None)
            self._responses += 1
            # The link delivers: pulls still in flight are queued behind this answer, not
            # lost. Only a link silent for a whole timeout restates everything (resending a
            # large table's worth while the first copy is still arriving starts a storm).
            deadline = now + (self.config.wait_ms + self.config.request_timeout_ms) / 1000
            for f in self._in_flight.values():
                f.deadline = max(f.deadline, deadline)
            if self._staging is not None and msg.req_id < self._staging_from:
                return self._fill(now)  # asked before the rebuild: resent from nothing
            if self._staging is not None and self._reset_pending:
                self._reset_pending = False  # the upstream forgot; the window opens again
            if not self._same_lineage(msg.lineage):
                if self.absorb:
                    return Ready()
                return self._fill(now, immediate=True)
            if not self.absorb and self._history.settled.new_epoch(msg.mark):
                self._epoch_changed(msg.mark)
            if msg.tables is not None:
                for spec in msg.tables:
                    self._into.create_table(spec)
                self._catalog_seen = max(self._catalog_seen, msg.catalog_version)
            elif msg.catalog_version > self._catalog_seen:
                self._catalog_lost()  # an answer that carried the catalog was lost
            serving = self._staging is None  # rows for the served store, not one rebuilt
            chunks = msg.chunks
            if any(c.table not in self._into.tables for c in chunks):
                chunks = [c for c in chunks if c.table in self._into.tables]
                self._catalog_lost()
            applied = tuple(self._apply(chunk, now) for chunk in chunks)
            bars, dropped = self._purge(msg)  # absorbing too: purged deletes stay out
            if not self.absorb:
                self._history.settled.observe(msg.mark, self._into.knowledge_by_table())
            if msg.holds and not msg.chunks:
                self._check_holds(msg.holds)
            if not msg.more and not self._pending and not self._forget_asked:
                self._settled(msg.req_id)
            ready = self._fill(now, immediate=msg.more)
            if serving and (msg.tables or applied or bars or dropped):
                ready.applied = Applied(
                    tuple(msg.tables or ()), applied, now, bars or None, tuple(dropped)
                )
            return ready
        if isinstance(msg, Catalog):
            for spec in msg.tables:
                self._into.create_table(spec)
            self._catalog_seen = max(self._catalog_seen, msg.version)
            ready = Ready(wake_at=self._wake_at())
            if msg.tables and self._staging is None:
                ready.applied = Applied(tuple(msg.tables), (), now)
            return ready
        if isinstance(msg, Error):
            self._errors += 1
            self._in_flight.pop(msg.req_id, None)
            self._restate_all = True
            return Ready(wake_at=self._wake_at(now + self.config.request_timeout_ms / 1000))
        raise TypeError(f"puller cannot handle {type(msg).__name__}")

    def tick(self, now: float) -> Ready:
        lost = [rid for rid, f in self._in_flight.items() if f.deadline <= now]
        for rid in lost:
            del self._in_flight[rid]
            self._timeouts += 1
        if lost:
            self._restate_all = True
        gap_s = self.config.gap_timeout_ms / 1000
        for key, pend in self._pending.items():
            if pend and now >= pend[0].since + gap_s:  # same sum as _wake_at: no float gap
                self._resync.add(key)
        return self._fill(now)

    def deadline(self, req_id: int) -> float | None:
        """When pull ``req_id`` times out; None once it is answered or timed out (or was
        never sent). A driver tells a late answer from a timely one by it."""
        f = self._in_flight.get(req_id)
        return None if f is None else f.deadline

    def _catalog_lost(self) -> None:
        """An answer names a catalog version newer than the last catalog we received, or
        rows of a table we never learnt: the answer that carried the catalog was lost (a
        session is sent each catalog once). Ask the upstream to forget what it sent this
        session: it sends the catalog again, and the rows from our restated knowledge (rows
        of a table we did not know could not be stored)."""
        self._forget_asked = True
        self._restate_all = True

    def _purge(self, msg: PullResponse) -> tuple[Floors, list]:
        """Follow the upstream's key lists and purge bars; apply lists now due. Returns the
        bars followed and the lists applied."""
        if not (msg.reconcile or msg.purge or len(self.reconciles)):
            return {}, []
        return self.reconciles.follow(self._into, msg.purge, msg.reconcile)

    def _report(self, now: float) -> Floors | None:
        """This holder's floors (its settled knowledge, at least what those below it hold
        too), due every ``floor_report_ms``; None between reports and while rebuilding."""
        if self.absorb or self._staging is not None:
            return None
        if self._next_report is not None and now < self._next_report:
            return None
        self._next_report = now + self.config.floor_report_ms / 1000
        below = self.floors(now) if self.floors is not None else None
        return lowest(holder_floors(self.store), below)

    def statistics(self) -> PullerStats:
        return PullerStats(
            responses=self._responses,
            rows_received=self._rows_received,
            rows_applied=self._rows_applied,
            bytes_received=self._bytes,
            gaps=self._gaps,
            resyncs=self._resyncs,
            timeouts=self._timeouts,
            errors=self._errors,
            in_flight=len(self._in_flight),
            pending_chunks=sum(len(p) for p in self._pending.values()),
            epoch_changes=self.epoch_changes,
            stale_rows=self._stale_rows,
            reconciled_shards=self.reconciles.shards,
            rows_reconciled=self.reconciles.rows,
            refused_notices=self.reconciles.refused,
        )

    # -- internals ----------------------------------------------------------------------

    def _fill(self, now: float, *, immediate: bool = False) -> Ready:
        ready = Ready()
        polling = self.config.wait_ms == 0
        if polling:
            window = 1
            if self._in_flight:
                return Ready(wake_at=self._wake_at())
            if not immediate and self._next_poll is not None and now < self._next_poll:
                return Ready(wake_at=self._wake_at())
        else:
            window = self.config.window
        if self._reset_pending:
            # One request until the upstream has forgotten this session: a later one could
            # overtake it and be answered against what the old store held.
            if any(rid >= self._staging_from for rid in self._in_flight):
                return Ready(wake_at=self._wake_at())
            ready.sends.append((LINK, self._request(now, window)))
            ready.wake_at = self._wake_at()
            return ready
        while len(self._in_flight) < window:
            ready.sends.append((LINK, self._request(now, window)))
        if polling:
            self._next_poll = now + self.config.poll_interval_ms / 1000
        ready.wake_at = self._wake_at()
        return ready

    def _request(self, now: float, window: int) -> PullRequest:
        self._next_id += 1
        rid = self._next_id
        cursors = None
        if self._restate_all:
            cursors = self._all_cursors()
            self._restate_all = False
            self._resync.clear()
            self._pending.clear()
        elif self._resync:
            cursors = [
                Cursor(t, s, lane, int(self._into.table(t).knowledge[s, lane]))
                for (t, s, lane) in sorted(self._resync)
            ]
            for key in self._resync:
                self._pending.pop(key, None)
            self._resync.clear()
        if cursors is not None:
            self._resyncs += 1
        wait = self.config.wait_ms * (1 + rid % WAIT_SPREAD)
        timeout = (wait + self.config.request_timeout_ms) / 1000
        self._in_flight[rid] = _InFlight(now, now + timeout)
        budget = min(
            self.config.max_bytes, max(64 << 10, self.config.max_bytes_in_flight // window)
        )
        traffic = self.traffic.take() if self.traffic is not None else None
        reset = self._reset_pending or self._forget_asked
        self._forget_asked = False
        parts = list(self.config.partitions) if self.config.partitions is not None else None
        return PullRequest(
            rid, budget, wait, cursors, self.config.codec, traffic, reset, self.absorb, parts,
            self._report(now),
        )  # fmt: skip

    def _all_cursors(self) -> list[Cursor]:
        out = []
        for name, table in self._into.tables.items():
            k = table.knowledge
            for s in range(table.num_shards):
                for lane in LANES:
                    out.append(Cursor(name, s, lane, int(k[s, lane])))
        return out

    def _wake_at(self, extra: float | None = None) -> float | None:
        times = [f.deadline for f in self._in_flight.values()]
        if self._next_poll is not None and not self._in_flight:
            times.append(self._next_poll)
        if not self._restate_all:
            # A gap already queued for resync waits for a free window slot, not for time.
            for key, pend in self._pending.items():
                if pend and key not in self._resync:
                    times.append(pend[0].since + self.config.gap_timeout_ms / 1000)
        if extra is not None:
            times.append(extra)
        return min(times) if times else None
