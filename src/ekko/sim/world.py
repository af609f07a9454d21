"""One seed's run: a ``SimNetwork`` built from its scenario, writes and faults on the
simulated clock, then writes stop, every fault heals, and the cluster settles.

Why a class apart from the scenario: the scenario says what may happen; the world does it and
remembers what it did (the action log ``--replay -v`` prints, the features the coverage
counts), and the copies of each node's disk a restart comes back on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ekko.protocol.testing import Faults, SimNetwork
from ekko.schedule.scheduler import UpdateScheduler
from ekko.sim.check import Difference, overclaims
from ekko.sim.scenario import SOURCE, Scenario, TablePlan
from ekko.store import DEFAULT_MAX_ABS, Store, Table

SETTLE_STEP_S = 0.25
SETTLE_LIMIT_S = 60.0  # simulated seconds the healed cluster gets to converge
STALL_S = 10.0  # no store moved for this long, unconverged: it never will (every timeout
# a scenario draws is far shorter)
RECOVERY_TIMEOUT_S = 30.0
CHECK_CHANCE = 0.1  # of a step: check no replica's knowledge runs ahead of its rows


class World:
    """The simulated cluster of one scenario and everything done to it."""

    def __init__(self, scenario: Scenario, log: Callable[[str], None] | None = None) -> None:
        self.sc = sc = scenario
        self._log = log
        self.actions = sc.rng("actions")
        self.values = np.random.default_rng([sc.seed, 1])
        self.features: Counter[str] = Counter()
        self.source_restarts = 0
        self.created = {t.spec.name for t in sc.tables if not t.late}  # at the source
        self.net = SimNetwork(
            seed=sc.seed,
            faults=Faults(drop=sc.drop, duplicate=sc.duplicate, delay=sc.delay),
            puller_config=sc.puller,
            responder_config=sc.responder,
            pace_bytes_per_s=sc.pace_bytes_per_s,
            purge_every_s=sc.purge_every_s,
        )
        source = self._source_store(Store(cache_capacity=sc.source_cache))
        source.lineage = self.actions.getrandbits(62) | 1  # a node's first start draws one
        self.net.add_node(SOURCE, source)
        self.net.attach_port(SOURCE, self._scheduler)
        self._watch_source()
        for i, link in enumerate(sc.links, start=1):
            config = replace(sc.puller, codec=link.codec)
            self.net.add_node(
                link.name,
                Store(origin=i, cache_capacity=link.cache),
                link.upstream,
                puller_config=config,
            )
            self.features[f"codec:{link.codec or 'plain'}"] += 1
        if sc.pace_bytes_per_s is not None:
            self.features["paced"] += 1
        # What each node's disk holds: the copy a restart comes back on. The source's is its
        # snapshot and log up to the last fsync; a replica's, a snapshot at some past moment.
        self.disks: dict[str, Store] = {n: self._copy(n) for n in self.net.nodes}
        self._full_scans = 0
        self.overclaim: tuple[float, list[Difference]] | None = None  # the first: when, what
        # Every chain of link codecs each replica's rows may have come down (failovers
        # change them): what the check's value tolerance allows.
        self.paths: dict[str, set[tuple[str | None, ...]]] = {r: set() for r in sc.replicas}
        self._record_paths()

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> None:
        """Writes and faults for the scenario's duration, then writes stop and all heals."""
        sc, rng, rates = self.sc, self.actions, self.sc.rates
        while self.net.now < sc.duration_s:
            if rng.random() < rates.write:
                self.write()
            roll = rng.random()
            for name, chance in (
                ("cut", rates.cut),
                ("one_way", rates.one_way),
                ("heal", rates.heal),
                ("failover", rates.failover),
                ("restart_replica", rates.restart_replica),
                ("restart_source", rates.restart_source),
                ("snapshot", rates.snapshot),
            ):
                if roll < chance:
                    getattr(self, name)()
                    break
                roll -= chance
            self.net.run_for(rng.uniform(0.0, 2 * sc.step_s))
            if rng.random() < CHECK_CHANCE:
                self.check_knowledge()
        self.heal_all()

    def check_knowledge(self) -> None:
        """Remember the first moment a replica's knowledge claimed rows it lacked."""
        if self.overclaim is not None:
            return
        found = overclaims({n: v.store for n, v in self.net.nodes.items()}, self.sc.replicas)
        if found:
            self._say(f"knowledge runs ahead of rows: {found[0]}")
            self.overclaim = (self.net.now, found)

    def write(self) -> None:
        """A trainer's step (its rows may be held), an HTTP write or delete, or a rollback's
        restore."""
        plan = self.actions.choice(self.sc.tables)
        port = self.net.nodes[SOURCE].port
        name = plan.spec.name
        if name not in self.created:
            self._say(f"create table {name}")
            port.create_table(plan.spec)
            self.created.add(name)
            self.features["table_created_late"] += 1
        roll = self.actions.random()
        hold = roll < self.sc.rates.hold
        n = self.actions.randint(1, 12)
        if hold:  # a trainer's rows: unique keys (the Sink's contract)
            keys = self.values.choice(plan.key_space, min(n, plan.key_space), replace=False)
        else:  # an HTTP write may name a key twice; the last one wins
            keys = self.values.integers(0, plan.key_space, n)
        keys = keys.astype(np.int64)
        values = _values(self.values, plan, keys.shape[0])
        if not hold and roll < self.sc.rates.hold + self.sc.rates.restore:
            self.features["restore"] += 1
            port.restore(name, keys, values, int(self.net.now * 1e9))
            return
        if not hold and self.sc.rates.delete and self.actions.random() < self.sc.rates.delete:
            self.features["delete"] += 1
            self.net.delete(SOURCE, name, keys)
            return
        self.net.write(SOURCE, name, keys, values, hold=hold)
        if hold and port.next_due() is not None:
            self.features["held"] += 1

    def cut(self) -> None:
        up = [r for r in self.sc.replicas if r not in self.net.cut]
        if up:
            name = self.actions.choice(up)
            self._say(f"cut {name}")
            self.net.cut_link(name)
            self.features["cut"] += 1

    def one_way(self) -> None:
        name = self.actions.choice(self.sc.replicas)
        pair = (name, self.net.nodes[name].upstream)
        if self.actions.random() < 0.5:
            pair = pair[::-1]
        self._say(f"one-way loss {pair[0]} -> {pair[1]}")
        self.net.block(*pair)
        self.features["one_way"] += 1

    def heal(self) -> None:
        broken = sorted(self.net.cut) + [f"{a}>{b}" for a, b in sorted(self.net.blocked)]
        if not broken:
            return
        which = self.actions.choice(broken)
        self._say(f"heal {which}")
        if ">" in which:
            self.net.unblock(*which.split(">"))
        else:
            self.net.heal_link(which)

    def failover(self) -> None:
        """A follower (not a leader) pulls from another candidate: the source or a leader."""
        nodes = self.net.nodes
        leaders = [lk.name for lk in self.sc.links if lk.upstream == SOURCE]
        movable = [r for r in self.sc.replicas if nodes[r].upstream != SOURCE]
        if not movable:
            return
        name = self.actions.choice(movable)
        to = self.actions.choice([SOURCE, *leaders])
        if to == nodes[name].upstream:
            return
        self._say(f"failover {name}: {nodes[name].upstream} -> {to}")
        self.net.move(name, to)
        self.features["failover"] += 1
        self._record_paths()

    def _record_paths(self) -> None:
        codec = {lk.name: lk.codec for lk in self.sc.links}
        for name in self.paths:
            path, at = [], name
            while at != SOURCE:
                path.append(codec[at])
                at = self.net.nodes[at].upstream
            self.paths[name].add(tuple(path[::-1]))

    def heal_all(self) -> None:
        """Writes stopped: every link heals, held rows are written, messages no longer drop
        (they are still delayed, reordered and duplicated)."""
        self._say("writes stop; heal everything")
        for a, b in sorted(self.net.blocked):
            self.net.unblock(a, b)
        for name in sorted(self.net.cut):
            self.net.heal_link(name)
        self.net.faults = Faults(duplicate=self.sc.duplicate, delay=self.sc.delay)
        held = self.net.flush_held(SOURCE)
        if held:
            self._say(f"released {held} held rows")

    def settle(self, converged: Callable[[], bool]) -> str | None:
        """Run until ``converged()`` (checked every ``SETTLE_STEP_S``), then a little more.
        Returns why it did not converge: ``SETTLE_LIMIT_S`` passed, or no store moved for
        ``STALL_S``; None when it did."""
        end = self.net.now + SETTLE_LIMIT_S
        last, since = self._fingerprint(), self.net.now
        while not converged():
            if self.net.now >= end:
                return f"no convergence within {SETTLE_LIMIT_S:.0f} s after the heal"
            if self.net.now - since >= STALL_S:
                return f"no convergence: nothing moved for {STALL_S:.0f} s after the heal"
            self.net.run_for(SETTLE_STEP_S)
            now = self._fingerprint()
            if now != last:
                last, since = now, self.net.now
        self.net.run_for(0.5)  # answers still in flight land: still equal after?
        return None

    def _fingerprint(self) -> tuple:
        return tuple(
            (n.store.lineage, tuple(n.store.digests().items()),
             tuple(int(t.knowledge.sum()) for t in n.store.tables.values()))
            for n in self.net.nodes.values()
        )  # fmt: skip

    def restart_replica(self) -> None:
        name = self.actions.choice(self.sc.replicas)
        node = self.net.nodes[name]
        kind = self.actions.choice(("disk", "old", "empty"))
        if kind == "disk":
            store = node.store.copy()
        elif kind == "old":
            store = self.disks[name].copy()
        else:
            store = Store(origin=node.store.origin, cache_capacity=node.store.cache_capacity)
        self._count_full_scans(node.store)
        self._say(f"restart {name} on {kind} store")
        self.features[f"restart:replica-{kind}"] += 1
        self.net.restart_node(name, store)

    def restart_source(self) -> None:
        """The source restarts on its disk (snapshot and log to the last fsync: the later
        tail is lost) or on nothing, creates the tables it has been asked for (as a node's
        trainers do at start), and recovers from the replicas it can reach."""
        node = self.net.nodes[SOURCE]
        with_disk = self.actions.random() < 0.5
        if with_disk:
            store = self._source_store(self.disks[SOURCE].copy())
        else:
            store = self._source_store(Store(cache_capacity=self.sc.source_cache))
        unreachable = frozenset(
            self.net.cut | {a for a, _ in self.net.blocked} | {b for _, b in self.net.blocked}
        ) - {SOURCE}
        self._count_full_scans(node.store)
        self._say(
            f"restart source {'on its disk' if with_disk else 'without its disk'}"
            f" (unreachable: {sorted(unreachable) or 'none'})"
        )
        self.features[f"restart:source-{'disk' if with_disk else 'empty'}"] += 1
        result = self.net.restart_source(
            SOURCE, store, unreachable=unreachable, timeout=RECOVERY_TIMEOUT_S
        )
        self.source_restarts += 1
        self._say(
            f"  recovered: lineage {'kept' if result.kept_lineage else 'new'}, "
            f"{result.rows_absorbed} rows absorbed, missing {result.missing}"
        )
        if not result.kept_lineage:
            self.features["lineage_change"] += 1
        self._watch_source()
        self.disks[SOURCE] = self._copy(SOURCE)  # the recovered store is on disk

    def snapshot(self) -> None:
        name = self.actions.choice(sorted(self.net.nodes))
        self.disks[name] = self._copy(name)

    # -- bookkeeping ----------------------------------------------------------------------

    def finish_features(self) -> Counter[str]:
        """The features this run exercised (each counted once per seed by the caller)."""
        for node in self.net.nodes.values():
            self._count_full_scans(node.store)
            if node.puller is not None:
                stats = node.puller.statistics()
                if stats.gaps:
                    self.features["gap"] += 1
                if stats.timeouts:
                    self.features["timeout"] += 1
            if node.puller is not None and node.puller.rebuilds:
                self.features["rebuild"] += 1
        if self._full_scans:
            self.features["full_scan"] += self._full_scans
        if self.net.purged:
            self.features["purged"] += self.net.purged
        reconciled = sum(
            n.responder.statistics().reconciled_shards for n in self.net.nodes.values()
        )
        if reconciled:
            self.features["reconcile"] += reconciled
        a = self.net.answers
        for name, n in (("late_answer", a.late), ("racing_answer", a.racing)):
            if n:
                self.features[name] += n
        if a.duplicate:
            self.features["duplicate_answer"] += a.duplicate
        if self.net.messages_dropped:
            self.features["dropped"] += self.net.messages_dropped
        return self.features

    def _count_full_scans(self, store: Store) -> None:
        self._full_scans += sum(t.statistics().full_scans for t in store.tables.values())

    def _scheduler(self) -> UpdateScheduler | None:
        return None if self.sc.scheduler is None else UpdateScheduler(self.sc.scheduler)

    def _source_store(self, store: Store) -> Store:
        """``store`` with the tables the source's config names (those created so far)."""
        for plan in self.sc.tables:
            if plan.spec.name in self.created:
                store.create_table(plan.spec)
        return store

    def _watch_source(self) -> None:
        """Count the lanes the source writes rows in (its write hook sees every write)."""

        def hook(t: Table, keys: np.ndarray, _v, versions: np.ndarray, _now, lanes) -> None:
            for lane in np.unique(lanes).tolist():
                self.features[f"lane:{lane}"] += 1

        self.net.watch_writes(SOURCE, hook)

    def _copy(self, name: str) -> Store:
        return self.net.save_disk(name)

    def _say(self, what: str) -> None:
        if self._log is not None:
            self._log(f"{self.net.now:9.4f}s  {what}")


def _values(rng: np.random.Generator, plan: TablePlan, n: int) -> np.ndarray:
    dim = plan.spec.dim
    style = plan.style
    if style == "constant":  # a row of one value: the affine codecs' zero step
        v = np.repeat(rng.normal(0.0, 3.0, (n, 1)), dim, axis=1)
    elif style == "tiny":
        v = rng.normal(0.0, 1e-6, (n, dim))
    elif style == "large":
        v = rng.uniform(-DEFAULT_MAX_ABS, DEFAULT_MAX_ABS, (n, dim))
    elif style == "integer":
        v = rng.integers(-3, 4, (n, dim)).astype(np.float64)
    else:
        v = rng.normal(0.0, 1.0, (n, dim))
    return v.astype(np.float32)
