"""The simulated network's event loop: one queue of events on the simulated clock, the
faults each message meets on its way, and the delivery of what arrives.

Apart from ``testing`` because it is the engine, not the scenario: ``SimNetwork`` builds
nodes and links, cuts, moves and restarts them and writes at sources; this part runs what
follows, in order of simulated time — each message dropped, duplicated or delayed by its
link's ``Faults`` and delivered only to the session that sent it, and each puller,
responder, recovery and write port woken when its ``Ready`` asked — and hashes every event
into the trace that tells two runs of a seed apart.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ekko.protocol.floors import TombstonePurger
from ekko.protocol.messages import Catalog, Error, Message, PullResponse
from ekko.protocol.puller import Puller
from ekko.protocol.ready import Ready

if TYPE_CHECKING:
    from ekko.protocol.testing import AnswerTally, Faults, SimNode

RECOVERY = -1  # the session tag of a restarting source's pulls from a replica
_ANSWERS = (PullResponse, Catalog, Error)
RACE_S = 0.002
"""An answer this close before its pull's deadline counts as racing the timeout."""


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    args: tuple = field(compare=False, default=())


class SimEvents:
    """The event loop of ``SimNetwork`` (a base class of it, not used alone)."""

    # The network's state this part reads and moves (``SimNetwork`` sets it up).
    rng: random.Random
    faults: Faults
    now: float
    nodes: dict[str, SimNode]
    cut: set[str]
    blocked: set[tuple[str, str]]
    messages_sent: int
    messages_dropped: int
    answers: AnswerTally
    purge_every_s: float | None
    purged: int
    _recovering: dict[tuple[str, str], Puller]

    def _init_events(self) -> None:
        self._events: list[_Event] = []
        self._seq = itertools.count()
        self._wakes: dict[str, float] = {}
        self._trace = hashlib.blake2b(digest_size=16)

    @property
    def trace_hash(self) -> str:
        """A hash of every event so far, in order, with its time: equal for two runs exactly
        when they did the same things at the same simulated times."""
        return self._trace.hexdigest()

    def run_until(self, t: float) -> None:
        while self._events and self._events[0].at <= t:
            ev = heapq.heappop(self._events)
            self.now = ev.at
            self._trace.update(f"{ev.at!r} {ev.kind} {_describe(ev.args)};".encode())
            getattr(self, f"_on_{ev.kind}")(*ev.args)
        self.now = max(self.now, t)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- internals ----------------------------------------------------------------------

    def _schedule(self, at: float, kind: str, *args: object) -> None:
        heapq.heappush(self._events, _Event(at, next(self._seq), kind, args))

    def _send(
        self, src: str, dst: str, session: int, msg: Message, reliable: bool, to_puller: bool
    ) -> None:
        self.messages_sent += 1
        f = self.faults
        copies = 1
        if (src, dst) in self.blocked:
            self.messages_dropped += 1
            return
        if not reliable:
            if self.rng.random() < f.drop:
                self.messages_dropped += 1
                return
            if self.rng.random() < f.duplicate:
                copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(*f.delay)
            self._schedule(self.now + delay, "deliver", src, dst, session, msg, to_puller)

    def _on_deliver(self, src: str, dst: str, session: int, msg: Message, to_puller: bool) -> None:
        if session == RECOVERY:
            self._deliver_recovery(src, dst, msg)
            return
        # Puller → responder messages are tagged with the puller's session; responses too.
        # A message of a session that ended (a cut, a restart, a move) is lost with it.
        if to_puller:
            node = self.nodes[dst]
            if node.puller is None or session != node.session or node.upstream != src:
                return
            if isinstance(msg, PullResponse):
                self._tally(node, node.puller, msg.req_id)
            self._handle_puller(node, node.puller.receive(msg, self.now))
        else:
            puller_node = self.nodes[src]
            if src in self.cut or session != puller_node.session or puller_node.upstream != dst:
                return
            node = self.nodes[dst]
            self._handle_responder(node, node.responder.receive((src, session), msg, self.now))

    def _on_purge(self, name: str) -> None:
        """Source ``name`` purges the tombstones every holder it hears of has."""
        node = self.nodes[name]
        purger = TombstonePurger(node.store, node.responder.floors.lowest)
        self.purged += purger.tick(self.now)
        self._handle_responder(node, node.responder.store_changed(self.now))
        assert self.purge_every_s is not None
        self._schedule(self.now + self.purge_every_s, "purge", name)

    def _tally(self, node: SimNode, puller: Puller, req_id: int) -> None:
        deadline = puller.deadline(req_id)
        if req_id in node.answered:
            self.answers.duplicate += 1
        elif deadline is None:
            self.answers.late += 1
        elif deadline - self.now <= RACE_S:
            self.answers.racing += 1
        node.answered.add(req_id)

    def _deliver_recovery(self, src: str, dst: str, msg: Message) -> None:
        if isinstance(msg, _ANSWERS):
            puller = self._recovering.get((dst, src))
            if puller is not None:
                self._handle_recovery(dst, src, puller.receive(msg, self.now))
        elif (src, dst) in self._recovering:
            node = self.nodes[dst]
            self._handle_responder(node, node.responder.receive((src, RECOVERY), msg, self.now))

    def _handle_recovery(self, source: str, replica: str, ready: Ready) -> None:
        for _link, msg in ready.sends:
            self._send(source, replica, RECOVERY, msg, reliable=False, to_puller=False)
        self._wake(source, f"recover:{replica}", ready.wake_at)

    def _handle_puller(self, node: SimNode, ready: Ready) -> None:
        for _link, msg in ready.sends:
            if node.name in self.cut:
                continue
            self._send(node.name, node.upstream, node.session, msg, reliable=False, to_puller=False)
        self._wake(node.name, "puller", ready.wake_at)
        # Applying rows moved this node's store: its own pullers may be waiting.
        self._handle_responder(node, node.responder.store_changed(self.now))

    def _handle_responder(self, node: SimNode, ready: Ready) -> None:
        for (puller_name, session), msg in ready.sends:
            if puller_name in self.cut:
                continue
            self._send(node.name, puller_name, session, msg, reliable=False, to_puller=True)
        self._wake(node.name, "responder", ready.wake_at)

    def _wake(self, name: str, role: str, at: float | None) -> None:
        if at is None:
            return
        key = f"{name}/{role}"
        if key in self._wakes and self._wakes[key] <= at and self._wakes[key] > self.now:
            return
        self._wakes[key] = at
        self._schedule(max(at, self.now), "tick", name, role)

    def _on_tick(self, name: str, role: str) -> None:
        key = f"{name}/{role}"
        if self._wakes.get(key, -1) > self.now:
            return
        self._wakes.pop(key, None)
        node = self.nodes[name]
        if role.startswith("recover:"):
            replica = role.split(":", 1)[1]
            puller = self._recovering.get((name, replica))
            if puller is not None:
                self._handle_recovery(name, replica, puller.tick(self.now))
        elif role == "responder":
            self._handle_responder(node, node.responder.tick(self.now))
        elif role == "release":
            if node.port is not None:
                node.port.release(self.now, int(self.now * 1e9))
                self._wake(name, "release", node.port.next_due())
        elif node.puller is not None:
            self._handle_puller(node, node.puller.tick(self.now))


def _describe(args: tuple) -> str:
    """An event's arguments for the trace: names, sessions, and of a message its kind, id
    and size (not its arrays)."""
    out = []
    for a in args:
        if isinstance(a, PullResponse):
            out.append(f"resp{a.req_id}:{sum(c.rows for c in a.chunks)}:{int(a.more)}")
        elif isinstance(a, (str, int, float)):
            out.append(repr(a))
        else:
            out.append(f"{type(a).__name__}{getattr(a, 'req_id', '')}")
    return ",".join(out)
