"""The admin API's accepted connections have TCP_NODELAY (else every response waits ~40 ms
for the client's delayed ACK: head and body leave in two sends)."""

from __future__ import annotations

import asyncio
import socket

from ekko.node.http_server import tcp_listener


async def test_accepted_admin_connections_have_nodelay() -> None:
    listener = tcp_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    seen: asyncio.Queue[int] = asyncio.Queue()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.put_nowait(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_conn, sock=listener)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(seen.get(), 5) != 0
    writer.close()
    server.close()
    await server.wait_closed()
