"""Ekko as a system under test in the trace benches: the real sync protocol over real sockets.

The source replays the trace through its write path (scheduler and deferral included, when
the variant has them) and answers pulls through the same :class:`ResponderHost` a node uses;
each DC's leader pulls over its emulated WAN link (``ekko.net`` with the DC's ``WanProfile``,
the variant's codec, paced if asked), followers pull from their leader over the LAN. All in
one event loop, like the baselines, so every system is measured on the same clock, the same
links and the same count of WAN bytes (the replica-side connection of each WAN link, both
directions, as framed).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.bench.baselines.common import (
    HOST,
    BaselineResult,
    DataCentre,
    Replica,
    load_initial,
    make_replicas,
    on_step,
    summarise,
)
from ekko.bench.online_auc import OnlineAuc
from ekko.bench.trace import Trace
from ekko.codec import max_abs_error
from ekko.net.transport import Connection, Listener, connect, serve
from ekko.net.wan import WanProfile
from ekko.node.sync_host import SYNC_SCHEMA, ResponderHost, pace_rate, run_pull_link
from ekko.protocol.messages import PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.responder import Responder
from ekko.schedule import SchedulerConfig, UpdateScheduler
from ekko.schedule.write_port import WritePort
from ekko.store import Store


@dataclass(frozen=True)
class EkkoVariant:
    """Which of Ekko's WAN features are on, so the bench can add them one at a time.

    ``relay``: one leader per DC pulls over the WAN, the rest from it over the LAN (else every
    replica pulls over the WAN). ``coalesce_ms``: leaders poll every that many ms instead of
    long-polling, so rows rewritten meanwhile cross once. ``codec``: the WAN row codec (None:
    plain fp32 arrays). ``scheduler``: lanes (and deferral, if its config says so) at the
    source; ``warm_passes``: the trace's writes it plans before the run (``warm_scheduler``).
    ``pace``: WAN sessions paced at the link's bandwidth.
    """

    name: str
    relay: bool = True
    coalesce_ms: int = 0
    codec: str | None = None
    scheduler: SchedulerConfig | None = None
    warm_passes: int = 0
    pace: bool = False

    def puller(self, wan: bool) -> PullerConfig:
        if wan and self.coalesce_ms > 0:
            return PullerConfig(
                wait_ms=0, window=1, poll_interval_ms=self.coalesce_ms, codec=self.codec
            )
        return PullerConfig(wait_ms=1000, window=16, codec=self.codec if wan else None)


@dataclass(frozen=True)
class BandwidthChange:
    """At ``at_s`` wall seconds into the replay, every WAN link's bandwidth becomes
    ``factor`` times its configured one (the pacer follows when the variant paces)."""

    at_s: float
    factor: float


@dataclass
class NewKeyLatency:
    """Time from a key's first write at the source until each replica holds it.

    Why apart from the row latency: the scheduler's promise is about new keys (a new user or
    item must reach serving first); a row latency mixes them with every other update.
    """

    start: float = field(default_factory=time.time)
    pending: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    written_at: list[np.ndarray] = field(default_factory=list)  # s after start
    latency_ms: list[np.ndarray] = field(default_factory=list)

    def register(self, replicas: Sequence[str], table: str, keys: np.ndarray, now_ns: int) -> None:
        if keys.size == 0:
            return
        stamps = np.full(keys.size, now_ns, np.int64)
        for r in replicas:
            have = self.pending.setdefault(r, {}).get(table)
            if have is None:
                self.pending[r][table] = (keys.copy(), stamps)
            else:
                self.pending[r][table] = (
                    np.concatenate([have[0], keys]),
                    np.concatenate([have[1], stamps]),
                )

    def check(self, replica: str, store: Store, tables: set[str]) -> None:
        """``replica`` applied rows of ``tables``: time the pending new keys it now holds."""
        now = time.time_ns()
        pending = self.pending.get(replica, {})
        for table in tables & pending.keys():
            keys, stamps = pending[table]
            if keys.size == 0:
                continue
            _v, _ver, found = store.table(table).lookup(keys)
            if not found.any():
                continue
            self.written_at.append(stamps[found] / 1e9 - self.start)
            self.latency_ms.append((now - stamps[found]) / 1e6)
            self.pending[replica][table] = (keys[~found], stamps[~found])

    def p99_ms(self, window: tuple[float, float] | None = None) -> float:
        if not self.latency_ms:
            return float("nan")
        at = np.concatenate(self.written_at)
        lat = np.concatenate(self.latency_ms)
        if window is not None:
            lat = lat[(at >= window[0]) & (at < window[1])]
        return float(np.percentile(lat, 99)) if lat.size else float("nan")


@dataclass
class _Node:
    replica: Replica
    wan: bool  # pulls over the WAN
    host: ResponderHost | None = None
    listener: Listener | None = None
    conn: Connection | None = None
    puller: Puller | None = None


async def run_ekko(
    trace: Trace,
    topology: list[DataCentre],
    variant: EkkoVariant,
    *,
    speed: float = 1.0,
    probe: OnlineAuc | None = None,
    changes: Sequence[BandwidthChange] = (),
    new_keys: NewKeyLatency | None = None,
    timeout_s: float = 300.0,
) -> BaselineResult:
    """Replay ``trace`` into an Ekko source and sync it to ``topology``; wait until every
    replica holds what the source holds (at most ``timeout_s`` after the replay)."""
    secret = secrets.token_bytes(32)
    replicas = make_replicas(trace, topology, probe)
    source = Store()
    load_initial(source, trace)
    scheduler = UpdateScheduler(variant.scheduler) if variant.scheduler is not None else None
    before = None
    if scheduler is not None:
        warm_scheduler(scheduler, trace, variant.warm_passes)
        before = scheduler.statistics()
    profiles: dict[str, WanProfile] = {}  # WAN peer -> its link's current profile

    def pace_for(peer: str) -> float | None:
        return pace_rate(profiles.get(peer)) if variant.pace else None

    src_host = ResponderHost(Responder(source), pace_for)
    writer = WritePort(source, scheduler, on_written=src_host.notify_written)
    src_listener = await serve(
        HOST, 0, node="source", secret=secret, schema=SYNC_SCHEMA,
        on_connection=src_host.serve_session,
        wan_for=lambda peer: profiles.get(peer),
    )  # fmt: skip
    nodes: list[_Node] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        for dc in topology:
            members = [r for r in replicas if r.dc is dc]
            for i, r in enumerate(members):
                node = _Node(r, wan=(i == 0 or not variant.relay))
                if node.wan and dc.wan is not None:
                    profiles[r.name] = dc.wan
                nodes.append(node)
        by_name = {n.replica.name: n for n in nodes}
        for n in nodes:  # leaders first: their followers connect to them
            dc_leader = by_name[f"{n.replica.dc.name}-r0"]
            if n.wan:
                port, wan = src_listener.port, profiles.get(n.replica.name)
            else:
                port, wan = await _leader_port(dc_leader, secret), None
            n.conn = await connect(
                HOST, port, node=n.replica.name, secret=secret, schema=SYNC_SCHEMA, wan=wan
            )
            n.puller = Puller(n.replica.store, variant.puller(n.wan), n.replica.latency)
            tasks.append(asyncio.create_task(
                run_pull_link(n.conn, n.puller, _on_response(n, new_keys))
            ))  # fmt: skip
        for c in changes:
            tasks.append(asyncio.create_task(
                _change_bandwidth(c, profiles, src_host, nodes, variant.pace)
            ))  # fmt: skip
        names = [n.replica.name for n in nodes]
        start = time.perf_counter()
        if new_keys is not None:
            new_keys.start = time.time()
        async for batch in trace.replay(speed, on_step(probe)):
            now_ns = time.time_ns()
            if new_keys is not None:
                _v, _ver, found = source.table(batch.table).lookup(batch.keys)
                new_keys.register(names, batch.table, np.unique(batch.keys[~found]), now_ns)
            with writer.batch():  # one wake-up of parked pulls per batch
                writer.write_rows(  # a trainer's steps: the scheduler may hold rows
                    batch.table,
                    batch.keys,
                    batch.values,
                    now=now_ns / 1e9,
                    now_ns=now_ns,
                    hold=True,
                )
                writer.release(now_ns / 1e9, now_ns)
        replay_s = time.perf_counter() - start
        writer.flush(time.time_ns())
        await _converged(source, nodes, timeout_s)
        duration = time.perf_counter() - start
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        src_listener.close()
        await src_host.close()
        for n in nodes:
            if n.listener is not None:
                n.listener.close()
            if n.host is not None:
                await n.host.close()
            if n.conn is not None:
                with contextlib.suppress(Exception):
                    await n.conn.close()
    for n in nodes:
        if n.puller is not None:
            n.replica.rows_applied = n.puller.statistics().rows_applied
    wan = {n.replica.name: _wan_bytes(n) for n in nodes}
    links = [n.conn.stats for n in nodes if n.wan and n.conn is not None]
    lossless = variant.codec in (None, "fp32")
    details: dict[str, Any] = {
        "speed": speed,
        "replay_s": replay_s,
        "variant": {
            "relay": variant.relay, "coalesce_ms": variant.coalesce_ms, "codec": variant.codec,
            "scheduler": variant.scheduler is not None, "pace": variant.pace,
            "defer": variant.scheduler is not None and variant.scheduler.defer,
        },
        "wan_bytes_down": sum(st.bytes_received for st in links),
        "wan_bytes_up": sum(st.bytes_sent for st in links),
        "wan_frames_down": sum(st.frames_received for st in links),
        "wan_frames_up": sum(st.frames_sent for st in links),
        "max_abs_error": _max_error(source, replicas),
        "within_codec_error": _within_codec_error(source, replicas, variant.codec or "fp32"),
    }  # fmt: skip
    if scheduler is not None and before is not None:
        st = scheduler.statistics()
        details["scheduler"] = {
            "rows_high": st.rows_high - before.rows_high,
            "rows_low": st.rows_low - before.rows_low,
            "rows_deferred": st.rows_deferred - before.rows_deferred,
            "rows_released": st.rows_released - before.rows_released,
            "warm_passes": variant.warm_passes,
        }
    return summarise(
        variant.name, trace, source, replicas, wan, duration, strict=lossless, probe=probe,
        details=details,
    )  # fmt: skip


def warm_scheduler(scheduler: UpdateScheduler, trace: Trace, passes: int) -> None:
    """Plan the trace's writes ``passes`` times against a scratch copy of the source, so the
    scheduler starts the run as a source that has been running a while does: keys' heat, the
    running mean |Δ| and the lane percentile reflect the stream rather than a cold start (which
    puts far more than ``1 - percentile`` of the rows in the high lane while heat builds up).
    Drift starts again from zero: at the start of the run every replica holds the source's
    rows. Deferral is not warmed (held rows would be written in the scratch store only)."""
    if passes <= 0:
        return
    cfg = scheduler.config
    if cfg.defer:
        raise ValueError("warm_scheduler: a deferring scheduler cannot be warmed")
    for _ in range(passes):
        scratch = Store()
        load_initial(scratch, trace)
        for batch in trace.batches:
            table = scratch.table(batch.table)
            old, _, found = table.lookup(batch.keys)
            plan = scheduler.plan(batch.table, batch.keys, old, batch.values, found, 0.0)
            table.write(batch.keys, batch.values, now_ns=1, lanes=plan.lanes)
    scheduler.replicas_in_sync()


async def _leader_port(leader: _Node, secret: bytes) -> int:
    """Start serving ``leader``'s store to its followers (once); returns the port."""
    if leader.listener is None:
        leader.host = ResponderHost(Responder(leader.replica.store))
        leader.listener = await serve(
            HOST, 0, node=leader.replica.name, secret=secret, schema=SYNC_SCHEMA,
            on_connection=leader.host.serve_session,
        )  # fmt: skip
    return leader.listener.port


def _on_response(n: _Node, new_keys: NewKeyLatency | None):
    def handle(msg: PullResponse) -> None:
        if not msg.chunks:
            return
        if n.host is not None:
            n.host.notify_written()
        if new_keys is not None:
            new_keys.check(n.replica.name, n.replica.store, {c.table for c in msg.chunks})

    return handle


async def _change_bandwidth(
    c: BandwidthChange,
    profiles: dict[str, WanProfile],
    host: ResponderHost,
    nodes: list[_Node],
    pace: bool,
) -> None:
    await asyncio.sleep(c.at_s)
    for n in nodes:
        dc_wan = n.replica.dc.wan
        if not n.wan or dc_wan is None or dc_wan.mbit is None:
            continue
        new = WanProfile(delay_ms=dc_wan.delay_ms, mbit=dc_wan.mbit * c.factor)
        profiles[n.replica.name] = new
        assert n.conn is not None
        n.conn.set_wan(new)
        for conn in host.connections(n.replica.name):
            conn.set_wan(new)
        if pace:
            host.set_rate(n.replica.name, pace_rate(new))


async def _converged(source: Store, nodes: list[_Node], timeout_s: float) -> None:
    """Wait until every replica's knowledge equals the source's in every table and lane."""
    deadline = time.monotonic() + timeout_s
    while True:
        behind = [
            n.replica.name
            for n in nodes
            if any(
                not np.array_equal(n.replica.store.table(name).knowledge, t.knowledge)
                for name, t in source.tables.items()
            )
        ]
        if not behind:
            for n in nodes:
                n.replica.finish()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas {behind} did not catch up within {timeout_s} s")
        await asyncio.sleep(0.02)


def _wan_bytes(n: _Node) -> int:
    if not n.wan or n.conn is None or n.conn.wan is None:
        return 0
    s = n.conn.stats
    return s.bytes_sent + s.bytes_received


def _max_error(source: Store, replicas: list[Replica]) -> float:
    worst = 0.0
    for name, t in source.tables.items():
        keys, values, *_ = t.all_rows()
        for r in replicas:
            got, _ver, found = r.store.table(name).lookup(keys)
            if found.all() and len(keys):
                worst = max(worst, float(np.abs(got - values).max()))
            elif len(keys):
                return float("inf")
    return worst


def _within_codec_error(source: Store, replicas: list[Replica], codec: str) -> bool:
    for name, t in source.tables.items():
        keys, values, *_ = t.all_rows()
        if not len(keys):
            continue
        bound = max_abs_error(values, codec)[:, None]
        for r in replicas:
            got, _ver, found = r.store.table(name).lookup(keys)
            if not found.all() or not (np.abs(got - values) <= bound).all():
                return False
    return True


__all__ = ["BandwidthChange", "EkkoVariant", "NewKeyLatency", "run_ekko"]
