"""Baseline: a log through a real broker. The source XADDs every update batch to a Redis
Stream; every replica tails the stream with ``XREAD BLOCK`` and applies each entry in order.

The broker (a real ``redis-server`` on loopback) sits in the training DC: the source reaches it
directly; each replica reaches it through its own :mod:`ekko.bench.relay` carrying its DC's
``WanProfile`` in both directions, and the relay's counters are the WAN bytes (replies with
the entries, plus the replica's XREAD commands). Entries hold the table name, keys
(int64 bytes), values (float32 bytes) and the source's write stamp; the stream is not trimmed
(a log a lagging replica can replay). Replicas apply entries in stream order, so they
reproduce the source's versions exactly.

:func:`redis_server` starts a private ``redis-server`` (no persistence, loopback only) for a
run or a test and stops it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from ekko.bench.baselines.common import (
    HOST,
    BaselineResult,
    DataCentre,
    Replica,
    default_topology,
    load_initial,
    make_replicas,
    on_step,
    summarise,
    wait_replicas,
)
from ekko.bench.online_auc import OnlineAuc
from ekko.bench.relay import Relay, start_relay
from ekko.bench.trace import Trace
from ekko.store import Store

STREAM = b"ekko:updates"
_READY = b"Ready to accept connections"


class RedisUnavailable(RuntimeError):
    """``redis-server`` is not installed (``apt-get install -y redis-server``)."""


@dataclass(frozen=True)
class RedisServer:
    """A running private redis-server. Why: runs and tests own their broker, on a free
    loopback port, without persistence, and stop it when done."""

    host: str
    port: int
    process: asyncio.subprocess.Process


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def redis_server(
    *, port: int | None = None, start_timeout_s: float = 10.0
) -> AsyncIterator[RedisServer]:
    """Run ``redis-server --port P --bind 127.0.0.1 --save "" --appendonly no`` as a child
    process (not daemonized), wait for its "Ready" log line, yield, then terminate it."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RedisUnavailable(
            "redis-server not found; install it: apt-get install -y redis-server"
        )
    port = port or free_port()
    proc = await asyncio.create_subprocess_exec(
        exe,
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--protected-mode", "yes",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        log: list[bytes] = []
        async with asyncio.timeout(start_timeout_s):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"redis-server exited at start: {b''.join(log)!r}")
                log.append(line)
                if _READY in line:
                    break
        drain = asyncio.create_task(_discard(proc.stdout))
        try:
            yield RedisServer(HOST, port, proc)
        finally:
            drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def _reader(
    replica: Replica,
    port: int,
    dims: dict[str, int],
    *,
    count: int,
    block_ms: int,
) -> None:
    client = aioredis.Redis(host=HOST, port=port, decode_responses=False)
    last = b"0-0"
    try:
        while True:
            reply = await client.xread({STREAM: last}, count=count, block=block_ms)
            for _stream, entries in reply or ():
                for entry_id, f in entries:
                    last = entry_id
                    if b"end" in f:
                        replica.finish()
                        return
                    table = f[b"t"].decode()
                    keys = np.frombuffer(f[b"k"], dtype=np.int64)
                    values = np.frombuffer(f[b"v"], dtype=np.float32).reshape(-1, dims[table])
                    replica.write(table, keys, values, int(f[b"w"]))
    except Exception as e:
        replica.finish(e)
        raise
    finally:
        await client.aclose()


async def run_redis(
    trace: Trace,
    topology: list[DataCentre] | None = None,
    *,
    speed: float = 1.0,
    redis_port: int | None = None,
    count: int = 128,
    block_ms: int = 1000,
    timeout_s: float = 300.0,
    probe: OnlineAuc | None = None,
) -> BaselineResult:
    """Replay ``trace`` at ``speed`` through a Redis Stream to every replica.

    ``redis_port``: an existing loopback redis-server (its stream key ``ekko:updates`` is
    deleted first); None starts a private one. ``count`` entries at most per XREAD.
    """
    if redis_port is None:
        async with redis_server() as server:
            return await run_redis(
                trace, topology, speed=speed, redis_port=server.port, count=count,
                block_ms=block_ms, timeout_s=timeout_s, probe=probe,
            )  # fmt: skip
    topology = topology or default_topology()
    replicas = make_replicas(trace, topology, probe)
    source = Store()
    load_initial(source, trace)
    dims = {s.name: s.dim for s in trace.specs}
    producer = aioredis.Redis(host=HOST, port=redis_port, decode_responses=False)
    await producer.delete(STREAM)
    relays: list[Relay] = []
    readers: list[asyncio.Task[None]] = []
    try:
        for r in replicas:
            relay = await start_relay(0, HOST, redis_port, wan=r.dc.wan)
            relays.append(relay)
            readers.append(
                asyncio.create_task(_reader(r, relay.port, dims, count=count, block_ms=block_ms))
            )
        start = time.perf_counter()
        async for batch in trace.replay(speed, on_step(probe)):
            wtime = time.time_ns()
            source.table(batch.table).write(batch.keys, batch.values, now_ns=wtime)
            await producer.xadd(
                STREAM,
                {
                    b"t": batch.table.encode(),
                    b"k": np.ascontiguousarray(batch.keys).tobytes(),
                    b"v": np.ascontiguousarray(batch.values).tobytes(),
                    b"w": str(wtime).encode(),
                },
            )
        replay_s = time.perf_counter() - start
        await producer.xadd(STREAM, {b"end": b"1"})
        await wait_replicas(replicas, timeout_s)
        duration = time.perf_counter() - start
        await asyncio.gather(*readers)
        memory = await producer.info("memory")
        entries = await producer.xlen(STREAM)
        await producer.delete(STREAM)
    finally:
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await producer.aclose()
        for relay in relays:
            await relay.aclose()
    wan = {r.name: relay.stats.total_bytes for r, relay in zip(replicas, relays, strict=True)}
    return summarise(
        "redis-streams",
        trace,
        source,
        replicas,
        wan,
        duration,
        strict=True,
        probe=probe,
        details={
            "speed": speed,
            "replay_s": replay_s,
            "stream_entries": entries,
            "redis_used_memory_bytes": int(memory.get("used_memory", 0)),
            "xread_count": count,
            "relay_bytes_to_broker": sum(x.stats.bytes_client_to_server for x in relays),
            "relay_bytes_from_broker": sum(x.stats.bytes_server_to_client for x in relays),
        },
    )
