"""Baseline: push every update, fp32, from the source to every replica (Monolith-style fan-out).

No relay tree, no coalescing, no quantisation: each publisher write becomes one
:class:`~ekko.bench.baselines.common.UpdateBatch` frame on each replica's own WAN link
(``ekko.net`` framing, the DC's ``WanProfile``). Each link has its own sender task and an
unbounded queue, so a slow DC never stalls the others and nothing is dropped. Replicas apply
in arrival order (TCP keeps it), so they reproduce the source's versions exactly.
"""

from __future__ import annotations

import asyncio
import time

from ekko.bench.baselines.common import (
    BaselineResult,
    DataCentre,
    End,
    Replica,
    UpdateBatch,
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


def _apply(replica: Replica, msg: UpdateBatch) -> None:
    replica.write(msg.table, msg.keys, msg.values, msg.wtime_ns)


async def _sender(link: Link, queue: asyncio.Queue[UpdateBatch | End]) -> None:
    while True:
        msg = await queue.get()
        await link.conn.send(msg)
        if isinstance(msg, End):
            return


async def run_push(
    trace: Trace,
    topology: list[DataCentre] | None = None,
    *,
    speed: float = 1.0,
    timeout_s: float = 300.0,
    probe: OnlineAuc | None = None,
) -> BaselineResult:
    """Replay ``trace`` at ``speed``, pushing every batch to every replica; wait until every
    replica applied everything (at most ``timeout_s`` after the replay ends)."""
    topology = topology or default_topology()
    replicas = make_replicas(trace, topology, probe)
    source = Store()
    load_initial(source, trace)
    links = await open_links(replicas, _apply)
    queues: list[asyncio.Queue[UpdateBatch | End]] = [asyncio.Queue() for _ in links]
    senders = [asyncio.create_task(_sender(ln, q)) for ln, q in zip(links, queues, strict=True)]
    max_backlog = 0
    try:
        start = time.perf_counter()
        async for batch in trace.replay(speed, on_step(probe)):
            wtime = time.time_ns()
            source.table(batch.table).write(batch.keys, batch.values, now_ns=wtime)
            msg = UpdateBatch(batch.table, batch.keys, batch.values, wtime)
            for q in queues:
                q.put_nowait(msg)
            max_backlog = max(max_backlog, max(q.qsize() for q in queues))
        replay_s = time.perf_counter() - start
        for q in queues:
            q.put_nowait(End())
        await wait_replicas(replicas, timeout_s)
        duration = time.perf_counter() - start
        await asyncio.gather(*senders)
    finally:
        for t in senders:
            t.cancel()
        wan = await close_links(links)
    return summarise(
        "push-fp32",
        trace,
        source,
        replicas,
        wan,
        duration,
        strict=True,
        probe=probe,
        details={"replay_s": replay_s, "max_queued_batches": max_backlog, "speed": speed},
    )
