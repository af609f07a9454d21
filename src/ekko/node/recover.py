"""The asyncio side of a restarting source's recovery (the protocol is sans-IO in
``ekko.protocol.recovery``): connect to every replica, pull until each has nothing more or
the timeout passes, decide the lineage, and make the result durable before any write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from ekko.net.errors import TransportError
from ekko.net.transport import Connection
from ekko.node.config import NodeConfig
from ekko.node.core import NodeCore
from ekko.node.sync_host import run_pull_link
from ekko.protocol.messages import PullResponse
from ekko.protocol.recovery import RECOVERY_PULLER, RecoveryResult, SourceRecovery

log = logging.getLogger(__name__)

NOT_REPLICAS = ("source", "checkpoint")  # nodes a restarting source does not recover from

Connect = Callable[[NodeConfig], Awaitable[Connection | None]]


async def recover_source(core: NodeCore, connect: Connect) -> RecoveryResult:
    """Recover ``core`` (the source) from every replica in its config; writes are refused
    (``core.not_ready``) until the recovered store and its lineage are in a snapshot."""
    config = core.config
    core.not_ready = "recovering: pulling what the replicas hold beyond its own data"
    replicas = [  # every holder of any of its partitions (a replica may hold others' too)
        n.name
        for n in config.nodes
        if config.role(n.name) not in NOT_REPLICAS
        and any(config.source_of(p).name == core.name for p in config.held(n.name))
    ]
    pulls = RECOVERY_PULLER
    if config.partitioned:  # this source's partitions only (issue 17)
        pulls = replace(RECOVERY_PULLER, partitions=config.held(core.name))
    recovery = SourceRecovery(core.store, replicas, pulls)
    started = time.monotonic()
    timeout = config.durability.recovery_timeout_s
    await asyncio.gather(
        *(_absorb(recovery, config.node(name), connect, timeout) for name in replicas)
    )
    result = recovery.finish()
    log.info(
        "%s recovered in %.2f s: %d rows from replicas %s; lineage %x %s%s",
        core.name,
        time.monotonic() - started,
        result.rows_absorbed,
        result.absorbed,
        result.lineage,
        "kept" if result.kept_lineage else "new (replicas rebuild from this source)",
        f"; without {recovery.reasons}" if recovery.reasons else "",
    )
    core.save_snapshot()  # the lineage and whatever was recovered are durable first
    core.not_ready = None
    return result


RETRY_FIRST_S = 0.1  # a replica down at restart is tried again after this, doubling
RETRY_MAX_S = 1.0


async def _absorb(
    recovery: SourceRecovery, peer: NodeConfig, connect: Connect, timeout: float
) -> None:
    """Pull everything ``peer`` holds beyond the source's knowledge, within ``timeout``. A
    replica that is down (or whose link breaks) is tried again with backoff until then: one
    missed replica means a new lineage, and every replica then rebuilds its whole store."""
    deadline = time.monotonic() + timeout
    delay = RETRY_FIRST_S
    reached = False
    while True:
        conn = await connect(peer)
        if conn is not None:
            reached = True
            if await _pull(recovery, peer.name, conn, deadline - time.monotonic()):
                break
        left = deadline - time.monotonic()
        if left <= 0:
            why = "not caught up" if reached else "unreachable"
            recovery.give_up(peer.name, f"{why} within {timeout} s")
            return
        await asyncio.sleep(min(delay, left))
        delay = min(2 * delay, RETRY_MAX_S)
        recovery.reconnect(peer.name)
    puller = recovery.pullers[peer.name]
    if puller.refused_lineage is not None:
        recovery.reasons[peer.name] = f"holds lineage {puller.refused_lineage:x}"


async def _pull(recovery: SourceRecovery, name: str, conn: Connection, left: float) -> bool:
    """One link's pulls; True once ``name`` has nothing more (False: broke or timed out)."""
    puller = recovery.pullers[name]
    done = asyncio.Event()

    def on_response(msg: PullResponse) -> None:
        if puller.caught_up:
            done.set()

    try:
        await asyncio.wait_for(
            run_pull_link(conn, puller, on_response, done.wait()), max(left, 0.0)
        )
    except (TimeoutError, TransportError, OSError) as exc:
        log.info("recovery pull from %s stopped: %r", name, exc)
    finally:
        with contextlib.suppress(TransportError, OSError):
            await conn.close()
    return puller.caught_up
