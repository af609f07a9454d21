"""One message connection over any byte stream: framing, stats, WAN delay line, error typing.

TCP (:mod:`ekko.net.transport`) and the in-memory pair (:mod:`ekko.net.memory`) differ only in
the :class:`ByteStream` underneath, so both share this one async interface and one conformance
suite (trio's ``Stream`` / ``check_two_way_stream`` pattern).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import msgspec

from ekko.net.errors import (
    BrokenConnection,
    ConnectionClosed,
    FrameError,
    RemoteFrameError,
    TransportError,
)
from ekko.net.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HANDSHAKE_MAX_FRAME_BYTES,
    FrameDecoder,
    WireSchema,
    encode_frame,
)
from ekko.net.handshake import Auth, AuthOk, Challenge, HandshakeMessage
from ekko.net.wan import WanLine, WanProfile

log = logging.getLogger("ekko.net")
_HANDSHAKE_TYPES = (Challenge, Auth, AuthOk)

DEFAULT_WAN_QUEUE_BYTES = 16 * 1024 * 1024
"""Bytes a WAN delay line may hold before ``send`` waits. It bounds memory and, with the
delay, throughput: at most ``limit / delay`` bytes/s (16 MiB / 100 ms ≈ 1.3 Gbit/s)."""

DEFAULT_CLOSE_TIMEOUT = 5.0


class ByteStream(Protocol):
    """A reliable, ordered, bidirectional byte stream (a TCP socket or an in-memory pipe).

    ``receive_some`` returns b"" at EOF; both I/O methods raise ``OSError`` when the peer or
    network broke the stream. ``aclose`` is idempotent and makes a pending ``receive_some``
    return b"". ``abort`` drops unsent data and closes at once.
    """

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self) -> bytes: ...

    async def aclose(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class ConnectionStats:
    """A snapshot of one connection's counters.

    Why bytes on the wire (headers included, after compression, handshake included): the
    bandwidth bench measures WAN bytes, and bytes sent on one end then equal bytes received on
    the other. ``wan_queued_bytes`` is what the delay line holds but has not written yet.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    wan_queued_bytes: int = 0


class Connection:
    """An authenticated, framed message connection to one peer.

    Why one class over a :class:`ByteStream`: framing, byte accounting, the WAN delay line and
    the closed/broken error split are the same for every transport. Create it with
    :func:`~ekko.net.transport.connect`, :func:`~ekko.net.transport.serve` or
    :func:`~ekko.net.memory.memory_pair`.

    ``send`` may be called from several tasks (frames never interleave); ``recv`` from one task
    at a time (a lock serialises callers). Errors: :class:`ConnectionClosed` once we closed;
    :class:`BrokenConnection` when the peer closed (``clean=True`` for EOF at a frame boundary)
    or the network failed; :class:`RemoteFrameError` when the peer sent bad bytes, after which
    the connection is closed and the reason logged.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        peer: str,
        compress: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        wan: WanProfile | None = None,
        wan_queue_bytes: int = DEFAULT_WAN_QUEUE_BYTES,
        schema: WireSchema,
        handshake: bool = False,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._stream = stream
        self._peer = peer
        self._compress = compress
        self._max_frame_bytes = max_frame_bytes
        self._schema = schema
        self._decoder = FrameDecoder(
            message_type=schema.message_type, max_frame_bytes=max_frame_bytes
        )
        if handshake:  # unauthenticated: handshake messages only, small frames, never zstd
            self._decoder.message_type = HandshakeMessage
            self._decoder.set_limits(HANDSHAKE_MAX_FRAME_BYTES, allow_compressed=False)
        self._close_timeout = close_timeout
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._closed = False
        self._send_failure: TransportError | None = None
        self._recv_failure: TransportError | None = None
        self._bytes_sent = 0
        self._bytes_received = 0
        self._frames_sent = 0
        self._frames_received = 0
        # WAN delay line: created by the first set_wan with a profile, kept for the
        # connection's life so frames never overtake each other.
        self._wan_queue_limit = wan_queue_bytes
        self._line: WanLine | None = None
        self._wan_queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._wan_bytes = 0
        self._wan_ready = asyncio.Event()  # queue gained a frame, or we closed
        self._wan_space = asyncio.Event()  # queue lost a frame, or we closed/failed
        self._pump: asyncio.Task[None] | None = None
        if wan is not None:
            self.set_wan(wan)

    # -- public interface ------------------------------------------------------------------

    @property
    def peer(self) -> str:
        """The peer's authenticated node name."""
        return self._peer

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the connection shut itself after a bad frame)."""
        return self._closed

    @property
    def wan(self) -> WanProfile | None:
        """The WAN profile applied to frames this side sends (None = sent at once)."""
        return None if self._line is None else self._line.profile

    @property
    def stats(self) -> ConnectionStats:
        """Counters so far (a frozen snapshot)."""
        return ConnectionStats(
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            wan_queued_bytes=self._wan_bytes,
        )

    def set_wan(self, profile: WanProfile | None) -> None:
        """Delay (and rate-limit) frames this side sends from now on. None = no emulation."""
        if self._line is None:
            if profile is not None:
                self._line = WanLine(profile)
        else:  # keep the line (and its queue) so order is preserved
            self._line.set_profile(profile if profile is not None else WanProfile())

    @property
    def schema(self) -> WireSchema:
        """What this connection speaks once authenticated."""
        return self._schema

    async def send(self, msg: msgspec.Struct) -> int:
        """Frame ``msg`` and write it (through the WAN delay line, if any); return the frame's
        size in bytes (what the link carries for it).

        Returns once the frame is written, or, with a WAN profile, queued in the delay line
        (waiting while the line holds more than its byte limit). Raises
        :class:`~ekko.net.errors.LocalFrameError` for a message that cannot be framed.
        """
        return await self._send_struct(msg)

    async def recv(self) -> Any:
        """The next message from the peer (an instance of ``schema.message_type``)."""
        return await self._recv_struct()

    async def close(self) -> None:
        """Close our side. Frames already accepted by ``send`` are still delivered (a WAN line
        drains first, bounded by ``close_timeout``); a pending ``recv`` raises
        :class:`ConnectionClosed`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake_wan()
        if self._pump is not None and not self._pump.done():
            done, _ = await asyncio.wait({self._pump}, timeout=self._close_timeout)
            if not done:
                log.warning("connection to %s: WAN line not drained on close", self._peer)
                self._pump.cancel()
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals shared with the handshake -----------------------------------------------

    def _authenticated(self, peer: str) -> None:
        """The peer is authenticated: decode the schema's messages with the full frame limit."""
        self._decoder.message_type = self._schema.message_type
        self._decoder.set_limits(self._max_frame_bytes, allow_compressed=True)
        self._peer = peer

    def _abort(self) -> None:
        """Close at once, dropping anything unsent (used on auth or frame errors)."""
        self._closed = True
        self._wake_wan()
        if self._pump is not None:
            self._pump.cancel()
        self._stream.abort()

    async def _send_struct(self, msg: msgspec.Struct) -> int:
        self._check_send()
        compress = self._compress and not isinstance(msg, _HANDSHAKE_TYPES)
        frame = encode_frame(
            msg,
            compress=compress,
            max_frame_bytes=self._max_frame_bytes,
            encode_once=self._schema.encode_once,
        )
        if self._line is None:
            async with self._send_lock:
                self._check_send()
                await self._write(frame)
        else:
            await self._enqueue(frame)
        return len(frame)

    async def _recv_struct(self) -> Any:
        async with self._recv_lock:
            while True:
                self._check_recv()
                try:
                    msg = self._decoder.next_message()
                except RemoteFrameError as e:
                    self._on_frame_error(e)
                    raise
                if msg is not None:
                    self._frames_received += 1
                    return msg
                try:
                    data = await self._stream.receive_some()
                except OSError as e:
                    if self._closed:
                        raise ConnectionClosed("connection closed by us") from e
                    err = BrokenConnection(f"connection to {self._peer} broken: {e!r}")
                    self._recv_failure = err
                    raise err from e
                if self._closed:
                    raise ConnectionClosed("connection closed by us")
                if not data:
                    pending = self._decoder.buffered_bytes
                    if pending:
                        reason = f"{self._peer} closed the connection mid-frame ({pending} bytes)"
                    else:
                        reason = f"{self._peer} closed the connection"
                    self._recv_failure = BrokenConnection(reason, clean=not pending)
                    raise self._recv_failure
                self._bytes_received += len(data)
                try:
                    self._decoder.receive_data(data)
                except RemoteFrameError as e:  # pragma: no cover - decoder was not failed
                    self._on_frame_error(e)
                    raise

    def _on_frame_error(self, e: RemoteFrameError) -> None:
        log.warning("closing connection to %s: bad frame: %s", self._peer, e.reason)
        self._recv_failure = e
        self._send_failure = BrokenConnection(
            f"connection to {self._peer} dropped: peer sent a bad frame: {e.reason}"
        )
        self._abort()

    def _check_send(self) -> None:
        if self._send_failure is not None:
            raise _again(self._send_failure)
        if self._closed:
            raise ConnectionClosed("connection closed by us")

    def _check_recv(self) -> None:
        if self._recv_failure is not None:
            raise _again(self._recv_failure)
        if self._closed:
            raise ConnectionClosed("connection closed by us")

    async def _write(self, frame: bytes) -> None:
        try:
            await self._stream.send_all(frame)
        except OSError as e:
            if self._closed and self._send_failure is None:
                raise ConnectionClosed("connection closed by us") from e
            err = BrokenConnection(f"connection to {self._peer} broken: {e!r}")
            self._send_failure = err
            raise err from e
        self._bytes_sent += len(frame)
        self._frames_sent += 1

    # -- WAN delay line ----------------------------------------------------------------------

    def _wake_wan(self) -> None:
        self._wan_ready.set()
        self._wan_space.set()

    async def _enqueue(self, frame: bytes) -> None:
        assert self._line is not None
        while not (
            self._closed
            or self._send_failure is not None
            or self._wan_bytes == 0
            or self._wan_bytes + len(frame) <= self._wan_queue_limit
        ):
            self._wan_space.clear()
            await self._wan_space.wait()
        self._check_send()
        now = asyncio.get_running_loop().time()
        self._wan_queue.append((self._line.delivery_time(now, len(frame)), frame))
        self._wan_bytes += len(frame)
        self._wan_ready.set()
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_pump(), name=f"wan-line-{self._peer}")

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._wan_queue
        while True:
            while not queue:
                if self._closed:
                    return  # closed and drained
                self._wan_ready.clear()
                await self._wan_ready.wait()
            deliver_at, frame = queue[0]
            # The emulated transmission + propagation time; loop again in case a timer fires
            # within the clock resolution before its deadline (delivery is never early).
            while (wait := deliver_at - loop.time()) > 0:
                await asyncio.sleep(wait)
            try:
                async with self._send_lock:
                    await self._write(frame)
            except TransportError:
                queue.clear()
                self._wan_bytes = 0
                self._wake_wan()
                return
            queue.popleft()
            self._wan_bytes -= len(frame)
            self._wan_space.set()


def _again(err: TransportError) -> TransportError:
    """A fresh error of the same type as a stored one, chained to it (no traceback pile-up)."""
    fresh: TransportError
    if isinstance(err, BrokenConnection):
        fresh = BrokenConnection(err.reason, clean=err.clean)
    elif isinstance(err, FrameError):
        fresh = type(err)(err.reason)
    else:
        fresh = type(err)(*err.args)
    fresh.__cause__ = err
    return fresh
