"""The node's HTTP server: deadlines on request heads, leftover bodies and idle connections,
and the connection cap, on a real uvicorn socket with short timeouts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.node.http_server import EmbeddedServer, http_server

HEAD_S = 0.6
IDLE_S = 0.4
GRACE_S = 0.5
BIG = 32 << 20  # more than the kernel's socket buffers hold, both ends together


async def _slow(request: Request) -> Response:
    await request.app.state.release.wait()
    return JSONResponse({"ok": True})


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def _big(request: Request) -> Response:
    return Response(bytes(BIG), media_type="application/octet-stream")


@pytest.fixture
async def server() -> AsyncIterator[tuple[EmbeddedServer, int, Starlette]]:
    ok = Route("/ok", _ok, methods=["GET", "POST"])
    app = Starlette(routes=[ok, Route("/slow", _slow), Route("/big", _big)])
    app.state.release = asyncio.Event()
    srv = http_server(
        app,
        header_timeout_s=HEAD_S,
        idle_timeout_s=IDLE_S,
        max_connections=3,
        shutdown_grace_s=GRACE_S,
    )
    sock = socket.create_server(("127.0.0.1", 0))
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the server never started"
        await asyncio.sleep(0.01)  # uvicorn sets a flag, no event; bounded by the deadline
    app.state.serving = task
    yield srv, sock.getsockname()[1], app
    srv.should_exit = True
    await task


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (reading and discarding)."""
    t0 = time.monotonic()
    async with asyncio.timeout(limit):
        while await reader.read(65536):
            pass
    return time.monotonic() - t0


async def test_a_silent_connection_is_closed_at_the_head_deadline(server) -> None:
    _, port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    took = await _closed_after(reader, HEAD_S + 2)
    assert HEAD_S * 0.8 < took < HEAD_S + 1
    writer.close()


async def _drip_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, limit: float
) -> float:
    """Send ``data`` a byte every 20 ms (the attacker's pace, the subject of these tests);
    seconds until the server closed the connection."""
    t0 = time.monotonic()
    async with asyncio.timeout(limit):
        for byte in data:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                break
            if await _eof_now(reader):
                break
            await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def _eof_now(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(0.001):
            return await reader.read(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_deadline(server) -> None:
    _, port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
    took = await _drip_until_closed(reader, writer, head, HEAD_S + 2)
    assert HEAD_S * 0.8 < took < HEAD_S + 1
    writer.close()


async def test_a_body_dripping_after_the_answer_is_cut(server) -> None:
    """The handler answered without reading the body; the client keeps sending it slowly."""
    _, port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /ok HTTP/1.1\r\nHost: x\r\ncontent-length: 100000\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    took = await _drip_until_closed(reader, writer, b"x" * 100_000, HEAD_S + 2)
    assert took < HEAD_S + 1
    writer.close()


async def test_a_slow_handler_is_not_cut_and_idle_keepalive_closes(server) -> None:
    _, port, app = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert not await _eof_after(reader, HEAD_S * 2)  # well past the head deadline: still open
    app.state.release.set()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    took = await _closed_after(reader, IDLE_S + HEAD_S + 2)
    assert took < min(IDLE_S, HEAD_S) + 1
    writer.close()


async def _eof_after(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(1) == b""
    except TimeoutError:
        return False


async def test_connections_over_the_cap_are_answered_503(server) -> None:
    _, port, _ = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 503")
    for _, w in [*held, (reader, writer)]:
        w.close()


async def test_the_server_stops_within_its_grace_while_a_client_reads_no_answer(server) -> None:
    """A client that asked for a large answer and reads none of it: uvicorn waited for its
    connection to close, for ever, and the node never exited on SIGTERM."""
    srv, port, app = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 5
    while not any(c.transport.get_write_buffer_size() for c in srv.server_state.connections):
        assert time.monotonic() < deadline, "the answer never stalled"
        await asyncio.sleep(0.05)  # polling the server's state, bounded by the deadline
    t0 = time.monotonic()
    srv.should_exit = True
    await asyncio.wait_for(asyncio.shield(app.state.serving), GRACE_S + 2)
    assert time.monotonic() - t0 < GRACE_S + 1
    assert not srv.server_state.connections
    writer.close()
