"""A simulated cluster and its trouble, drawn from a seed alone.

Why a seed and nothing else: a failure found in the ten-thousandth run must come back exactly
on a laptop (``ekko sim --replay SEED``). Every choice here comes from ``random.Random(seed)``
(no wall clock, no global generator), and the run's own choices (which key, which fault,
when) from generators seeded from it (``Scenario.rng``).

Rare events are drawn often on purpose: caches of one entry and byte budgets of one row force
the responder's full-scan and truncation paths, pull timeouts near a round trip make answers
race their timeouts, and every codec, lane, scheduler switch and restart kind has a fair
share of seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ekko.codec import CODECS
from ekko.protocol.puller import PullerConfig
from ekko.protocol.responder import ResponderConfig
from ekko.schedule.scheduler import SchedulerConfig
from ekko.store.spec import LANES, TableSpec

SOURCE = "source"
VALUE_STYLES = ("normal", "tiny", "large", "constant", "integer")
RESTART_KINDS = ("replica-disk", "replica-old", "replica-empty", "source-disk", "source-empty")
LINK_CODECS: tuple[str | None, ...] = (None, *CODECS)  # None: plain float32 arrays


@dataclass(frozen=True)
class Link:
    """Replica ``name`` pulls from ``upstream`` with row codec ``codec``: the codec belongs to
    the puller (as a node's ``wan_codec``/``lan_codec``), so it stays with a failover."""

    name: str
    upstream: str
    codec: str | None
    cache: int  # the replica store's update cache per shard


@dataclass(frozen=True)
class TablePlan:
    """A table and how it is written: a small key space makes rewrites (and so coalescing
    and deferral) common, a large one makes new keys (the new-key lane) common."""

    spec: TableSpec
    key_space: int
    style: str  # how its values are drawn (VALUE_STYLES)
    late: bool  # created at its first write, not at start: sessions learn it mid-way


@dataclass(frozen=True)
class Rates:
    """Per-step chances of each action while writes run (a step is ``step_s`` on average);
    drawn per seed, so some seeds are calm and some a storm of faults."""

    write: float
    hold: float  # of writes: a trainer's (the scheduler may hold rows), else an HTTP write
    restore: float  # of writes: a rollback's restore (past the scheduler, ends holds)
    cut: float
    one_way: float
    heal: float
    failover: float  # a follower pulls from another candidate (the source or a leader)
    restart_replica: float
    restart_source: float
    snapshot: float
    # of HTTP writes: a delete of their keys instead (drawn last: a seed draws every other
    # choice as it did before deletes)
    delete: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """Everything one seed's run does, but the run's own random choices: frozen and printable
    (``compact``), so a failure says what was run and a replay runs the same."""

    seed: int
    tables: tuple[TablePlan, ...]
    links: tuple[Link, ...]
    source_cache: int
    puller: PullerConfig  # every link's, but its codec (``Link.codec``)
    responder: ResponderConfig
    scheduler: SchedulerConfig | None  # None: a write port with no scheduler
    pace_bytes_per_s: float | None  # every link paced at this rate (None: unpaced)
    drop: float
    duplicate: float
    delay: tuple[float, float]  # seconds, uniform
    duration_s: float
    step_s: float
    rates: Rates
    # Tombstone purge at the source every this many seconds (None: never), holders counted
    # for ``responder.holder_horizon_s`` after their last floors: shorter than a cut, so a
    # replica sleeps through purges and must reconcile.
    purge_every_s: float | None = None

    @property
    def replicas(self) -> list[str]:
        return [link.name for link in self.links]

    def rng(self, purpose: str) -> random.Random:
        """A generator for one purpose of this seed's run (a str seed is hashed by sha512,
        not by Python's per-process string hash)."""
        return random.Random(f"{self.seed}/{purpose}")

    def compact(self) -> str:
        """One line a person can read: topology, codecs, configs, faults."""
        tables = ",".join(
            f"{t.spec.name}:{t.spec.dim}x{t.spec.num_shards}/k{t.key_space}/{t.style}"
            + ("/late" if t.late else "")
            for t in self.tables
        )
        topo = " ".join(
            f"{lk.upstream}->{lk.name}[{lk.codec or 'plain'},c{lk.cache}]" for lk in self.links
        )
        p, r = self.puller, self.responder
        pull = (
            f"pull(wait={p.wait_ms},win={p.window},to={p.request_timeout_ms},"
            f"gap={p.gap_timeout_ms},max={p.max_bytes},poll={p.poll_interval_ms})"
        )
        resp = (
            f"resp(sv={int(r.use_shard_version)},cache={int(r.use_cache)},"
            f"lp={int(r.long_poll)},maxwait={r.max_wait_ms},park={r.max_parked_per_session})"
        )
        s = self.scheduler
        sched = (
            "sched(none)"
            if s is None
            else f"sched(on={int(s.enabled)},q={s.percentile},defer={int(s.defer)},"
            f"sig={s.defer_min_significance},stale={s.max_staleness_s},rel={s.release_lane},"
            f"hot={int(s.hot_keys)},drift={int(s.accumulate_drift)})"
        )
        pace = "" if self.pace_bytes_per_s is None else f" paced={self.pace_bytes_per_s:.0f}B/s"
        faults = (
            f"faults(drop={self.drop},dup={self.duplicate},"
            f"delay={self.delay[0] * 1e3:.0f}-{self.delay[1] * 1e3:.0f}ms)"
        )
        rt = self.rates
        acts = (
            f"rates(cut={rt.cut},1way={rt.one_way},rr={rt.restart_replica},rs={rt.restart_source},"
            f"del={rt.delete})"
        )
        purge = (
            ""
            if self.purge_every_s is None
            else f" purge(every={self.purge_every_s}s,horizon={self.responder.holder_horizon_s}s,"
            f"report={self.puller.floor_report_ms}ms)"
        )
        return (
            f"seed={self.seed} tables={tables} source[c{self.source_cache}] {topo} {pull} {resp} "
            f"{sched}{pace} {faults} {acts}{purge} dur={self.duration_s}s"
            f" step={self.step_s * 1e3:.0f}ms"
        )


def draw_scenario(seed: int) -> Scenario:
    """The scenario of ``seed``; the same seed gives the same scenario in any process."""
    rng = random.Random(seed)
    tables = tuple(_table(rng, i) for i in range(rng.choice((1, 1, 2, 3))))
    links = _topology(rng)
    delay_lo = rng.choice((0.0005, 0.001, 0.005))
    delay_hi = delay_lo + rng.choice((0.0, 0.002, 0.01, 0.04))
    intensity = rng.choice((0.0, 0.5, 1.0, 2.0))
    scenario = Scenario(
        seed=seed,
        tables=tables,
        links=links,
        source_cache=_cache(rng),
        puller=_puller(rng, delay_hi),
        responder=ResponderConfig(
            use_shard_version=rng.random() > 0.15,
            use_cache=rng.random() > 0.15,
            long_poll=rng.random() > 0.15,
            # Rarer: a window wider than the parking (or a wait this short) turns long-poll
            # into a poll at the round-trip rate, a run of many events.
            max_wait_ms=rng.choice((5, 50, 50, 30_000, 30_000, 30_000, 30_000, 30_000)),
            max_parked_per_session=rng.choice((1, 2, 256, 256, 256, 256, 256, 256)),
        ),
        scheduler=_scheduler(rng),
        pace_bytes_per_s=rng.choice((None, None, None, 20_000.0, 200_000.0)),
        drop=rng.choice((0.0, 0.02, 0.1, 0.25)),
        duplicate=rng.choice((0.0, 0.05, 0.2, 0.5)),
        delay=(delay_lo, delay_hi),
        duration_s=rng.choice((0.5, 1.0, 1.5)),
        step_s=rng.choice((0.01, 0.02, 0.05)),
        rates=Rates(
            write=rng.choice((0.5, 0.8, 1.0)),
            hold=rng.random(),
            restore=rng.choice((0.0, 0.05)),
            cut=0.04 * intensity,
            one_way=0.03 * intensity,
            heal=0.1,
            failover=0.03 * intensity,
            restart_replica=0.03 * intensity,
            restart_source=0.015 * intensity,
            snapshot=0.1,
            delete=rng.choice((0.0, 0.15, 0.4)),
        ),
    )
    # Drawn last: a seed draws every other choice as it did before purges.
    purge = rng.choice((None, 0.02, 0.1))
    if purge is None:
        return scenario
    return replace(
        scenario,
        purge_every_s=purge,
        responder=replace(scenario.responder, holder_horizon_s=rng.choice((0.05, 0.3, 5.0))),
        puller=replace(scenario.puller, floor_report_ms=rng.choice((5, 20, 100))),
    )


def _table(rng: random.Random, i: int) -> TablePlan:
    spec = TableSpec(f"t{i}", rng.choice((1, 2, 3, 4, 8, 16)), rng.choice((1, 2, 4, 8)))
    return TablePlan(
        spec, rng.choice((4, 30, 200)), rng.choice(VALUE_STYLES), late=i > 0 and rng.random() < 0.5
    )


def _cache(rng: random.Random) -> int:
    return rng.choice((1, 2, 4, 64))


def _topology(rng: random.Random) -> tuple[Link, ...]:
    """source → leaders → followers (sometimes a third tier), a codec drawn per link."""
    links: list[Link] = []

    def add(upstream: str) -> str:
        name = f"r{len(links) + 1}"
        links.append(Link(name, upstream, rng.choice(LINK_CODECS), _cache(rng)))
        return name

    for _ in range(rng.choice((1, 2, 3))):
        leader = add(SOURCE)
        for _ in range(rng.choice((0, 1, 2))):
            follower = add(leader)
            if rng.random() < 0.2:
                add(follower)
    return tuple(links)


def _puller(rng: random.Random, delay_hi: float) -> PullerConfig:
    """Pull timeouts near a round trip are common: an answer then races its timeout."""
    rtt_ms = max(1, round(2 * delay_hi * 1000))
    wait_ms = rng.choice((0, 20, 100, 500))
    return PullerConfig(
        max_bytes=rng.choice((1, 64, 300, 2000, 1 << 20)),
        wait_ms=wait_ms,
        window=rng.choice((1, 2, 3, 4)),
        poll_interval_ms=rng.choice((20, 50)),
        request_timeout_ms=rng.choice((rtt_ms, rtt_ms, max(1, rtt_ms // 2), rtt_ms * 2, 1000)),
        gap_timeout_ms=rng.choice((5, 50, 200)),
    )


def _scheduler(rng: random.Random) -> SchedulerConfig | None:
    if rng.random() < 0.1:
        return None
    return SchedulerConfig(
        enabled=rng.random() > 0.15,
        percentile=rng.choice((0.1, 0.5, 0.9)),
        freshness_boost=rng.choice((0.0, 10.0)),
        defer=rng.random() < 0.6,
        defer_min_significance=rng.choice((0.05, 0.5, 5.0)),
        max_staleness_s=rng.choice((0.0, 0.02, 0.1, 0.5)),
        release_lane=rng.choice(LANES),
        half_life_rows=rng.choice((4.0, 64.0, 200_000.0)),
        significance_half_life_rows=rng.choice((8.0, 1000.0)),
        sample_rows=rng.choice((1, 4, 4096)),
        significance_scope=rng.choice(("table", "model")),
        seed=rng.randrange(2**31),
        hot_keys=rng.random() < 0.3,
        accumulate_drift=rng.random() < 0.4,
    )
