"""The WAN relay delays and paces every byte both ways, counts it, keeps order, and closes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ekko.bench.relay import Relay, start_relay
from ekko.net.wan import WanProfile

HOST = "127.0.0.1"
TIMEOUT = 10.0


class EchoServer:
    """Echoes every byte; on EOF it echoes ``tail`` and closes. Records EOFs it saw."""

    def __init__(self, tail: bytes = b"") -> None:
        self.tail = tail
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        self.eof.set()
        writer.write(self.tail)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    srv = EchoServer(tail=b"bye")
    srv.server = await asyncio.start_server(srv.handle, HOST, 0)
    yield srv
    srv.server.close()
    await srv.server.wait_closed()


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return await reader.readexactly(n)


async def test_round_trip_takes_at_least_two_one_way_delays(echo: EchoServer) -> None:
    delay_ms = 40.0
    async with await start_relay(0, HOST, echo.port, wan=WanProfile(delay_ms=delay_ms)) as relay:
        reader, writer = await asyncio.open_connection(HOST, relay.port)
        loop = asyncio.get_running_loop()
        for size in (1, 1000, 100_000):
            t0 = loop.time()
            writer.write(b"x" * size)
            got = await _read_exactly(reader, size)
            assert got == b"x" * size
            assert loop.time() - t0 >= 2 * delay_ms / 1000
        writer.close()
        await writer.wait_closed()


async def test_bandwidth_paces_delivery(echo: EchoServer) -> None:
    size = 100_000  # at 8 Mbit/s: 0.1 s per direction
    async with await start_relay(0, HOST, echo.port, wan=WanProfile(mbit=8.0)) as relay:
        reader, writer = await asyncio.open_connection(HOST, relay.port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        writer.write(b"y" * size)
        await _read_exactly(reader, size)
        # The echo starts before the last byte arrives, so one direction's time is the bound.
        assert loop.time() - t0 >= size * 8 / 8e6
        writer.close()
        await writer.wait_closed()


async def test_counts_bytes_both_ways_and_propagates_half_close(echo: EchoServer) -> None:
    relay = await start_relay(0, HOST, echo.port, wan=WanProfile(delay_ms=5.0, mbit=200.0))
    try:
        reader, writer = await asyncio.open_connection(HOST, relay.port)
        chunks = [bytes([i % 251]) * (i * 37 % 5000 + 1) for i in range(200)]
        for c in chunks:
            writer.write(c)
        sent = b"".join(chunks)
        writer.write_eof()  # half-close: the echo server must see EOF after all the data
        async with asyncio.timeout(TIMEOUT):
            received = await reader.read()  # until the server's close reaches us
        assert received == sent + b"bye"  # order kept, every byte, then EOF
        assert echo.eof.is_set()
        stats = relay.stats
        assert stats.bytes_client_to_server == len(sent)
        assert stats.bytes_server_to_client == len(sent) + 3
        assert stats.total_bytes == 2 * len(sent) + 3
        assert stats.connections == 1
        writer.close()
        await writer.wait_closed()
    finally:
        await relay.aclose()
    assert relay.stats.active == 0


async def test_client_close_reaches_server(echo: EchoServer) -> None:
    async with await start_relay(0, HOST, echo.port, wan=WanProfile(delay_ms=10.0)) as relay:
        reader, writer = await asyncio.open_connection(HOST, relay.port)
        writer.write(b"ping")
        assert await _read_exactly(reader, 4) == b"ping"
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(TIMEOUT):
            await echo.eof.wait()


async def test_unreachable_target_closes_client() -> None:
    with_nothing = await asyncio.start_server(lambda r, w: None, HOST, 0)
    port = with_nothing.sockets[0].getsockname()[1]
    with_nothing.close()
    await with_nothing.wait_closed()
    relay: Relay
    async with await start_relay(0, HOST, port, wan=WanProfile(delay_ms=1.0)) as relay:
        reader, writer = await asyncio.open_connection(HOST, relay.port)
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
        writer.close()
        assert relay.stats.total_bytes == 0


async def test_close_drops_open_connections(echo: EchoServer) -> None:
    relay = await start_relay(0, HOST, echo.port, wan=WanProfile(delay_ms=1.0))
    reader, writer = await asyncio.open_connection(HOST, relay.port)
    writer.write(b"a")
    assert await _read_exactly(reader, 1) == b"a"
    await relay.aclose()
    async with asyncio.timeout(TIMEOUT):
        try:
            rest = await reader.read()
        except ConnectionResetError:
            rest = b""
    assert rest == b""
    assert relay.stats.active == 0
    writer.close()
