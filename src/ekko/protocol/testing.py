"""A seeded, simulated network and clock for driving the sans-IO protocol.

Links delay, drop, duplicate and reorder messages, and can be cut and healed; time is a
number the simulation advances. Tests use it to check that replicas converge to the source
whatever the network does (DESIGN.md §3), and it can run cluster sizes a 2-core machine
cannot hold as processes.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import numpy as np

from ekko.protocol.messages import Catalog, Error, Message, PullResponse
from ekko.protocol.puller import LINK, Puller, PullerConfig
from ekko.protocol.ready import Ready
from ekko.protocol.recovery import RecoveryResult, SourceRecovery
from ekko.protocol.responder import Responder, ResponderConfig
from ekko.store import Store, Table

RECOVERY = -1  # the session tag of a restarting source's pulls from a replica
_ANSWERS = (PullResponse, Catalog, Error)


@dataclass
class Faults:
    """Per-message fault probabilities and delay range (seconds) of a link."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: tuple[float, float] = (0.001, 0.005)  # uniform: different delays reorder


@dataclass
class SimNode:
    name: str
    store: Store
    responder: Responder
    upstream: str | None = None
    puller: Puller | None = None
    session: int = 0  # bumps on every (re)connection so stale messages are told apart


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    args: tuple = field(compare=False, default=())


class SimNetwork:
    """Nodes with stores, links between puller and upstream, one simulated clock."""

    def __init__(
        self,
        seed: int = 0,
        faults: Faults | None = None,
        puller_config: PullerConfig | None = None,
        responder_config: ResponderConfig | None = None,
        pace_bytes_per_s: float | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.pace_bytes_per_s = pace_bytes_per_s  # every link paced at this rate, if set
        self.faults = faults or Faults()
        self.puller_config = puller_config or PullerConfig(wait_ms=200, window=4)
        self.responder_config = responder_config or ResponderConfig()
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.cut: set[str] = set()  # pullers whose upstream link is down
        self._events: list[_Event] = []
        self._seq = itertools.count()
        self._wakes: dict[str, float] = {}
        self._recovering: dict[tuple[str, str], Puller] = {}  # (source, replica) -> puller
        self.messages_sent = self.messages_dropped = 0

    # -- building -----------------------------------------------------------------------

    def add_node(self, name: str, store: Store, upstream: str | None = None) -> SimNode:
        node = SimNode(name, store, Responder(store, self.responder_config), upstream)
        self.nodes[name] = node
        if upstream is not None:
            self._connect(node)
        return node

    def _connect(self, node: SimNode) -> None:
        node.session += 1
        node.puller = Puller(node.store, self.puller_config)
        if self.pace_bytes_per_s is not None:
            upstream = self.nodes[node.upstream].responder
            upstream.pace((node.name, node.session), self.pace_bytes_per_s, self.now)
        self._handle_puller(node, node.puller.start(self.now))

    # -- faults -------------------------------------------------------------------------

    def cut_link(self, name: str) -> None:
        """Break ``name``'s upstream connection: in-flight messages are lost with it."""
        node = self.nodes[name]
        self.cut.add(name)
        self.nodes[node.upstream].responder.close_session((name, node.session))
        node.session += 1
        node.puller = None

    def heal_link(self, name: str) -> None:
        self.cut.discard(name)
        self._connect(self.nodes[name])

    def restart_source(
        self,
        name: str,
        store: Store,
        *,
        unreachable: frozenset[str] = frozenset(),
        timeout: float = 30.0,
    ) -> RecoveryResult:
        """Restart node ``name`` (the source) on ``store`` — what its data dir kept, or an
        empty store — and run its recovery: pull from every replica but ``unreachable``,
        then decide the lineage. Links from its pullers break and reconnect after."""
        node = self.nodes[name]
        downstream = [n.name for n in self.nodes.values() if n.upstream == name]
        for d in downstream:
            if d not in self.cut:
                self.cut_link(d)
        node.store = store
        node.responder = Responder(store, self.responder_config)
        recovery = SourceRecovery(store, [n for n in self.nodes if n != name])
        for r, puller in recovery.pullers.items():
            if r in unreachable:
                recovery.give_up(r, "unreachable")
                continue
            self._recovering[(name, r)] = puller
            self._handle_recovery(name, r, puller.start(self.now))
        end = self.now + timeout
        while not recovery.done() and self.now < end:
            self.run_for(0.01)
        for r in recovery.pullers:
            if self._recovering.pop((name, r), None) is not None:
                self.nodes[r].responder.close_session((name, RECOVERY))
        result = recovery.finish()
        for d in downstream:
            if d not in unreachable:
                self.heal_link(d)
        return result

    # -- driving ------------------------------------------------------------------------

    def write(self, name: str, table: str, keys, values, lanes=0) -> None:
        node = self.nodes[name]
        node.store.table(table).write(keys, values, now_ns=int(self.now * 1e9), lanes=lanes)
        self._handle_responder(node, node.responder.store_changed(self.now))

    def run_until(self, t: float) -> None:
        while self._events and self._events[0].at <= t:
            ev = heapq.heappop(self._events)
            self.now = ev.at
            getattr(self, f"_on_{ev.kind}")(*ev.args)
        self.now = max(self.now, t)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- internals ----------------------------------------------------------------------

    def _schedule(self, at: float, kind: str, *args: object) -> None:
        heapq.heappush(self._events, _Event(at, next(self._seq), kind, args))

    def _send(self, src: str, dst: str, session: int, msg: Message, reliable: bool) -> None:
        self.messages_sent += 1
        f = self.faults
        copies = 1
        if not reliable:
            if self.rng.random() < f.drop:
                self.messages_dropped += 1
                return
            if self.rng.random() < f.duplicate:
                copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(*f.delay)
            self._schedule(self.now + delay, "deliver", src, dst, session, msg)

    def _on_deliver(self, src: str, dst: str, session: int, msg: Message) -> None:
        if session == RECOVERY:
            self._deliver_recovery(src, dst, msg)
            return
        # Puller → responder messages are tagged with the puller's session; responses too.
        if dst in self.nodes and self.nodes[dst].upstream == src:
            node = self.nodes[dst]  # a response to a puller
            if node.puller is None or session != node.session:
                return
            self._handle_puller(node, node.puller.receive(msg, self.now))
        else:
            puller_node = self.nodes[src]
            if src in self.cut or session != puller_node.session:
                return
            node = self.nodes[dst]
            self._handle_responder(node, node.responder.receive((src, session), msg, self.now))

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
            self._send(source, replica, RECOVERY, msg, reliable=False)
        self._wake(source, f"recover:{replica}", ready.wake_at)

    def _handle_puller(self, node: SimNode, ready: Ready) -> None:
        for _link, msg in ready.sends:
            if node.name in self.cut:
                continue
            self._send(node.name, node.upstream, node.session, msg, reliable=False)
        self._wake(node.name, "puller", ready.wake_at)
        # Applying rows moved this node's store: its own pullers may be waiting.
        self._handle_responder(node, node.responder.store_changed(self.now))

    def _handle_responder(self, node: SimNode, ready: Ready) -> None:
        for (puller_name, session), msg in ready.sends:
            if puller_name in self.cut:
                continue
            self._send(node.name, puller_name, session, msg, reliable=False)
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
        elif node.puller is not None:
            self._handle_puller(node, node.puller.tick(self.now))


def rows_by_key(table: Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copies of every row's (keys, values, versions, wtimes, lanes), sorted by key: what a
    replica must hold row for row. ``Table.digest`` covers keys, versions and values but not
    lanes, so only this shows a row stored in the wrong lane."""
    keys, values, versions, wtimes, lanes = table.all_rows()
    order = np.argsort(keys, kind="stable")
    return keys[order], values[order], versions[order], wtimes[order], lanes[order]


__all__ = ["LINK", "Faults", "SimNetwork", "SimNode", "rows_by_key"]
