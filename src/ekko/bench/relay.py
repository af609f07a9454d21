"""A user-space TCP relay that puts an emulated WAN link in front of any TCP server.

``tc netem`` is not available on these machines (ENVIRONMENT.md), and third-party servers
(Redis) cannot use :class:`~ekko.net.connection.Connection`'s delay line. The relay accepts
clients on loopback, connects each to the target, and moves bytes both ways through a
:class:`~ekko.net.wan.WanLine` per direction: every chunk leaves when the line is free (paced
at the bandwidth), then arrives ``delay_ms`` later. Order is kept per direction, EOF travels
behind the data (a half-close is forwarded as a half-close), and a reset on one side aborts
the other. Every byte delivered is counted, per direction.

All connections through one relay share its two lines, as flows share one physical link.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass

from ekko.net.server import TaskServer
from ekko.net.wan import WanLine, WanProfile

log = logging.getLogger("ekko.bench.relay")

_CHUNK = 64 * 1024
DEFAULT_RELAY_QUEUE_BYTES = 16 * 1024 * 1024
"""Bytes one direction of one relayed connection may hold before the relay stops reading
(TCP flow control then pushes back on the sender)."""


@dataclass(frozen=True)
class RelayStats:
    """Bytes that crossed the emulated link, per direction.

    Why delivered bytes (not read bytes): the bandwidth bench counts what crossed the WAN;
    bytes still in the delay line have not. Once the relay is idle both are the same.
    """

    bytes_client_to_server: int = 0
    bytes_server_to_client: int = 0
    connections: int = 0
    active: int = 0

    @property
    def total_bytes(self) -> int:
        return self.bytes_client_to_server + self.bytes_server_to_client


class _Direction:
    """One direction of one relayed connection: a reader feeding a delay queue, a writer
    draining it at the line's delivery times."""

    def __init__(
        self,
        relay: Relay,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        line: WanLine,
        field: str,
        queue_limit: int,
    ) -> None:
        self._relay = relay
        self._reader = reader
        self._writer = writer
        self._line = line
        self._field = field
        self._limit = queue_limit
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._ready = asyncio.Event()
        self._space = asyncio.Event()

    async def read_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._reader.read(_CHUNK)
            # EOF reserves no line time but still arrives a delay after the data before it.
            self._queue.append((self._line.delivery_time(loop.time(), len(data)), data))
            self._queued += len(data)
            self._ready.set()
            if not data:
                return
            while self._queued > self._limit:
                self._space.clear()
                await self._space.wait()

    async def write_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            deliver_at, data = self._queue[0]
            while (wait := deliver_at - loop.time()) > 0:
                await asyncio.sleep(wait)
            self._queue.popleft()
            if not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(data)
            await self._writer.drain()
            self._queued -= len(data)
            self._space.set()
            self._relay._count(self._field, len(data))


class Relay(TaskServer):
    """A listening WAN relay in front of one TCP target.

    Why an object: a bench owns it for a run (``close`` ends every relayed connection),
    needs its bound ``port`` (port 0 works) and reads its byte counters (``stats``).
    Create with :func:`start_relay`.
    """

    def __init__(
        self, target_host: str, target_port: int, wan: WanProfile, queue_limit: int
    ) -> None:
        super().__init__()
        self.target = (target_host, target_port)
        self._lines = (WanLine(wan), WanLine(wan))  # client→server, server→client
        self._queue_limit = queue_limit
        self._writers: set[asyncio.StreamWriter] = set()
        self._counts = {"bytes_client_to_server": 0, "bytes_server_to_client": 0}

    @property
    def wan(self) -> WanProfile:
        return self._lines[0].profile

    @property
    def stats(self) -> RelayStats:
        return RelayStats(**self._counts, connections=self._accepted, active=len(self._tasks))

    def set_wan(self, wan: WanProfile) -> None:
        """Change delay and bandwidth, both directions, for bytes read from now on."""
        for line in self._lines:
            line.set_profile(wan)

    def _count(self, field: str, n: int) -> None:
        self._counts[field] += n

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._writers.add(c_writer)
        s_writer: asyncio.StreamWriter | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                s_reader, s_writer = await asyncio.open_connection(*self.target)
            except OSError as e:
                log.warning("relay: cannot reach %s:%s: %s", *self.target, e)
                return
            self._writers.add(s_writer)
            c2s = _Direction(
                self, c_reader, s_writer, self._lines[0], "bytes_client_to_server",
                self._queue_limit,
            )  # fmt: skip
            s2c = _Direction(
                self, s_reader, c_writer, self._lines[1], "bytes_server_to_client",
                self._queue_limit,
            )  # fmt: skip
            tasks = [asyncio.create_task(d.read_side()) for d in (c2s, s2c)] + [
                asyncio.create_task(d.write_side()) for d in (c2s, s2c)
            ]
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break  # one side broke: drop the other at once
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            clean = _clean(tasks)
            for w in (c_writer, s_writer):
                if w is None:
                    continue
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    if clean:
                        w.close()
                    else:
                        w.transport.abort()

    def close(self) -> None:
        """Stop accepting and drop every relayed connection (bytes in flight are lost)."""
        super().close()
        for w in self._writers:
            w.transport.abort()


def _clean(tasks: list[asyncio.Task[None]]) -> bool:
    """True if every direction finished normally (EOF relayed both ways)."""
    return all(t.done() and not t.cancelled() and t.exception() is None for t in tasks)


async def start_relay(
    listen_port: int,
    target_host: str,
    target_port: int,
    *,
    wan: WanProfile,
    listen_host: str = "127.0.0.1",
    queue_limit: int = DEFAULT_RELAY_QUEUE_BYTES,
) -> Relay:
    """Listen on ``listen_host:listen_port`` (0 = any free port, see ``Relay.port``) and relay
    each client to ``target_host:target_port`` through ``wan``, applied in both directions."""
    relay = Relay(target_host, target_port, wan, queue_limit)
    await relay._start(listen_host, listen_port)
    return relay
