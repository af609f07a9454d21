"""TCP proxies the harness owns between each node and the peers it dials: the nemesis's links.

Each node runs with a config in which every other node's sync address is a proxy's, so all
sync traffic (pulls, the source's recovery pulls, failover) crosses a proxy here, and a fault
is a change of the proxy's state, not a hook in the product. A link is an unordered pair of
nodes; its state applies to both proxies between them (a dials b, b dials a).

Bytes are never dropped from the middle of a stream (that would model a corrupting network,
not a partition): a direction that is cut stops forwarding and its bytes wait, as TCP's do
while it retransmits, so a connection that outlives the partition carries on, and one whose
peer gives up (request timeouts) is closed by that peer. A connection opened while either
direction is cut gets no answer until both pass (a SYN that does not come back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
QUEUED_CHUNKS = 64  # per direction: a held direction stops reading after this much


@dataclass
class LinkState:
    """What a link does now: directions ``(from, to)`` cut, extra one-way delay, a rate cap."""

    cut: frozenset[tuple[str, str]] = frozenset()
    delay_s: float = 0.0
    rate_bytes_s: float | None = None


class Link:
    """The state of the link between nodes ``a`` and ``b``, awaited by its proxies' pumps.

    Why one object per pair: a partition of a and b must hold both the connections a opened
    to b and those b opened to a (the source dials its replicas when it recovers)."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = sorted((a, b))
        self.state = LinkState()
        self._changed = asyncio.Event()
        self.forwarded = 0  # bytes, both directions, all connections

    @property
    def key(self) -> str:
        return f"{self.a}|{self.b}"

    def set(self, state: LinkState) -> None:
        for src, dst in state.cut:
            if {src, dst} != {self.a, self.b}:
                raise ValueError(f"link {self.key}: cannot cut {src}->{dst}")
        self.state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def heal(self) -> None:
        self.set(LinkState())

    def passes(self, src: str, dst: str) -> bool:
        return (src, dst) not in self.state.cut

    async def wait_passing(self, *directions: tuple[str, str]) -> None:
        while not all(self.passes(s, d) for s, d in directions):
            await self._changed.wait()


@dataclass
class LinkProxy:
    """Listens on ``port`` for ``dialer`` and forwards to ``target``'s real sync address."""

    dialer: str
    target: str
    port: int
    upstream: tuple[str, int]
    link: Link
    host: str = "127.0.0.1"
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        swriter: asyncio.StreamWriter | None = None
        try:
            await self.link.wait_passing((self.dialer, self.target), (self.target, self.dialer))
            try:
                sreader, swriter = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # the target is down: the dialer sees the connection close
            up = asyncio.ensure_future(self._pump(creader, swriter, self.dialer, self.target))
            down = asyncio.ensure_future(self._pump(sreader, cwriter, self.target, self.dialer))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (up, down):
                    t.cancel()
                for t in (up, down):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        finally:
            for w in (cwriter, swriter):
                if w is not None:
                    w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, src: str, dst: str
    ) -> None:
        """Forward one direction: held while it is cut, late by the link's delay, paced at
        its rate. Returns at EOF or a broken socket (the caller closes both sides)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                await queue.put((loop.time(), data))
                if not data:
                    return

        reading = asyncio.ensure_future(read())
        try:
            while True:
                read_at, data = await queue.get()
                await self.link.wait_passing((src, dst))
                late = read_at + self.link.state.delay_s - loop.time()
                if late > 0:
                    await asyncio.sleep(late)  # the emulated wire's delay
                if not data:
                    return
                rate = self.link.state.rate_bytes_s
                if rate:
                    await asyncio.sleep(len(data) / rate)  # the emulated wire's bandwidth
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    return
                self.link.forwarded += len(data)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


class ProxyMesh:
    """Every proxy of a run and the links they share: ``ports[(dialer, target)]`` is where
    ``dialer``'s config says ``target`` listens."""

    def __init__(
        self,
        real: dict[str, tuple[str, int]],
        ports: dict[tuple[str, str], int],
    ) -> None:
        self.links: dict[str, Link] = {}
        self.proxies: list[LinkProxy] = []
        for (dialer, target), port in sorted(ports.items()):
            link = self.link(dialer, target, create=True)
            self.proxies.append(LinkProxy(dialer, target, port, real[target], link))

    def link(self, a: str, b: str, *, create: bool = False) -> Link:
        key = "|".join(sorted((a, b)))
        if key not in self.links:
            if not create:
                raise KeyError(f"no link {key} (links: {sorted(self.links)})")
            self.links[key] = Link(a, b)
        return self.links[key]

    def by_key(self, key: str) -> Link:
        a, b = key.split("|")
        return self.link(a, b)

    async def start(self) -> None:
        for p in self.proxies:
            await p.start()

    async def close(self) -> None:
        for p in self.proxies:
            await p.close()

    def heal_all(self) -> None:
        for link in self.links.values():
            link.heal()
