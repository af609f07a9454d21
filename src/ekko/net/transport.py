"""TCP transport: ``connect`` and ``serve`` with mutual authentication, over asyncio streams.

Only authenticated peers reach the caller: the listener runs the server side of the handshake
(:mod:`ekko.net.auth`) before ``on_connection`` sees the connection, and drops a peer that
fails it without sending anything beyond the challenge. With TLS (an ``ssl.SSLContext`` from
:mod:`ekko.net.tls` on both ends) the connection is encrypted first, each side checks the
other's certificate against the cluster CA, and the secret handshake then runs inside it:
the node name a peer claims must be the one its certificate is issued to. WAN emulation is
applied per direction by the sender: the client passes its profile to ``connect``, the
listener looks one up by the authenticated peer name with ``wan_for``. The handshakes
themselves are not delayed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ekko.net.auth import ClientHandshake, ServerHandshake
from ekko.net.connection import DEFAULT_WAN_QUEUE_BYTES, Connection
from ekko.net.errors import (
    AuthError,
    BrokenConnection,
    RemoteFrameError,
    TransportError,
)
from ekko.net.framing import DEFAULT_MAX_FRAME_BYTES, WireSchema
from ekko.net.server import TaskServer
from ekko.net.tls import certificate_name, describe_tls_error
from ekko.net.wan import WanProfile

log = logging.getLogger("ekko.net")

_READ_CHUNK = 256 * 1024
_CLOSE_TIMEOUT = 5.0


class TcpStream:
    """A :class:`~ekko.net.connection.ByteStream` over an asyncio ``StreamReader``/``Writer``.

    Why a wrapper: it gives TCP the same four-method shape as the in-memory pipe, sets
    ``TCP_NODELAY`` (small sync messages must not wait for Nagle), and makes close bounded.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = writer.get_extra_info("peername")
        self.address = f"{peername[0]}:{peername[1]}" if peername else "?"

    async def send_all(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise BrokenPipeError("TCP transport is closing")
        self._writer.write(data)
        await self._writer.drain()

    async def receive_some(self) -> bytes:
        return await self._reader.read(_READ_CHUNK)

    async def aclose(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self.abort()

    def abort(self) -> None:
        self._writer.transport.abort()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """The server side of a TLS handshake on this accepted connection. Call it before
        anything awaits: bytes read before the switch would not reach TLS. Raises AuthError
        (the client's certificate or TLS itself refused) or BrokenConnection."""
        try:
            await self._writer.start_tls(context)
        except ssl.SSLError as e:
            raise AuthError(f"TLS handshake failed: {describe_tls_error(e)}") from e
        except OSError as e:
            raise BrokenConnection(
                f"the client hung up in the TLS handshake ({e!r}): it does not trust our "
                "certificate (another CA?), or it gave up"
            ) from e

    def certificate_name(self) -> str | None:
        """The node the peer's verified TLS certificate names (None without TLS)."""
        return certificate_name(self._writer.get_extra_info("peercert"))


def _check_certificate(claimed: str, cert_name: str | None, who: str) -> None:
    """With TLS, a peer is the node its certificate names, whatever secret it holds."""
    if cert_name != claimed:
        raise AuthError(
            f"{who} claims node {claimed!r} but its TLS certificate is issued to {cert_name!r}"
        )


async def _client_handshake(
    conn: Connection, hs: ClientHandshake, stream: TcpStream, tls: bool
) -> None:
    try:
        challenge = await conn._recv_struct()
    except BrokenConnection as e:
        if tls:  # TLS 1.3: the server judges our certificate after our side of the handshake
            raise AuthError(
                f"server closed the connection before its challenge ({e.reason}): it refused "
                "our TLS certificate (not from its cluster CA?), or it is shedding handshakes"
            ) from e
        raise BrokenConnection(
            f"server closed the connection before the handshake completed ({e.reason}), "
            "before its challenge: not an ekko node, or it is shedding pending handshakes"
        ) from e
    except RemoteFrameError as e:
        raise AuthError(f"server sent an invalid handshake frame: {e.reason}") from e
    try:
        auth = hs.receive_challenge(challenge)
        if tls:
            assert hs.peer is not None
            _check_certificate(hs.peer, stream.certificate_name(), "server")
        await conn._send_struct(auth)
        hs.receive_ok(await conn._recv_struct())
    except BrokenConnection as e:
        # Refused after our proof, or evicted while it was on its way: both close unanswered.
        mismatch = "wrong secret or protocol version mismatch"
        if tls:
            mismatch += ", a node name our TLS certificate is not issued to"
        raise AuthError(
            f"server closed the connection before the handshake completed ({e.reason}): "
            f"{mismatch}, or it evicted this pending handshake (see its log: 'evicting')"
        ) from e
    except RemoteFrameError as e:
        raise AuthError(f"server sent an invalid handshake frame: {e.reason}") from e
    assert hs.peer is not None
    conn._authenticated(hs.peer)


async def _server_handshake(
    conn: Connection, hs: ServerHandshake, reply_timeout: float, stream: TcpStream, tls: bool
) -> str:
    await conn._send_struct(hs.start())
    try:
        async with asyncio.timeout(reply_timeout):
            msg = await conn._recv_struct()
    except TimeoutError:
        raise AuthError(f"no reply to the challenge within {reply_timeout} s") from None
    except BrokenConnection as e:
        raise AuthError(f"client closed the connection during the handshake ({e.reason})") from e
    except RemoteFrameError as e:
        raise AuthError(f"client sent an invalid handshake frame: {e.reason}") from e
    ok = hs.receive_auth(msg)
    assert hs.peer is not None
    if tls:
        _check_certificate(hs.peer, stream.certificate_name(), "client")
    # Switch before sending AuthOk: the client may answer with data at once.
    conn._authenticated(hs.peer)
    await conn._send_struct(ok)
    return hs.peer


async def connect(
    host: str,
    port: int,
    *,
    node: str,
    secret: bytes,
    schema: WireSchema,
    wan: WanProfile | None = None,
    compress: bool = False,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    timeout: float = 5.0,
    wan_queue_bytes: int = DEFAULT_WAN_QUEUE_BYTES,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> Connection:
    """Open a TCP connection to an ekko listener and authenticate both ways; then it speaks
    ``schema`` (whose version the handshake checks).

    With ``tls`` (a client context of :class:`~ekko.net.tls.TlsFiles`) the server's
    certificate must be valid for ``server_name`` (the node we mean to reach; ``host`` when
    None) and issued to the node its challenge names. ``timeout`` bounds connecting and the
    handshakes together. Raises :class:`~ekko.net.errors.AuthError` (wrong secret, version
    mismatch, not an ekko peer, a certificate refused either way) or
    :class:`~ekko.net.errors.BrokenConnection` (refused, unreachable, timed out).
    """
    hs = ClientHandshake(node=node, secret=secret, protocol_version=schema.version)
    conn: Connection | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=(server_name or host) if tls else None
                )
            except ssl.SSLError as e:
                raise AuthError(
                    f"TLS handshake with {host}:{port} failed: {describe_tls_error(e)}"
                ) from e
            except OSError as e:
                raise BrokenConnection(f"cannot connect to {host}:{port}: {e}") from e
            stream = TcpStream(reader, writer)
            conn = Connection(
                stream,
                peer=f"{host}:{port}",
                compress=compress,
                max_frame_bytes=max_frame_bytes,
                wan_queue_bytes=wan_queue_bytes,
                schema=schema,
                handshake=True,
            )
            await _client_handshake(conn, hs, stream, tls is not None)
    except TimeoutError as e:
        if conn is not None:
            conn._abort()
        raise BrokenConnection(f"connect to {host}:{port} timed out after {timeout} s") from e
    except TransportError:
        if conn is not None:
            conn._abort()
        raise
    conn.set_wan(wan)
    return conn


@dataclass(frozen=True)
class ListenerStats:
    """Counters of a listener. Why: refused peers are logged *and* counted, never silent."""

    accepted: int = 0
    authenticated: int = 0
    auth_failures: int = 0  # refused: failed, malformed or too slow handshakes (incl. evicted)
    evicted: int = 0  # pending handshakes dropped to admit a newer connection
    handler_errors: int = 0
    active: int = 0


class Listener(TaskServer):
    """A TCP server accepting authenticated ekko connections.

    Why an object rather than a bare ``asyncio.Server``: it owns the per-connection tasks (so
    ``close`` ends them), exposes the bound ``port`` (port 0 works) and counts refusals.

    Pending handshakes are bounded (``max_pending``). When all slots are taken, the OLDEST
    pending one is evicted rather than the newcomer refused: a real peer answers the challenge
    within a round trip, so idle connections, however many and however often reopened, can
    only push each other out, never lock a peer out of the port. A reply to the challenge must
    arrive within ``reply_timeout``; the whole handshake within ``handshake_timeout``, the TLS
    handshake (with ``tls``: a server context requiring client certificates) included.
    """

    def __init__(
        self,
        *,
        node: str,
        secret: bytes,
        schema: WireSchema,
        on_connection: Callable[[Connection], Awaitable[None]],
        wan_for: Callable[[str], WanProfile | None],
        compress: bool,
        max_frame_bytes: int,
        handshake_timeout: float,
        wan_queue_bytes: int,
        max_pending: int,
        reply_timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not secret:
            raise ValueError("secret must be non-empty bytes")
        super().__init__()
        self._node = node
        self._secret = secret
        self._schema = schema
        self._on_connection = on_connection
        self._wan_for = wan_for
        self._compress = compress
        self._max_frame_bytes = max_frame_bytes
        self._handshake_timeout = handshake_timeout
        self._wan_queue_bytes = wan_queue_bytes
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._max_pending = max_pending
        self._reply_timeout = reply_timeout
        self._tls = tls
        # Connections still in the handshake, oldest first, with when they arrived.
        self._pending: dict[Connection, float] = {}
        self._evicted: set[Connection] = set()
        self._counts = {"authenticated": 0, "auth_failures": 0, "evicted": 0, "handler_errors": 0}

    @property
    def stats(self) -> ListenerStats:
        return ListenerStats(**self._counts, accepted=self._accepted, active=len(self._tasks))

    def _evict_oldest(self, newcomer: str) -> None:
        conn, since = next(iter(self._pending.items()))
        del self._pending[conn]
        self._evicted.add(conn)
        self._counts["evicted"] += 1
        log.warning(
            "evicting the oldest pending handshake (%s, %.2f s without completing) to admit %s: "
            "%d handshakes pending (max_pending)",
            conn.peer, time.monotonic() - since, newcomer, self._max_pending,
        )  # fmt: skip
        conn._abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = TcpStream(reader, writer)
        if len(self._pending) >= self._max_pending:
            self._evict_oldest(stream.address)
        conn = Connection(
            stream,
            peer=f"unauthenticated {stream.address}",
            compress=self._compress,
            max_frame_bytes=self._max_frame_bytes,
            wan_queue_bytes=self._wan_queue_bytes,
            schema=self._schema,
            handshake=True,
        )
        try:
            self._pending[conn] = time.monotonic()
            tls = in_tls = self._tls is not None
            try:
                async with asyncio.timeout(self._handshake_timeout):
                    if self._tls is not None:
                        await stream.start_tls(self._tls)
                    in_tls = False
                    hs = ServerHandshake(
                        node=self._node, secret=self._secret, protocol_version=self._schema.version
                    )
                    peer = await _server_handshake(conn, hs, self._reply_timeout, stream, tls)
            except (TransportError, TimeoutError) as e:
                self._counts["auth_failures"] += 1
                if conn in self._evicted:
                    return  # logged and counted when evicted
                reason = str(e)
                if isinstance(e, TimeoutError):
                    reason = (
                        "TLS handshake timed out (a client without TLS?)"
                        if in_tls
                        else "handshake timed out"
                    )
                log.warning("refusing %s: %s", stream.address, reason)
                conn._abort()
                return
            finally:
                self._pending.pop(conn, None)
                self._evicted.discard(conn)
            self._counts["authenticated"] += 1
            conn.set_wan(self._wan_for(peer))
            try:
                await self._on_connection(conn)
            except TransportError as e:
                log.info("connection to %s ended: %s: %s", peer, type(e).__name__, e)
            except Exception:
                self._counts["handler_errors"] += 1
                log.exception("connection handler for %s failed", peer)
        finally:
            await conn.close()


async def serve(
    host: str,
    port: int,
    *,
    node: str,
    secret: bytes,
    schema: WireSchema,
    on_connection: Callable[[Connection], Awaitable[None]],
    wan_for: Callable[[str], WanProfile | None] = lambda peer: None,
    compress: bool = False,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    handshake_timeout: float = 5.0,
    wan_queue_bytes: int = DEFAULT_WAN_QUEUE_BYTES,
    max_pending: int = 64,
    reply_timeout: float = 1.0,
    tls: ssl.SSLContext | None = None,
) -> Listener:
    """Listen on ``host:port`` (0 = any free port, see ``Listener.port``); authenticated peers
    speak ``schema`` (whose version the handshake checks).

    Each accepted peer must complete the handshake within ``handshake_timeout``; then
    ``on_connection(conn)`` runs in its own task and the connection is closed when it returns.
    ``wan_for(peer_name)`` gives the WAN profile for frames this side sends to that peer.
    At most ``max_pending`` peers may be in the handshake at once; a newcomer evicts the
    oldest, and a peer must answer the challenge within ``reply_timeout`` (before
    authentication a frame is at most ``HANDSHAKE_MAX_FRAME_BYTES``, never zstd). With
    ``tls`` (a server context requiring client certificates from the cluster CA) every
    connection is TLS, and a peer must claim the node its certificate is issued to.
    """
    listener = Listener(
        node=node,
        secret=secret,
        schema=schema,
        on_connection=on_connection,
        wan_for=wan_for,
        compress=compress,
        max_frame_bytes=max_frame_bytes,
        handshake_timeout=handshake_timeout,
        wan_queue_bytes=wan_queue_bytes,
        max_pending=max_pending,
        reply_timeout=reply_timeout,
        tls=tls,
    )
    await listener._start(host, port)
    return listener
