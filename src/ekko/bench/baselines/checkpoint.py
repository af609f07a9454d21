"""Baseline: periodic full checkpoint broadcast.

Every ``interval_s`` (wall seconds of the replay) the source copies every row of every table
(fp32 keys + values) and sends the copy to every replica over that replica's WAN link
(``ekko.net`` framing, the DC's ``WanProfile``); one last checkpoint follows the end of the
trace. A replica overwrites each table with the checkpoint's rows.

A link still busy with an older checkpoint skips to the newest one when it frees (what a
checkpoint broadcaster does; queueing stale checkpoints would only add bytes and delay).

Latency of a row = time the replica applied the checkpoint part holding it - the source's
wall-clock time of the row's last write, for rows written since the checkpoint this replica
last applied. Per-row write times are a measuring side channel in the bench process; they are
not sent (a checkpoint carries no per-row metadata), so they cost no WAN bytes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from ekko.bench.baselines.common import (
    BaselineResult,
    CheckpointPart,
    DataCentre,
    End,
    Replica,
    default_topology,
    load_initial,
    make_replicas,
    on_step,
    summarise,
    wait_replicas,
)
from ekko.bench.baselines.links import Link, close_links, open_links
from ekko.bench.online_auc import OnlineAuc
from ekko.bench.trace import Trace
from ekko.store import Store

MAX_PART_BYTES = 8 * 1024 * 1024
"""Largest checkpoint frame's row payload: big tables are split into several parts."""


@dataclass
class _Checkpoint:
    ckpt: int
    cut_ns: int
    parts: list[CheckpointPart]
    wtimes: dict[tuple[str, int], np.ndarray]  # (table, part) -> source write time of each row
    final: bool = False


def _take(source: Store, ckpt: int, *, final: bool) -> _Checkpoint:
    """Copy every row of every table now (no await inside: the copy is consistent)."""
    cut = time.time_ns()
    parts: list[CheckpointPart] = []
    wtimes: dict[tuple[str, int], np.ndarray] = {}
    for name, table in source.tables.items():
        keys, values, _, wt, _ = table.all_rows()
        step = max(1, MAX_PART_BYTES // (8 + 4 * table.dim))
        for i, lo in enumerate(range(0, max(len(keys), 1), step)):
            hi = min(lo + step, len(keys))
            parts.append(CheckpointPart(ckpt, name, i, keys[lo:hi].copy(), values[lo:hi].copy()))
            wtimes[(name, i)] = wt[lo:hi].copy()
    return _Checkpoint(ckpt, cut, parts, wtimes, final)


class _Broadcaster:
    """The newest checkpoint, and what each replica has applied (for latency accounting).

    Why one object: senders pick up the newest checkpoint (latest wins), replicas look up the
    measuring side channel (cut time, per-row write times) of the checkpoint they apply.
    """

    def __init__(self) -> None:
        self.checkpoints: dict[int, _Checkpoint] = {}
        self.latest: _Checkpoint | None = None
        self.changed = asyncio.Event()
        self.applying: dict[str, int] = {}  # replica -> checkpoint being applied
        self.prev_cut: dict[str, int] = {}  # replica -> cut of the checkpoint applied before
        self.sent: dict[str, list[int]] = {}  # replica -> checkpoints sent to it

    def publish(self, ckpt: _Checkpoint) -> None:
        self.checkpoints[ckpt.ckpt] = ckpt
        self.latest = ckpt
        self.changed.set()
        # Parts nobody will send again can go; the side channel stays (it is small).
        for old in self.checkpoints.values():
            if old is not ckpt and all(s and s[-1] >= old.ckpt for s in self.sent.values()):
                old.parts = []

    def apply(self, replica: Replica, msg: CheckpointPart) -> None:
        if self.applying.get(replica.name) != msg.ckpt:
            last = self.applying.get(replica.name)
            self.prev_cut[replica.name] = 0 if last is None else self.checkpoints[last].cut_ns
            self.applying[replica.name] = msg.ckpt
        ck = self.checkpoints[msg.ckpt]
        replica.store.table(msg.table).write(msg.keys, msg.values, now_ns=ck.cut_ns)
        now = time.time_ns()
        wt = ck.wtimes[(msg.table, msg.part)]
        replica.latency.record_ns(now - wt[wt > self.prev_cut[replica.name]])
        replica.rows_applied += len(msg.keys)

    async def sender(self, link: Link) -> None:
        sent = self.sent.setdefault(link.replica.name, [])
        done = -1
        while True:
            while self.latest is None or self.latest.ckpt == done:
                self.changed.clear()
                await self.changed.wait()
            ck = self.latest
            for part in ck.parts:
                await link.conn.send(part)
            sent.append(ck.ckpt)
            done = ck.ckpt
            if ck.final:
                await link.conn.send(End())
                return


async def _ticker(bc: _Broadcaster, source: Store, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    k = 1
    while True:
        await asyncio.sleep(max(0.0, start + k * interval_s - loop.time()))
        bc.publish(_take(source, k, final=False))
        k += 1


async def run_checkpoint(
    trace: Trace,
    topology: list[DataCentre] | None = None,
    *,
    interval_s: float = 5.0,
    speed: float = 1.0,
    timeout_s: float = 600.0,
    probe: OnlineAuc | None = None,
) -> BaselineResult:
    """Replay ``trace`` at ``speed`` into the source; broadcast a full checkpoint every
    ``interval_s`` wall seconds and once after the replay; wait until every replica applied
    the last one (at most ``timeout_s`` after the replay ends)."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    topology = topology or default_topology()
    replicas = make_replicas(trace, topology, probe)
    source = Store()
    load_initial(source, trace)
    bc = _Broadcaster()
    for r in replicas:
        bc.sent[r.name] = []
    links = await open_links(replicas, bc.apply)
    senders = [asyncio.create_task(bc.sender(link)) for link in links]
    ticker = asyncio.create_task(_ticker(bc, source, interval_s))
    try:
        start = time.perf_counter()
        async for batch in trace.replay(speed, on_step(probe)):
            source.table(batch.table).write(batch.keys, batch.values, now_ns=time.time_ns())
        replay_s = time.perf_counter() - start
        ticker.cancel()
        final = max(bc.checkpoints, default=0) + 1
        bc.publish(_take(source, final, final=True))
        await wait_replicas(replicas, timeout_s)
        duration = time.perf_counter() - start
        await asyncio.gather(*senders)
    finally:
        ticker.cancel()
        for t in senders:
            t.cancel()
        wan = await close_links(links)
    per_replica = [len(bc.sent[r.name]) for r in replicas]
    return summarise(
        "checkpoint",
        trace,
        source,
        replicas,
        wan,
        duration,
        strict=False,
        probe=probe,
        details={
            "interval_s": interval_s,
            "speed": speed,
            "replay_s": replay_s,
            "checkpoints_taken": len(bc.checkpoints),
            "checkpoints_sent_per_replica": per_replica,
            "checkpoint_fp32_bytes": trace.table_fp32_bytes,
        },
    )
