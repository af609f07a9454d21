"""The replicas of ``ekko bench freshness``: one fed by the real sync protocol over a
simulated WAN link, and ones that receive every published write a fixed delay late; and the
scorer that reads each event from a replica as it stood at the event's time.

Both advance on the bench's simulated clock and tell the caller, just before their store
changes, so events before the change are scored on the old state (see ``ekko.bench.freshness``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.protocol.messages import Catalog, Message, PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.ready import Ready
from ekko.protocol.responder import Responder, ResponderConfig
from ekko.schedule.write_port import WritePort
from ekko.store import Store
from ekko.store.spec import HIGH_LANE, TableSpec
from ekko.train.streams import Events

BeforeChange = Callable[[float], None]
"""``before_change(at)``: called just before a replica's store changes at simulated time ``at``
(the caller scores the events that came before it)."""


@dataclass(frozen=True)
class WanLink:
    """One-way delay of a simulated WAN link: ``one_way_s`` plus Exp(``jitter_mean_s``) per
    message. Each direction is one ordered stream (one TCP connection, as the nodes use): a
    message never overtakes the one sent before it."""

    one_way_s: float = 0.100
    jitter_mean_s: float = 0.005
    seed: int = 0


# -- replicas --------------------------------------------------------------------------------


@dataclass
class _Published:
    """One write at the source, as a delayed replica will receive it."""

    due: float
    table: str
    keys: np.ndarray
    values: np.ndarray
    versions: np.ndarray
    wtimes: np.ndarray


class DelayedReplica:
    """A replica store that receives every source write exactly ``delay_s`` after it.

    Why a queue and not the protocol: a fixed delay of minutes is a property of a pipeline
    (batching, periodic export), not of a link; the queue states it exactly. Rows keep the
    versions the source gave them and are applied last-version-wins, as a pull would apply
    them, so the replica converges to the source's state as of ``now - delay_s``.
    """

    def __init__(self, store: Store, delay_s: float) -> None:
        self.store = store
        self.delay_s = float(delay_s)
        self._queue: deque[_Published] = deque()
        self.rows_applied = 0

    def offer(
        self,
        at: float,
        table: str,
        keys: np.ndarray,
        values: np.ndarray,
        versions: np.ndarray,
        wtimes: np.ndarray,
    ) -> None:
        """A write at the source at simulated time ``at``."""
        self._queue.append(_Published(at + self.delay_s, table, keys, values, versions, wtimes))

    @property
    def pending_writes(self) -> int:
        """Source writes not applied yet."""
        return len(self._queue)

    def advance(self, t: float, before_change: BeforeChange) -> None:
        """Apply every write due at or before ``t``, calling ``before_change(due)`` first."""
        q = self._queue
        while q and q[0].due <= t:
            item = q.popleft()
            before_change(item.due)
            table = self.store.table(item.table)
            self.rows_applied += table.apply(
                item.keys, item.values, item.versions, item.wtimes, HIGH_LANE
            )


@dataclass(order=True)
class _LinkEvent:
    at: float
    seq: int
    kind: str = field(compare=False)  # "up" (to the source), "down" (to the replica), "tick"
    msg: Any = field(compare=False, default=None)


_SESSION = ("replica", 1)


class SyncedReplica:
    """A replica store kept by the real sync protocol over one simulated WAN link.

    Why: the ``ekko`` variant must carry the latency Ekko really has, not an assumed one: a
    ``Puller`` on the replica and a ``Responder`` on the source exchange the same messages the
    nodes do (long-poll, windowed pulls, knowledge, catch-up), each delayed by the link. Only
    the transport is simulated; the clock is the stream's.
    """

    def __init__(
        self,
        source: Store,
        store: Store,
        link: WanLink,
        puller_config: PullerConfig,
        now: float,
        responder_config: ResponderConfig | None = None,
    ) -> None:
        self.store = store
        self.link = link
        self.responder = Responder(source, responder_config)
        self.puller = Puller(store, puller_config)
        self.now = float(now)
        self._rng = np.random.default_rng(link.seed)
        self._events: list[_LinkEvent] = []
        self._seq = itertools.count()
        self._wake: dict[str, float] = {}
        self._last_arrival = {"up": -math.inf, "down": -math.inf}
        self.messages = 0
        self._to_source(self.puller.start(self.now))

    # -- driving -----------------------------------------------------------------------

    def source_changed(self) -> None:
        """The source store moved (a publish at ``self.now``): wake parked pulls."""
        self._to_replica(self.responder.store_changed(self.now))

    def advance(self, t: float, before_change: BeforeChange) -> None:
        """Deliver every message and fire every timer up to ``t``; ``before_change(at)`` runs
        before a response that carries rows, knowledge or tables is applied."""
        while self._events and self._events[0].at <= t:
            ev = heapq.heappop(self._events)
            self.now = ev.at
            if ev.kind == "down":
                if _changes_store(ev.msg):
                    before_change(ev.at)
                self._to_source(self.puller.receive(ev.msg, self.now))
            elif ev.kind == "up":
                self._to_replica(self.responder.receive(_SESSION, ev.msg, self.now))
            elif self._wake.get(ev.msg) == ev.at:
                del self._wake[ev.msg]
                if ev.msg == "puller":
                    self._to_source(self.puller.tick(self.now))
                else:
                    self._to_replica(self.responder.tick(self.now))
        self.now = max(self.now, float(t))

    # -- internals ---------------------------------------------------------------------

    def _send(self, direction: str, msg: Message) -> None:
        delay = self.link.one_way_s + float(self._rng.exponential(self.link.jitter_mean_s))
        at = max(self.now + delay, self._last_arrival[direction])  # in order, like TCP
        self._last_arrival[direction] = at
        self.messages += 1
        self._push(at, direction, msg)

    def _push(self, at: float, kind: str, msg: Any) -> None:
        heapq.heappush(self._events, _LinkEvent(at, next(self._seq), kind, msg))

    def _to_source(self, ready: Ready) -> None:
        for _link, msg in ready.sends:
            self._send("up", msg)
        self._timer("puller", ready.wake_at)

    def _to_replica(self, ready: Ready) -> None:
        for _session, msg in ready.sends:
            self._send("down", msg)
        self._timer("responder", ready.wake_at)

    def _timer(self, role: str, at: float | None) -> None:
        if at is None:
            return
        at = max(at, self.now)
        pending = self._wake.get(role)
        if pending is not None and self.now < pending <= at:
            return  # an earlier tick is already due; it will re-arm the timer
        self._wake[role] = at
        self._push(at, "tick", role)


def _changes_store(msg: Message) -> bool:
    if isinstance(msg, PullResponse):
        return bool(msg.chunks) or bool(msg.tables)
    return isinstance(msg, Catalog)


class TapSink:
    """The source's ``WritePort`` plus a tap: each write, with the versions the source gave
    it, goes on to the delayed replicas."""

    def __init__(self, sink: WritePort, clock: Callable[[], float]) -> None:
        self.sink = sink
        self.clock = clock
        self.delayed: list[DelayedReplica] = []

    def create_table(self, spec: TableSpec) -> None:
        self.sink.create_table(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.sink.write(table, keys, values)
        if self.delayed:
            _vals, versions, _found = self.sink.store.table(table).lookup(keys)
            wtimes = np.full(len(keys), ns_of(self.clock()), np.int64)
            for replica in self.delayed:
                replica.offer(self.clock(), table, keys, values, versions, wtimes)


def ns_of(t: float) -> int:
    return round(t * 1e9)


class SimClock:
    """The bench's simulated seconds as a ``Clock``: the source's write port stamps the
    published rows with it."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def wall(self) -> float:
        return self._now()

    def mono(self) -> float:
        return self._now()

    def ns(self) -> int:
        return ns_of(self._now())


# -- scoring from a replica ----------------------------------------------------------------

_TIME_EPS_S = 1e-6


class EventTimeScorer:
    """Scores a batch from one replica, each event with the replica's state at its own time.

    Why: a batch spans a simulated second (MovieLens: minutes to hours) while Ekko's updates
    land 100 ms after a publish; scoring the whole batch with one state would charge Ekko a
    full batch of staleness it does not have, or credit it with updates not yet landed. The
    replica is advanced to the batch's last event; just before each change to its store the
    events that came strictly before the change are scored, so the model runs once per
    distinct state.

    Args:
        model: anything with ``predict(dense, sparse) -> float32 [n]`` over the replica store.
        advance: ``advance(t, before_change)`` of a ``DelayedReplica`` or ``SyncedReplica``.
    """

    def __init__(self, model: Any, advance: Callable[[float, BeforeChange], None]) -> None:
        self.model = model
        self.advance = advance
        self.predicts = 0

    def score(self, events: Events, t: np.ndarray) -> np.ndarray:
        """CTR float32 [n] for ``events``; ``t`` [n] their simulated times, ascending."""
        n = len(t)
        preds = np.empty(n, np.float32)
        done = 0

        def flush(at: float) -> None:
            nonlocal done
            # Events at `at` see the change (within _TIME_EPS_S: float sums of batch times).
            hi = int(np.searchsorted(t, at - _TIME_EPS_S, side="left"))
            if hi > done:
                preds[done:hi] = self.model.predict(events.dense[done:hi], events.sparse[done:hi])
                self.predicts += 1
                done = hi

        self.advance(float(t[-1]), flush)
        flush(math.inf)
        return preds
