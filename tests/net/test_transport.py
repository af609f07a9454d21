"""One conformance suite for every transport (trio ``check_two_way_stream`` style): TCP,
TCP with WAN emulation, in-memory, in-memory with WAN. Then TCP-only listener behaviour."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import pytest
import zstandard

from ekko.net import framing
from ekko.net.auth import ClientHandshake
from ekko.net.connection import Connection
from ekko.net.errors import (
    AuthError,
    BrokenConnection,
    ConnectionClosed,
    LocalFrameError,
    RemoteFrameError,
)
from ekko.net.framing import FrameDecoder, encode_frame
from ekko.net.handshake import Challenge, HandshakeMessage
from ekko.net.memory import memory_pair
from ekko.net.transport import Listener, connect, serve
from ekko.net.wan import WanProfile
from ekko.node.sync_host import SYNC_SCHEMA
from ekko.protocol.messages import (
    PROTOCOL_VERSION,
    Catalog,
    CatalogRequest,
    Error,
    Message,
    PullResponse,
)

from .helpers import assert_same, every_message, flood_idle_connections, sample_chunk
from .tls_files import Pki

SECRET = b"s3cret"
WAN = WanProfile(delay_ms=30.0, mbit=200.0)
TIMEOUT = 20.0


@dataclass
class Pair:
    a: Connection
    b: Connection
    wan: WanProfile | None


async def _tcp_pair(
    wan: WanProfile | None, compress: bool = False, tls: Pki | None = None
) -> tuple[Pair, Callable[[], Awaitable[None]]]:
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    hold = asyncio.Event()

    async def on_connection(conn: Connection) -> None:
        accepted.put_nowait(conn)
        await hold.wait()

    listener = await serve(
        "127.0.0.1",
        0,
        node="server",
        secret=SECRET,
        schema=SYNC_SCHEMA,
        on_connection=on_connection,
        wan_for=lambda peer: wan if peer == "client" else None,
        compress=compress,
        tls=tls.files("server").server_context(client_certs=True) if tls else None,
    )
    a = await connect(
        "127.0.0.1",
        listener.port,
        node="client",
        secret=SECRET,
        schema=SYNC_SCHEMA,
        wan=wan,
        compress=compress,
        tls=tls.files("client").client_context() if tls else None,
        server_name="server",
    )
    async with asyncio.timeout(TIMEOUT):
        b = await accepted.get()

    async def cleanup() -> None:
        hold.set()
        await a.close()
        listener.close()
        await listener.wait_closed()

    return Pair(a, b, wan), cleanup


async def _memory_pair(
    wan: WanProfile | None, compress: bool = False, schema=SYNC_SCHEMA
) -> tuple[Pair, Callable[[], Awaitable[None]]]:
    a, b = memory_pair(wan, names=("server", "client"), compress=compress, schema=SYNC_SCHEMA)

    async def cleanup() -> None:
        await a.close()
        await b.close()

    return Pair(a, b, wan), cleanup


KINDS = {
    "tcp": lambda c, pki: _tcp_pair(None, c),
    "tcp-wan": lambda c, pki: _tcp_pair(WAN, c),
    "tcp-tls": lambda c, pki: _tcp_pair(None, c, tls=pki),
    "memory": lambda c, pki: _memory_pair(None, c),
    "memory-wan": lambda c, pki: _memory_pair(WAN, c),
}


@pytest.fixture(params=list(KINDS))
async def pair(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[Pair]:
    p, cleanup = await KINDS[request.param](False, pki)
    try:
        yield p
    finally:
        async with asyncio.timeout(TIMEOUT):
            await cleanup()


async def _recv_n(conn: Connection, n: int) -> list[Message]:
    async with asyncio.timeout(TIMEOUT):
        return [await conn.recv() for _ in range(n)]


def _traffic(n: int, salt: int) -> list[Message]:
    base = every_message()
    return [msgspec.structs.replace(base[k % len(base)], req_id=salt * 1000 + k) for k in range(n)]


# -- conformance -----------------------------------------------------------------------------


async def test_messages_arrive_in_order_and_intact_both_ways(pair: Pair) -> None:
    out_a, out_b = _traffic(40, 1), _traffic(40, 2)

    async def send_all(conn: Connection, msgs: list[Message]) -> None:
        for m in msgs:
            await conn.send(m)

    sends = asyncio.gather(send_all(pair.a, out_a), send_all(pair.b, out_b))
    got_b, got_a = await asyncio.gather(_recv_n(pair.b, 40), _recv_n(pair.a, 40))
    await sends
    assert_same(got_b, out_a)
    assert_same(got_a, out_b)


async def test_large_message_crosses_intact(pair: Pair) -> None:
    big = PullResponse(7, 1, [sample_chunk(rows=40_000, dim=16)])  # ~3.5 MB
    send = asyncio.create_task(pair.a.send(big))
    (got,) = await _recv_n(pair.b, 1)
    await send
    assert_same(got, big)


async def test_concurrent_senders_never_interleave_frames(pair: Pair) -> None:
    async def burst(salt: int) -> None:
        for m in _traffic(20, salt):
            await pair.a.send(m)

    await asyncio.gather(*(burst(s) for s in range(1, 5)))
    got = await _recv_n(pair.b, 80)
    for salt in range(1, 5):  # each sender's own order is kept
        mine = [m.req_id for m in got if m.req_id // 1000 == salt]
        assert mine == sorted(mine) and len(mine) == 20


async def test_stats_count_wire_bytes_on_both_ends(pair: Pair) -> None:
    msgs = _traffic(10, 3)
    for m in msgs:
        await pair.a.send(m)
    await pair.b.send(Catalog(1, 1, []))
    await _recv_n(pair.b, 10)
    await _recv_n(pair.a, 1)
    a, b = pair.a.stats, pair.b.stats
    assert a.bytes_sent == b.bytes_received and b.bytes_sent == a.bytes_received
    assert a.frames_sent == b.frames_received and b.frames_sent == a.frames_received
    data_bytes = sum(len(encode_frame(m)) for m in msgs)
    assert a.bytes_sent >= data_bytes  # every frame counted (plus the handshake on TCP)
    assert a.wan_queued_bytes == 0


async def test_close_is_closed_here_and_broken_cleanly_there(pair: Pair) -> None:
    await pair.a.send(CatalogRequest(1))
    await pair.a.close()
    with pytest.raises(ConnectionClosed):
        await pair.a.send(CatalogRequest(2))
    with pytest.raises(ConnectionClosed):
        await pair.a.recv()
    # what was sent before close still arrives (a WAN line drains first), then a clean EOF
    assert await _recv_n(pair.b, 1) == [CatalogRequest(1)]
    with pytest.raises(BrokenConnection) as info:
        await _recv_n(pair.b, 1)
    assert info.value.clean
    with pytest.raises(BrokenConnection):  # and again: the error state sticks
        await pair.b.recv()
    await pair.a.close()  # idempotent


async def test_close_wakes_a_pending_recv_with_connection_closed(pair: Pair) -> None:
    pending = asyncio.create_task(pair.a.recv())
    # One scheduling yield so the task reaches its read; the asserted outcome is the same
    # either way, so nothing here depends on timing.
    await asyncio.sleep(0)
    await pair.a.close()
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT):
            await pending


async def test_sending_to_a_closed_peer_eventually_breaks(pair: Pair) -> None:
    await pair.a.close()
    with pytest.raises(BrokenConnection):
        await _recv_n(pair.b, 1)
    payload = PullResponse(1, 1, [sample_chunk(rows=2000, dim=8)])
    with pytest.raises(BrokenConnection):
        async with asyncio.timeout(TIMEOUT):
            for _ in range(10_000):  # loopback answers with a reset after the first write
                await pair.b.send(payload)
            if pair.b.wan is not None:  # a delay line reports the failure on the next send
                while True:
                    await pair.b.send(payload)


async def test_garbage_from_the_peer_is_a_remote_error_and_closes(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    await pair.b.send(CatalogRequest(5))
    assert await _recv_n(pair.a, 1) == [CatalogRequest(5)]
    await pair.b._stream.send_all(b"\x00\x00\x00\x03\x00\xc1\xc1\xc1")  # 0xc1: never valid msgpack
    with pytest.raises(RemoteFrameError, match="payload"):
        await _recv_n(pair.a, 1)
    assert pair.a.closed
    with pytest.raises(RemoteFrameError):
        await pair.a.recv()
    with pytest.raises(BrokenConnection, match="bad frame"):
        await pair.a.send(CatalogRequest(6))
    assert "bad frame" in caplog.text and pair.a.peer in caplog.text
    with pytest.raises(BrokenConnection):
        await _recv_n(pair.b, 1)


async def test_oversize_send_is_local_and_the_connection_survives(pair: Pair) -> None:
    pair.a._max_frame_bytes = 1000
    with pytest.raises(LocalFrameError):
        await pair.a.send(PullResponse(1, 1, [sample_chunk(rows=500)]))
    await pair.a.send(CatalogRequest(9))
    assert await _recv_n(pair.b, 1) == [CatalogRequest(9)]


@pytest.fixture(params=[k for k in KINDS if k.endswith("-wan")])
async def wan_pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    p, cleanup = await KINDS[request.param](False, None)
    try:
        yield p
    finally:
        async with asyncio.timeout(TIMEOUT):
            await cleanup()


async def test_wan_delivery_is_never_earlier_than_the_delay(wan_pair: Pair) -> None:
    pair = wan_pair
    assert pair.wan is not None
    loop = asyncio.get_running_loop()
    delay = pair.wan.delay_ms / 1000
    for conn_out, conn_in in ((pair.a, pair.b), (pair.b, pair.a)):  # both directions
        t0 = loop.time()
        await conn_out.send(CatalogRequest(1))
        await _recv_n(conn_in, 1)
        assert loop.time() - t0 >= delay


# -- WAN specifics (memory pair: no sockets needed to check the delay line) -----------------


async def test_bandwidth_lower_bound_and_order() -> None:
    wan = WanProfile(delay_ms=5, mbit=20)
    a, b = memory_pair(wan, schema=SYNC_SCHEMA)
    loop = asyncio.get_running_loop()
    msgs = [PullResponse(k, 1, [sample_chunk(rows=500, dim=8, i=k)]) for k in range(6)]
    t0 = loop.time()
    for m in msgs:
        await a.send(m)
    got = await _recv_n(b, len(msgs))
    elapsed = loop.time() - t0
    assert [m.req_id for m in got] == list(range(6))
    assert elapsed >= a.stats.bytes_sent * 8 / 20e6 + 0.005
    await a.close()
    await b.close()


async def test_wan_queue_applies_backpressure() -> None:
    limit = 100_000
    a, b = memory_pair(WanProfile(delay_ms=1, mbit=50), wan_queue_bytes=limit, schema=SYNC_SCHEMA)
    msg = PullResponse(1, 1, [sample_chunk(rows=700, dim=8)])  # ~40 KB frames
    size = len(encode_frame(msg))
    seen: list[int] = []

    async def producer() -> None:
        for _ in range(12):
            await a.send(msg)
            seen.append(a.stats.wan_queued_bytes)

    task = asyncio.create_task(producer())
    await _recv_n(b, 12)
    await task
    assert max(seen) <= limit + size and max(seen) > 0
    await a.close()
    await b.close()


async def test_set_wan_at_runtime_keeps_order() -> None:
    a, b = memory_pair(WanProfile(delay_ms=40), schema=SYNC_SCHEMA)
    await a.send(CatalogRequest(1))
    a.set_wan(None)  # frames behind the delayed one must not overtake it
    await a.send(CatalogRequest(2))
    a.set_wan(WanProfile(delay_ms=1, mbit=100))
    await a.send(CatalogRequest(3))
    assert await _recv_n(b, 3) == [CatalogRequest(1), CatalogRequest(2), CatalogRequest(3)]
    await a.close()
    await b.close()


@pytest.mark.parametrize("kind", ["tcp", "memory"])
async def test_compression_reduces_wire_bytes(kind: str) -> None:
    zeros = msgspec.structs.replace(
        sample_chunk(rows=5000, dim=16), values=np.zeros((5000, 16), np.float32)
    )
    msg = PullResponse(1, 1, [zeros])
    p, cleanup = await KINDS[kind](True, None)
    try:
        before = p.a.stats.bytes_sent
        await p.a.send(msg)
        (got,) = await _recv_n(p.b, 1)
        assert_same(got, msg)
        assert p.a.stats.bytes_sent - before < len(encode_frame(msg)) / 4
        assert p.b.stats.bytes_received == p.a.stats.bytes_sent
    finally:
        await cleanup()


# -- TCP listener ---------------------------------------------------------------------------


async def _echo_listener(handshake_timeout: float = 5.0) -> Listener:
    async def echo(conn: Connection) -> None:
        while True:
            await conn.send(await conn.recv())

    return await serve(
        "127.0.0.1",
        0,
        node="server",
        secret=SECRET,
        schema=SYNC_SCHEMA,
        on_connection=echo,
        handshake_timeout=handshake_timeout,
    )


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return await reader.read()


async def test_garbage_peer_is_dropped_and_the_listener_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    async with await _echo_listener() as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"\xff" * 64)  # a length field far above the limit
        received = await _read_to_eof(reader)
        writer.close()
        assert [type(m) for m in FrameDecoder(message_type=HandshakeMessage).feed(received)] == [
            Challenge
        ]
        assert "refusing" in caplog.text and "unknown frame flags" in caplog.text, caplog.text
        assert listener.stats.auth_failures == 1
        async with await connect(
            "127.0.0.1", listener.port, node="good", secret=SECRET, schema=SYNC_SCHEMA
        ) as conn:
            await conn.send(Error(1, "x", "still serving"))
            assert await _recv_n(conn, 1) == [Error(1, "x", "still serving")]


async def test_authenticated_peer_sending_garbage_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    async with await _echo_listener() as listener:
        bad = await connect(
            "127.0.0.1", listener.port, node="bad", secret=SECRET, schema=SYNC_SCHEMA
        )
        await bad._stream.send_all(b"\x00\x00\x00\x01\x04x")  # unknown flag bit
        with pytest.raises(BrokenConnection):
            await _recv_n(bad, 1)
        assert "closing connection to bad: bad frame: unknown frame flags" in caplog.text
        await bad.close()
        async with await connect(
            "127.0.0.1", listener.port, node="good", secret=SECRET, schema=SYNC_SCHEMA
        ) as conn:
            await conn.send(CatalogRequest(3))
            assert await _recv_n(conn, 1) == [CatalogRequest(3)]


async def test_unauthenticated_peer_receives_nothing_but_the_challenge() -> None:
    async with await _echo_listener(handshake_timeout=0.2) as listener:
        # silent peer: gets the challenge, then is dropped at the handshake timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        received = await _read_to_eof(reader)
        writer.close()
        (challenge,) = FrameDecoder(message_type=HandshakeMessage).feed(received)
        assert isinstance(challenge, Challenge) and challenge.node == "server"
        # a peer answering with data instead of Auth: same
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(encode_frame(CatalogRequest(1)))
        received = await _read_to_eof(reader)
        writer.close()
        assert [type(m) for m in FrameDecoder(message_type=HandshakeMessage).feed(received)] == [
            Challenge
        ]
        assert listener.stats.auth_failures == 2 and listener.stats.authenticated == 0


async def test_before_authentication_frames_are_small_and_never_decompressed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 §4: a 1.9 KB frame declaring 60 MB of zstd was decompressed, and a 59 MB
    frame buffered, before the peer proved anything."""
    caplog.set_level(logging.WARNING, logger="ekko.net")
    decompressed: list[int] = []
    real = framing._decompressor
    monkeypatch.setattr(framing, "_decompressor", lambda: decompressed.append(1) or real())
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(60 << 20))
    assert len(bomb) < 4096 and zstandard.frame_content_size(bomb) == 60 << 20
    async with await _echo_listener() as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(framing.HEADER.pack(len(bomb), framing.FLAG_ZSTD) + bomb)
        await _read_to_eof(reader)
        writer.close()
        assert "compressed frame before authentication" in caplog.text, caplog.text
        # A 59 MB frame is refused from its 5-byte header: the listener hangs up before a
        # byte of the payload is sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(framing.HEADER.pack(59 << 20, 0))
        await _read_to_eof(reader)
        writer.close()
        assert f"frame length {59 << 20} above the limit 4096" in caplog.text, caplog.text
        assert decompressed == [] and listener.stats.auth_failures == 2
        # Authenticated peers still get the full limit, compressed.
        async with await connect(
            "127.0.0.1",
            listener.port,
            node="good",
            secret=SECRET,
            schema=SYNC_SCHEMA,
            compress=True,
        ) as conn:
            big = Error(1, "x", "y" * 100_000)
            await conn.send(big)
            assert await _recv_n(conn, 1) == [big]
        assert decompressed


async def test_a_full_handshake_queue_evicts_its_oldest(caplog: pytest.LogCaptureFixture) -> None:
    """Pending handshakes are capped, but a newcomer evicts the oldest rather than being
    refused: idle sockets cannot lock a peer out of the port."""
    listener = await serve(
        "127.0.0.1", 0, node="server", secret=SECRET, schema=SYNC_SCHEMA,
        on_connection=lambda c: asyncio.sleep(0),
        handshake_timeout=TIMEOUT, reply_timeout=TIMEOUT, max_pending=2,
    )  # fmt: skip
    async with listener:
        held = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            assert (await reader.readexactly(5))[4] == 0  # its challenge: a handshake slot
            held.append((reader, writer))
        await _read_to_eof(held[0][0])  # the oldest was dropped for the third (EOF, no timeout)
        assert listener.stats.evicted == 1
        assert "evicting the oldest pending handshake" in caplog.text
        # A real peer gets through a full queue, evicting the (now) oldest idle socket.
        async with await connect(
            "127.0.0.1", listener.port, node="peer", secret=SECRET, schema=SYNC_SCHEMA
        ):
            pass
        await _read_to_eof(held[1][0])
        assert listener.stats.evicted == 2 and listener.stats.authenticated == 1
        for _, w in held:
            w.close()


async def test_a_silent_peer_is_dropped_after_the_reply_timeout() -> None:
    listener = await serve(
        "127.0.0.1", 0, node="server", secret=SECRET, schema=SYNC_SCHEMA,
        on_connection=lambda c: asyncio.sleep(0),
        handshake_timeout=TIMEOUT, reply_timeout=0.2,
    )  # fmt: skip
    async with listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        async with asyncio.timeout(TIMEOUT / 4):  # well before the handshake timeout
            await _read_to_eof(reader)
        writer.close()
        assert listener.stats.auth_failures == 1


async def test_a_peer_connects_through_a_flood_of_idle_connections() -> None:
    """Issue 13 §4 (the sync port): 64 idle sockets reopened as soon as dropped used to take
    every handshake slot, and a real replica was aborted until the flood stopped."""
    listener = await serve(
        "127.0.0.1",
        0,
        node="server",
        secret=SECRET,
        schema=SYNC_SCHEMA,
        on_connection=lambda c: asyncio.sleep(0),
    )
    async with listener:
        stop, opened = threading.Event(), [0]
        flood = threading.Thread(
            target=flood_idle_connections, args=(listener.port, 80, stop, opened)
        )
        flood.start()
        try:
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while opened[0] < 200:  # the slots are full and the flood keeps reopening
                assert asyncio.get_running_loop().time() < deadline, opened
                await asyncio.sleep(0.01)
            for k in range(10):
                async with asyncio.timeout(5.0):
                    conn = await connect(
                        "127.0.0.1",
                        listener.port,
                        node=f"peer{k}",
                        secret=SECRET,
                        schema=SYNC_SCHEMA,
                    )
                await conn.close()
        finally:
            stop.set()
            await asyncio.to_thread(flood.join)
        assert listener.stats.authenticated == 10 and listener.stats.evicted > 0


async def test_listener_binds_port_zero_and_serves_several_clients() -> None:
    async with await _echo_listener() as listener:
        assert listener.port > 0
        conns = [
            await connect(
                "127.0.0.1", listener.port, node=f"c{k}", secret=SECRET, schema=SYNC_SCHEMA
            )
            for k in range(3)
        ]
        for k, conn in enumerate(conns):
            await conn.send(CatalogRequest(k))
        for k, conn in enumerate(conns):
            assert await _recv_n(conn, 1) == [CatalogRequest(k)]
            await conn.close()
        assert listener.stats.authenticated == 3


async def test_listener_close_ends_connections() -> None:
    listener = await _echo_listener()
    conn = await connect("127.0.0.1", listener.port, node="c", secret=SECRET, schema=SYNC_SCHEMA)
    await conn.send(CatalogRequest(1))
    await _recv_n(conn, 1)
    listener.close()
    async with asyncio.timeout(TIMEOUT):
        await listener.wait_closed()
    with pytest.raises(BrokenConnection):
        await _recv_n(conn, 1)
    await conn.close()


async def test_connect_refused_is_broken_connection() -> None:
    listener = await _echo_listener()
    port = listener.port
    listener.close()
    await listener.wait_closed()
    with pytest.raises(BrokenConnection, match="cannot connect"):
        await connect("127.0.0.1", port, node="c", secret=SECRET, schema=SYNC_SCHEMA)


async def test_client_rejects_a_server_that_is_not_ekko() -> None:
    async def bogus(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(bogus, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(AuthError, match="invalid handshake frame"):
            await connect("127.0.0.1", port, node="c", secret=SECRET, schema=SYNC_SCHEMA)
    finally:
        server.close()
        await server.wait_closed()


async def test_client_handshake_sans_io_is_what_connect_runs() -> None:
    """A hand-driven client (sans-IO handshake over raw streams) is accepted like connect()."""
    async with await _echo_listener() as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        dec = FrameDecoder(message_type=HandshakeMessage)
        hs = ClientHandshake(node="manual", secret=SECRET, protocol_version=PROTOCOL_VERSION)
        async with asyncio.timeout(TIMEOUT):
            while not (msgs := dec.feed(await reader.read(4096))):
                pass
            writer.write(encode_frame(hs.receive_challenge(msgs[0])))
            while not (msgs := dec.feed(await reader.read(4096))):
                pass
            hs.receive_ok(msgs[0])
            dec.message_type = Message
            writer.write(encode_frame(CatalogRequest(11)))
            while not (msgs := dec.feed(await reader.read(4096))):
                pass
        assert msgs == [CatalogRequest(11)]
        writer.close()


async def test_a_chunk_sent_to_several_peers_is_encoded_once(encoded: list[str]) -> None:
    """The node's schema names the protocol's shared parts: a responder's Chunk sent on three
    connections is encoded once, and every peer decodes its own response with it."""
    shared = sample_chunk(rows=9, i=3)
    pairs = [memory_pair(schema=SYNC_SCHEMA) for _ in range(3)]
    try:
        for k, (a, _) in enumerate(pairs):
            await a.send(PullResponse(k, 1, [shared]))
        for k, (_, b) in enumerate(pairs):
            async with asyncio.timeout(TIMEOUT):
                got = await b.recv()
            assert got.req_id == k
            assert_same(got.chunks[0], shared)
    finally:
        for a, b in pairs:
            await a.close()
            await b.close()
    assert encoded.count("Chunk") == 1 and encoded.count("PullResponse") == 3
