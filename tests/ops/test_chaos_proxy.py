"""The harness's link proxies over real loopback sockets: bytes pass in order; a partition
holds them (and a new connection) until it heals, then they arrive intact; a one-way cut
holds one direction only; delay and rate slow a link by what they say."""

from __future__ import annotations

import asyncio
import time

import pytest

from ekko.ops.chaos.proxy import LinkState, ProxyMesh
from ekko.ops.cluster_init import free_ports

DEADLINE_S = 5.0
QUIET_S = 0.3  # "nothing arrives": a read that must time out


class Echo:
    """A server that echoes every byte; counts its connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()


async def _mesh() -> tuple[ProxyMesh, Echo, int]:
    echo = Echo()
    port = await echo.start()
    (proxy_port,) = free_ports(1)
    mesh = ProxyMesh({"up": ("127.0.0.1", port)}, {("down", "up"): proxy_port})
    await mesh.start()
    return mesh, echo, proxy_port


async def _read_exactly(r: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(r.readexactly(n), DEADLINE_S)


async def _until(cond, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # polling the server's state, bounded by the deadline


async def test_bytes_pass_in_order_both_ways() -> None:
    mesh, _echo, port = await _mesh()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    payload = bytes(range(256)) * 1000
    w.write(payload)
    assert await _read_exactly(r, len(payload)) == payload
    assert mesh.link("down", "up").forwarded == 2 * len(payload)
    w.close()
    await mesh.close()


async def test_a_partition_holds_bytes_until_it_heals_then_they_arrive_intact() -> None:
    mesh, _echo, port = await _mesh()
    link = mesh.link("up", "down")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"before")
    assert await _read_exactly(r, 6) == b"before"
    link.set(LinkState(cut=frozenset({("down", "up"), ("up", "down")})))
    w.write(b"during the partition")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.readexactly(1), QUIET_S)
    link.heal()
    assert await _read_exactly(r, 20) == b"during the partition"
    w.close()
    await mesh.close()


async def test_a_connection_opened_during_a_partition_reaches_the_target_after_the_heal() -> None:
    mesh, echo, port = await _mesh()
    link = mesh.link("down", "up")
    link.set(LinkState(cut=frozenset({("down", "up"), ("up", "down")})))
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"syn")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.readexactly(1), QUIET_S)
    assert echo.accepted == 0
    link.heal()
    assert await _read_exactly(r, 3) == b"syn"
    assert echo.accepted == 1
    w.close()
    await mesh.close()


async def test_a_one_way_cut_holds_one_direction_only() -> None:
    mesh, echo, port = await _mesh()
    link = mesh.link("down", "up")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"x")
    assert await _read_exactly(r, 1) == b"x"
    # the answers (up -> down) are cut; the requests still reach the echo server
    link.set(LinkState(cut=frozenset({("up", "down")})))
    w.write(b"ping")
    await _until(lambda: link.forwarded >= 2 + 4, "the request to cross")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.readexactly(1), QUIET_S)
    link.heal()
    assert await _read_exactly(r, 4) == b"ping"
    assert echo.accepted == 1
    w.close()
    await mesh.close()


async def test_delay_and_rate_slow_the_link_by_what_they_say() -> None:
    mesh, _echo, port = await _mesh()
    link = mesh.link("down", "up")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    link.set(LinkState(delay_s=0.1))
    started = time.monotonic()
    w.write(b"ping")
    assert await _read_exactly(r, 4) == b"ping"
    assert time.monotonic() - started >= 0.2  # one-way delay, both ways
    link.set(LinkState(rate_bytes_s=200_000))
    started = time.monotonic()
    w.write(b"\0" * 40_000)
    await _read_exactly(r, 40_000)
    assert time.monotonic() - started >= 0.2 * 0.9  # 40 kB each way at 200 kB/s
    w.close()
    await mesh.close()


async def test_a_cut_names_only_the_links_own_directions() -> None:
    mesh, _echo, _port = await _mesh()
    with pytest.raises(ValueError, match=r"link down\|up: cannot cut down->other"):
        mesh.link("down", "up").set(LinkState(cut=frozenset({("down", "other")})))
    with pytest.raises(KeyError, match="no link"):
        mesh.link("down", "other")
    await mesh.close()
