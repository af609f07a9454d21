"""Source → replica links for the baselines that send over ``ekko.net`` (push, checkpoint)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ekko.bench.baselines.common import (
    Replica,
    link_bytes,
    open_link,
    replica_receiver,
    serve_links,
)
from ekko.net.connection import Connection


@dataclass
class Link:
    """The source's end of one replica's WAN link, and the replica's listening server."""

    replica: Replica
    conn: Connection
    server: asyncio.Server


async def open_links(
    replicas: list[Replica], on_message: Callable[[Replica, Any], None]
) -> list[Link]:
    """For each replica: listen, connect from the source with the replica's DC ``WanProfile``
    (frames the source sends are delayed and paced), and apply what arrives."""
    links = []
    for r in replicas:

        async def handler(conn: Connection, r: Replica = r) -> None:
            await replica_receiver(r, conn, on_message)

        server = await serve_links(handler)
        port = server.sockets[0].getsockname()[1]
        conn = await open_link("127.0.0.1", port, wan=r.dc.wan, peer=r.name)
        links.append(Link(r, conn, server))
    return links


async def close_links(links: list[Link]) -> dict[str, int]:
    """Close every link and server; return the WAN bytes of each replica's link."""
    out = {}
    for link in links:
        await link.conn.close()
        out[link.replica.name] = link_bytes(link.conn)
    for link in links:
        link.server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await link.server.wait_closed()
    return out
