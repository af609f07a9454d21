"""A seeded, simulated network and clock for driving the sans-IO protocol.

Links delay, drop, duplicate and reorder messages, can be cut and healed, and can lose every
message one way; nodes restart on what their disk kept (a replica too, on an old copy or on
nothing); a source may write through its ``WritePort`` (scheduler lanes, held rows released
on the simulated clock). Time is a number the simulation advances, and every choice comes
from one seeded generator, so a run is a function of its seed (``trace_hash`` tells). Tests
use it to check that replicas converge to the source whatever the network does (DESIGN.md
§3), ``ekko sim`` runs it over thousands of drawn scenarios, and it can run cluster sizes a
2-core machine cannot hold as processes. Its event loop is ``sim_events``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.protocol.puller import LINK, Puller, PullerConfig
from ekko.protocol.recovery import RecoveryResult, SourceRecovery
from ekko.protocol.responder import Responder, ResponderConfig
from ekko.protocol.sim_events import RECOVERY, SimEvents
from ekko.schedule.scheduler import UpdateScheduler
from ekko.schedule.write_port import WritePort
from ekko.store import Store, Table
from ekko.store.settled import Mark
from ekko.store.table_records import WriteHook

SchedulerFactory = Callable[[], UpdateScheduler | None]


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
    puller_config: PullerConfig | None = None  # this link's, else the network's
    port: WritePort | None = None  # a source writing through its write port
    scheduler: SchedulerFactory | None = None  # the port's scheduler, anew at each restart
    answered: set[int] = field(default_factory=set)  # this session's answered pulls
    # A source's process and log: its epoch, writes logged, writes on disk (``save_disk``).
    epoch: int = 0
    written: int = 0
    durable: int = 0
    watch: WriteHook | None = None  # called after each write, as the log is


@dataclass
class AnswerTally:
    """How answers met their pulls: after the pull timed out (``late``), within
    ``sim_events.RACE_S`` before it would have (``racing``), or again (``duplicate``)."""

    late: int = 0
    racing: int = 0
    duplicate: int = 0


class SimNetwork(SimEvents):
    """Nodes with stores, links between puller and upstream, one simulated clock."""

    def __init__(
        self,
        seed: int = 0,
        faults: Faults | None = None,
        puller_config: PullerConfig | None = None,
        responder_config: ResponderConfig | None = None,
        pace_bytes_per_s: float | None = None,
        purge_every_s: float | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        # Sources purge tombstones every holder has this often (None: never).
        self.purge_every_s = purge_every_s
        self.purged = 0
        self.pace_bytes_per_s = pace_bytes_per_s  # every link paced at this rate, if set
        self.faults = faults or Faults()
        self.puller_config = puller_config or PullerConfig(wait_ms=200, window=4)
        self.responder_config = responder_config or ResponderConfig()
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.cut: set[str] = set()  # pullers whose upstream link is down
        self._init_events()
        self._recovering: dict[tuple[str, str], Puller] = {}  # (source, replica) -> puller
        self.blocked: set[tuple[str, str]] = set()  # (from, to): every message that way lost
        self.messages_sent = self.messages_dropped = 0
        self.answers = AnswerTally()

    # -- building -----------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        store: Store,
        upstream: str | None = None,
        *,
        puller_config: PullerConfig | None = None,
    ) -> SimNode:
        """Add node ``name`` serving ``store``, pulling from ``upstream`` (with
        ``puller_config``, e.g. its link's codec, else the network's)."""
        node = SimNode(
            name,
            store,
            Responder(store, self.responder_config),
            upstream,
            puller_config=puller_config,
        )
        self.nodes[name] = node
        if upstream is not None:
            self._connect(node)
        else:
            self._log_writes(node)
            if self.purge_every_s is not None:
                self._schedule(self.now + self.purge_every_s, "purge", name)
        return node

    def _log_writes(self, node: SimNode) -> None:
        """A source process starts: a new epoch, its log counted from nothing; each answer
        carries its mark (``ekko.store.settled``)."""
        node.epoch = self.rng.getrandbits(62) | 1
        node.written = node.durable = 0

        def logged(*args: Any) -> None:
            node.written += 1
            if node.watch is not None:
                node.watch(*args)

        def logged_delete(*args: Any) -> None:
            node.written += 1

        node.store.set_write_hook(logged)
        node.store.set_delete_hook(logged_delete)
        node.store.mark_source = lambda: Mark(node.epoch, node.written, node.durable)

    def watch_writes(self, name: str, hook: WriteHook | None) -> None:
        """Call ``hook`` after each write at source ``name`` (its log's hook), across
        restarts."""
        self.nodes[name].watch = hook

    def save_disk(self, name: str) -> Store:
        """What ``name``'s disk holds now (a copy); for a source, its log is fsynced to here:
        answers' marks say so from now on."""
        node = self.nodes[name]
        node.durable = node.written
        return node.store.copy()

    def attach_port(self, name: str, scheduler: SchedulerFactory | None = None) -> WritePort:
        """``name`` (a source) writes through a ``WritePort`` with ``scheduler()``'s
        scheduler (made anew when the source restarts: held rows die with the process)."""
        node = self.nodes[name]
        node.scheduler = scheduler
        node.port = WritePort(
            node.store,
            None if scheduler is None else scheduler(),
            on_written=lambda: self._handle_responder(node, node.responder.store_changed(self.now)),
        )
        return node.port

    def _connect(self, node: SimNode) -> None:
        node.session += 1
        node.answered.clear()
        node.puller = Puller(
            node.store,
            node.puller_config or self.puller_config,
            floors=lambda now: node.responder.floors.all_lowest(node.store, now),
        )
        if self.pace_bytes_per_s is not None:
            upstream = self.nodes[node.upstream].responder
            upstream.pace((node.name, node.session), self.pace_bytes_per_s, self.now)
        self._handle_puller(node, node.puller.start(self.now))

    # -- faults -------------------------------------------------------------------------

    def cut_link(self, name: str) -> None:
        """Break ``name``'s upstream connection: in-flight messages are lost with it."""
        node = self.nodes[name]
        self.cut.add(name)
        self.nodes[node.upstream].responder.close_session((name, node.session), self.now)
        node.session += 1
        node.puller = None

    def heal_link(self, name: str) -> None:
        self.cut.discard(name)
        self._connect(self.nodes[name])

    def move(self, name: str, upstream: str) -> None:
        """Point ``name``'s pulls at ``upstream`` (a failover): its session with the old
        upstream ends, cut or not, and one with the new upstream starts."""
        node = self.nodes[name]
        if name not in self.cut:
            self.cut_link(name)
        node.upstream = upstream
        self.heal_link(name)

    def block(self, sender: str, receiver: str) -> None:
        """Lose every message ``sender`` sends ``receiver`` from now on (one-way loss: the
        other way still delivers, so neither end sees the link break)."""
        self.blocked.add((sender, receiver))

    def unblock(self, sender: str, receiver: str) -> None:
        self.blocked.discard((sender, receiver))

    def restart_node(self, name: str, store: Store) -> None:
        """Restart replica ``name`` on ``store``: what its disk kept, an older copy of it, or
        an empty store. Its followers' sessions and its own pull link break with the old
        process and reconnect to the new one (links cut before stay cut)."""
        node = self.nodes[name]
        downstream = [
            n.name for n in self.nodes.values() if n.upstream == name and n.name not in self.cut
        ]
        for d in downstream:
            self.cut_link(d)
        pulling = node.upstream is not None and name not in self.cut
        if pulling:
            self.cut_link(name)
        node.store = store
        node.responder = Responder(store, self.responder_config)
        if pulling:
            self.heal_link(name)
        for d in downstream:
            self.heal_link(d)

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
        self._log_writes(node)
        recovery = SourceRecovery(
            store, [n for n in self.nodes if n != name], lineages=self._new_lineage
        )
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
        node.durable = node.written  # the recovered store is on disk before it serves
        if node.port is not None:
            self.attach_port(name, node.scheduler)  # writes resume once recovery is done
        for d in downstream:
            if d not in unreachable:
                self.heal_link(d)
        return result

    def _new_lineage(self) -> int:
        return self.rng.getrandbits(62) | 1  # as ``recovery.new_lineage``, but seeded

    # -- driving ------------------------------------------------------------------------

    def write(self, name: str, table: str, keys, values, lanes=0, *, hold: bool = False) -> None:
        """Write rows at ``name``: through its write port if it has one (the scheduler picks
        the lanes and, with ``hold``, may hold rows until their release), else straight
        into its table in ``lanes``."""
        node = self.nodes[name]
        now_ns = int(self.now * 1e9)
        if node.port is None:
            node.store.table(table).write(keys, values, now_ns=now_ns, lanes=lanes)
            self._handle_responder(node, node.responder.store_changed(self.now))
            return
        node.port.write_rows(table, keys, values, now=self.now, now_ns=now_ns, hold=hold)
        self._wake(name, "release", node.port.next_due())

    def delete(self, name: str, table: str, keys) -> np.ndarray:
        """Delete ``keys`` at ``name``: through its write port if it has one, else straight
        from its table; returns the versions."""
        node = self.nodes[name]
        now_ns = int(self.now * 1e9)
        if node.port is not None:
            return node.port.delete(table, keys, now_ns)
        versions = node.store.table(table).delete(keys, now_ns=now_ns)
        self._handle_responder(node, node.responder.store_changed(self.now))
        return versions

    def flush_held(self, name: str) -> int:
        """Write every row ``name``'s scheduler holds now; returns how many."""
        port = self.nodes[name].port
        return 0 if port is None else port.flush(int(self.now * 1e9))


def rows_by_key(table: Table) -> tuple[np.ndarray, ...]:
    """Copies of every slot's (keys, values, versions, wtimes, lanes, dead), tombstones
    included, sorted by key: what a replica must hold row for row. ``Table.digest`` covers
    the live rows' keys, versions and values but not lanes or tombstones, so only this shows
    a row stored in the wrong lane or a delete that did not arrive."""
    columns = table.all_slots()
    order = np.argsort(columns[0], kind="stable")
    return tuple(c[order] for c in columns)


__all__ = ["LINK", "AnswerTally", "Faults", "SimNetwork", "SimNode", "rows_by_key"]
