"""An in-memory connected pair of :class:`~ekko.net.connection.Connection` objects.

Why: tests and single-process simulations need links without sockets, yet with the same
framing, byte accounting and WAN emulation as TCP, so a test that passes here exercises the
same code the network path runs.
"""

from __future__ import annotations

import asyncio

from ekko.net.connection import DEFAULT_WAN_QUEUE_BYTES, Connection
from ekko.net.framing import DEFAULT_MAX_FRAME_BYTES, WireSchema
from ekko.net.wan import WanProfile

DEFAULT_PIPE_BYTES = 1024 * 1024
_READ_CHUNK = 256 * 1024


class _Pipe:
    """One direction of a pair: a bounded byte buffer with EOF, like a socket buffer."""

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._eof = False  # writer closed: reader sees b"" after the buffered data
        self._reader_gone = False  # reader closed: writer gets BrokenPipeError
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def write(self, data: bytes) -> None:
        while True:
            if self._reader_gone:
                raise BrokenPipeError("in-memory peer closed the connection")
            if self._eof:
                raise BrokenPipeError("in-memory pipe closed for writing")
            if len(self._buf) < self._limit:
                break
            self._writable.clear()
            await self._writable.wait()
        self._buf += data
        self._readable.set()

    async def read(self, max_bytes: int) -> bytes:
        while not self._buf and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        if not self._buf:
            return b""
        data = bytes(self._buf[:max_bytes])
        del self._buf[:max_bytes]
        self._writable.set()
        return data

    def close_write(self) -> None:
        self._eof = True
        self._readable.set()
        self._writable.set()

    def close_read(self) -> None:
        self._reader_gone = True
        self._eof = True
        self._buf.clear()
        self._readable.set()
        self._writable.set()


class MemoryStream:
    """A :class:`~ekko.net.connection.ByteStream` over two in-memory pipes.

    Why it mimics TCP: closing makes the peer read EOF after the data already written, and the
    peer's later writes fail with ``BrokenPipeError``, so error typing matches the socket path.
    """

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming

    async def send_all(self, data: bytes) -> None:
        await self._out.write(data)

    async def receive_some(self) -> bytes:
        return await self._in.read(_READ_CHUNK)

    async def aclose(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._out.close_write()
        self._in.close_read()


def memory_pair(
    wan: WanProfile | None = None,
    *,
    schema: WireSchema,
    names: tuple[str, str] = ("a", "b"),
    compress: bool = False,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    buffer_bytes: int = DEFAULT_PIPE_BYTES,
    wan_queue_bytes: int = DEFAULT_WAN_QUEUE_BYTES,
) -> tuple[Connection, Connection]:
    """Two connected Connections; ``wan`` applies to both directions.

    ``names`` are the node names of the two ends: the first connection's ``peer`` is
    ``names[1]`` and the second's is ``names[0]``. No handshake is run (there is no secret to
    check in one process).
    """
    a_to_b, b_to_a = _Pipe(buffer_bytes), _Pipe(buffer_bytes)
    a, b = (
        Connection(
            MemoryStream(out, into),
            peer=peer,
            compress=compress,
            max_frame_bytes=max_frame_bytes,
            wan=wan,
            wan_queue_bytes=wan_queue_bytes,
            schema=schema,
        )
        for out, into, peer in ((a_to_b, b_to_a, names[1]), (b_to_a, a_to_b, names[0]))
    )
    return a, b
