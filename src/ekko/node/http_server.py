"""The node's HTTP server: uvicorn inside the node's event loop, with deadlines and a cap.

uvicorn alone closes a keep-alive connection only after a response, so a connection that
never sends a request is held forever, and every byte that arrives restarts its keep-alive
timer, so a client sending a header byte a second is held for as long as it likes.
``DeadlineProtocol`` adds the missing deadline: whenever no request is being served (the
connection just opened, or a response was sent), the next request's headers must be complete
within ``header_timeout_s`` or the connection is closed; a body the handler never read, still
trickling in after its response, counts as no request. Bodies a handler reads are bounded in
size and time there (``ekko.net.httpkit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_INCOMPLETE_HEADERS = 16 << 10
"""Bytes of a request head h11 buffers before answering 400 (uvicorn's default is larger)."""
SHUTDOWN_GRACE_S = 5.0
"""On shutdown, how long answers being sent (and write streams) get to finish."""
UPGRADE_KEY = "ekko.connection"
"""Where a request's ``scope["state"]`` holds the ``DeadlineProtocol`` serving it (``switch``)."""


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: the node, not uvicorn, owns the signals.

    With TLS it also bounds each connection's TLS handshake by ``tls_handshake_timeout_s``
    (the header deadline): uvicorn leaves asyncio's 60 s, the HTTP protocol (its deadline and
    ``limit_concurrency``) sees a connection only once the handshake is done, so a client
    that opens TLS connections and never finishes them held each for a minute, uncounted.

    Shutdown is bounded too (``shutdown_grace_s``): uvicorn waits for every connection to
    close, and a connection closes only once what was written to it is sent, so one client
    that read none of its answer (a large response, or a write stream's answers) kept the
    node from ever exiting on SIGTERM. After the grace the connections still open are cut
    (their requests see a disconnect and end; one that does not is cancelled).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        tls_handshake_timeout_s: float = 10.0,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
    ) -> None:
        super().__init__(config)
        self.tls_handshake_timeout_s = tls_handshake_timeout_s
        self.shutdown_grace_s = shutdown_grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            async with asyncio.timeout(self.shutdown_grace_s):
                await super().shutdown(sockets)
        except TimeoutError:
            state = self.server_state
            log.warning(
                "stopping: %d connection(s) still sending answers after %.1f s (their clients "
                "read none): cut",
                len(state.connections),
                self.shutdown_grace_s,
            )
            for connection in list(state.connections):
                connection.transport.abort()  # its request sees a disconnect and ends
            if state.tasks:
                _, late = await asyncio.wait(list(state.tasks), timeout=1.0)
                for task in late:
                    task.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if config.ssl is None or sockets is None:
            await super().startup(sockets)
            return
        # uvicorn's startup for given sockets, with the handshake bounded (lifespan is off).
        await self.lifespan.startup()
        loop = asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        self.servers = [
            await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self.tls_handshake_timeout_s,
            )
            for sock in sockets
        ]
        self.started = True


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers.

    Why: see the module docstring; without it one slow client per socket holds the port.
    The deadline runs from the connection's start and again from each response's end, so
    an idle connection is also closed (after the keep-alive timeout, or this, whichever is
    first); it never cuts a request whose handler is still running. ``header_timeout_s`` is
    set by ``deadline_protocol``.
    """

    header_timeout_s = 10.0
    timed_out = 0  # connections closed by the deadline, across the process

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._switched = False
        self.app_state = {**self.app_state, UPGRADE_KEY: self}  # each request's scope["state"]

    def switch(
        self, protocol: asyncio.BaseProtocol, upgrade: str, headers: Mapping[str, str]
    ) -> None:
        """Answer the request being served ``101 Switching Protocols`` (``Upgrade: upgrade``,
        and ``headers``) and hand the connection to ``protocol``.

        Why here: uvicorn switches protocols for WebSockets only. A handler that has checked
        the request (its role and signature, by the app's middleware like any route) calls
        this, then serves ``protocol`` until the connection closes; uvicorn sends nothing
        more on it, and closes it on shutdown like any connection."""
        cycle = self.cycle
        if cycle is None or cycle.response_started or self._switched:
            raise RuntimeError("switch: no request is waiting for its answer on this connection")
        self._disarm()
        self._switched = True
        cycle.disconnected = True  # uvicorn's answer to the request: none
        cycle.response_complete = True
        lines = ["HTTP/1.1 101 Switching Protocols", "connection: upgrade", f"upgrade: {upgrade}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        trailing, _ = self.conn.trailing_data
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        closed = getattr(protocol, "closed", None)
        if isinstance(closed, asyncio.Future):
            closed.add_done_callback(lambda _: self.connections.discard(self))
        if trailing:
            _feed(protocol, bytes(trailing))
        self.transport.resume_reading()

    def shutdown(self) -> None:
        if self._switched:
            self.transport.close()  # the switched-to protocol ends with its connection
            return
        super().shutdown()

    def _unsupported_upgrade_warning(self) -> None:
        pass  # a route that does not switch answers the request as HTTP; nothing to warn of

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        """A request's headers are in and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._disarm()  # the handler runs; a body it reads is bounded where it is read

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expire(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and not self._serving():
            type(self).timed_out += 1
            self.transport.close()


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``protocol`` bytes that arrived before it took the connection over."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))
            if not len(buf):
                return  # it takes no more (asyncio would close the connection): drop the rest
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


def deadline_protocol(header_timeout_s: float) -> type[DeadlineProtocol]:
    """``DeadlineProtocol`` with this header deadline (uvicorn builds protocols from a class)."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"header_timeout_s": header_timeout_s})


def http_server(
    app: ASGIApp,
    *,
    header_timeout_s: float,
    idle_timeout_s: float,
    max_connections: int,
    tls: ssl.SSLContext | None = None,
    shutdown_grace_s: float = SHUTDOWN_GRACE_S,
) -> EmbeddedServer:
    """The server for a node's admin/serving app. Over ``max_connections`` open connections
    (or requests in flight) uvicorn answers 503. With ``tls`` (a server context of
    ``ekko.net.tls.TlsFiles``) it serves https only. Stopping, it gives answers being sent
    ``shutdown_grace_s``, then cuts their connections."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        http=deadline_protocol(header_timeout_s),
        timeout_keep_alive=idle_timeout_s,  # type: ignore[arg-type]  (call_later takes float)
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_INCOMPLETE_HEADERS,
        ssl_context_factory=None if tls is None else (lambda _config, _default: tls),
    )
    return EmbeddedServer(
        config, tls_handshake_timeout_s=header_timeout_s, shutdown_grace_s=shutdown_grace_s
    )


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening socket whose accepted connections get TCP_NODELAY from asyncio.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP, and
    ``socket.create_server`` leaves it 0; uvicorn then writes a response's head and body in
    two sends, Nagle holds the body for the client's delayed ACK, and every request took
    44 ms on an idle server (measured with ``ekko bench serve``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock
