"""Sans-IO frame codec: messages to bytes and bytes back to messages. No sockets here.

Frame layout::

    length  u32 big-endian   payload length on the wire
    flags   u8               bit 0: payload is a zstd frame; other bits must be 0
    payload                  msgpack of one tagged msgspec struct

numpy arrays inside a message travel as a msgpack Ext (code :data:`ARRAY_EXT`) whose data is
``u16 big-endian header length | msgpack [dtype str, shape] | raw C-contiguous buffer`` (the
vLLM v1 ``serial_utils`` idea: dtype + shape + bytes, never pickle). Only the dtypes in
:data:`ALLOWED_DTYPES` cross the wire, little-endian.

Decoded arrays are read-only: they are zero-copy views into the received payload when it is
aligned for their dtype, otherwise aligned copies (also marked read-only, so every decoded
array behaves the same).

:class:`FrameDecoder` keeps the h11 invariant: any bytes, split anywhere, give messages or a
:class:`~ekko.net.errors.RemoteFrameError`, never another exception; after an error it stays in
error.
"""

from __future__ import annotations

import math
import struct
import threading
from typing import Any, NoReturn

import msgspec
import numpy as np
import zstandard

from ekko.net.errors import LocalFrameError, RemoteFrameError
from ekko.protocol.messages import Chunk, Message, PullResponse
from ekko.store.spec import TableSpec

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Largest payload (before and after compression) a frame may carry."""
HANDSHAKE_MAX_FRAME_BYTES = 4096
"""Largest frame before the peer is authenticated (handshake messages are ~150 bytes); such
frames are never compressed, so an unauthenticated peer can make us neither buffer nor
decompress more than this."""

HEADER = struct.Struct(">IB")
HEADER_SIZE = HEADER.size  # 5
FLAG_ZSTD = 0x01
_KNOWN_FLAGS = FLAG_ZSTD
_MAX_LENGTH_FIELD = 2**32 - 1

ARRAY_EXT = 1
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"int64", "int32", "uint8", "uint16", "uint32", "float32", "float16", "int8", "float64"}
)
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<")
    for name in ALLOWED_DTYPES
}
_ARRAY_HEADER_LEN = struct.Struct(">H")
_MAX_NDIM = 32
_ZSTD_LEVEL = 1


class _BadArray(ValueError):
    """An array ext from the wire failed validation (becomes a RemoteFrameError)."""


class _UnsupportedValue(TypeError):
    """A value we were asked to encode has no wire form (becomes a LocalFrameError)."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.generic) and obj.dtype.name in ALLOWED_DTYPES:
        return obj.item()
    raise _UnsupportedValue(f"cannot encode {type(obj).__name__}")


# dtype -> (little-endian wire dtype, its str); ``dtype.name`` is a slow Python property and
# this runs for every array of every chunk. Filled on first use of each allowed dtype.
_WIRE_OF: dict[np.dtype[Any], tuple[np.dtype[Any], str]] = {}


def _wire_of(dtype: np.dtype[Any]) -> tuple[np.dtype[Any], str]:
    hit = _WIRE_OF.get(dtype)
    if hit is None:
        if dtype.kind == "O" or dtype.name not in ALLOWED_DTYPES:
            raise _UnsupportedValue(f"array dtype {dtype} is not allowed on the wire")
        wire = dtype.newbyteorder("<")
        hit = _WIRE_OF[dtype] = (wire, wire.str)
    return hit


def _encode_array(arr: np.ndarray) -> msgspec.msgpack.Ext:
    wire, wire_str = _wire_of(arr.dtype)
    if arr.dtype != wire or not arr.flags.c_contiguous:
        arr = arr.astype(wire, order="C", copy=False)  # keeps 0-d arrays 0-d
    header = _ARRAY_HEADER_ENCODER.encode((wire_str, arr.shape))
    raw = memoryview(arr.reshape(-1)).cast("B")
    return msgspec.msgpack.Ext(
        ARRAY_EXT, b"".join((_ARRAY_HEADER_LEN.pack(len(header)), header, raw))
    )


_ARRAY_HEADER_ENCODER = msgspec.msgpack.Encoder()


_ARRAY_HEADER_DECODER = msgspec.msgpack.Decoder(tuple[str, tuple[int, ...]])


_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int]] = {}
"""Validated array headers seen lately -> (dtype, shape, item count): a chunk's arrays repeat
a few headers (same row count, dim, shard count), and parsing one costs more than the copy
of a small array."""
_HEADERS_MAX = 4096


def _array_header(header: bytes) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    hit = _HEADERS.get(header)
    if hit is not None:
        return hit
    try:
        dtype_str, shape = _ARRAY_HEADER_DECODER.decode(header)
    except msgspec.DecodeError as e:
        raise _BadArray(f"bad array header: {e}") from e
    dtype = _WIRE_DTYPES.get(dtype_str)
    if dtype is None:
        raise _BadArray(f"array dtype {dtype_str!r} is not allowed on the wire")
    if len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
        raise _BadArray(f"bad array shape {shape}")
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    hit = _HEADERS[header] = (dtype, shape, math.prod(shape))
    return hit


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != ARRAY_EXT:
        raise _BadArray(f"unknown msgpack ext code {code}")
    if len(data) < _ARRAY_HEADER_LEN.size:
        raise _BadArray("array ext shorter than its header length")
    (hlen,) = _ARRAY_HEADER_LEN.unpack_from(data, 0)
    start = _ARRAY_HEADER_LEN.size + hlen
    if start > len(data):
        raise _BadArray(f"array header length {hlen} exceeds ext size {len(data)}")
    dtype, shape, count = _array_header(bytes(data[_ARRAY_HEADER_LEN.size : start]))
    nbytes = count * dtype.itemsize
    if nbytes != len(data) - start:
        raise _BadArray(
            f"array {dtype.str}{list(shape)} needs {nbytes} bytes, ext has {len(data) - start}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    if len(shape) != 1:
        arr = arr.reshape(shape)
    if not arr.flags.aligned:
        arr = arr.copy()
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise _BadArray(f"expected {getattr(typ, '__name__', typ)}, got {type(obj).__name__}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


class _PullResponseWire(msgspec.Struct, frozen=True, tag="PullResponse", tag_field="type"):
    """``PullResponse`` with its chunks already encoded: the same bytes on the wire (a test
    holds them equal), so the peer decodes it as a ``PullResponse``."""

    req_id: int
    catalog_version: int
    chunks: list[msgspec.Raw]
    more: bool = False
    tables: list[TableSpec] | None = None
    holds: dict[str, np.ndarray] | None = None
    lineage: int = 0


_CHUNK_CACHE_ENTRIES = 8
_CHUNK_CACHE_BYTES = 32 << 20


def _encoded_chunk(chunk: Chunk) -> msgspec.Raw:
    """``chunk`` encoded, reusing the bytes when this very Chunk object was encoded lately.

    The responder hands every session that pulls the same range at the same store state the
    same (immutable) Chunk, e.g. each DC leader parked on the source's latest write; each of
    those frames then costs a copy instead of an encode. Keyed by identity; the cache holds
    the chunk itself, so an id is never reused while cached. Per thread, bounded in entries
    and bytes."""
    cache: dict[int, tuple[Chunk, bytes]] | None = getattr(_local, "chunks", None)
    if cache is None:
        cache = _local.chunks = {}
        _local.chunk_bytes = 0
    hit = cache.get(id(chunk))
    if hit is not None and hit[0] is chunk:
        return msgspec.Raw(hit[1])
    data = _ENCODER.encode(chunk)
    if len(data) <= _CHUNK_CACHE_BYTES:
        while cache and (
            len(cache) >= _CHUNK_CACHE_ENTRIES
            or _local.chunk_bytes + len(data) > _CHUNK_CACHE_BYTES
        ):
            _local.chunk_bytes -= len(cache.pop(next(iter(cache)))[1])
        cache[id(chunk)] = (chunk, data)
        _local.chunk_bytes += len(data)
    return msgspec.Raw(data)


def _encode_payload(msg: msgspec.Struct) -> bytes:
    if type(msg) is PullResponse and msg.chunks:
        msg = _PullResponseWire(
            msg.req_id,
            msg.catalog_version,
            [_encoded_chunk(c) for c in msg.chunks],
            msg.more,
            msg.tables,
            msg.holds,
            msg.lineage,
        )
    return _ENCODER.encode(msg)


_DECODERS: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_local = threading.local()


def _decoder_for(message_type: Any) -> msgspec.msgpack.Decoder[Any]:
    dec = _DECODERS.get(message_type)
    if dec is None:
        dec = msgspec.msgpack.Decoder(message_type, ext_hook=_ext_hook, dec_hook=_dec_hook)
        _DECODERS[message_type] = dec
    return dec


def _compressor() -> zstandard.ZstdCompressor:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
        _local.cctx = cctx
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = zstandard.ZstdDecompressor()
        _local.dctx = dctx
    return dctx


def encode_frame(
    msg: msgspec.Struct,
    *,
    compress: bool = False,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """Frame one message. ``compress`` uses zstd level 1, kept only when it shrinks the payload.

    Raises :class:`LocalFrameError` if the message holds a value with no wire form (an object
    or non-whitelisted array) or its payload, before compression, exceeds ``max_frame_bytes``
    (the receiver's decompression limit is the same number).
    """
    try:
        payload = _encode_payload(msg)
    except (_UnsupportedValue, TypeError, ValueError, OverflowError) as e:
        raise LocalFrameError(f"cannot encode {type(msg).__name__}: {e}") from e
    limit = min(max_frame_bytes, _MAX_LENGTH_FIELD)
    if len(payload) > limit:
        raise LocalFrameError(
            f"{type(msg).__name__} payload is {len(payload)} bytes, above the frame limit {limit}"
        )
    flags = 0
    if compress and payload:
        packed = _compressor().compress(payload)
        if len(packed) < len(payload):
            payload, flags = packed, FLAG_ZSTD
    return HEADER.pack(len(payload), flags) + payload


class FrameDecoder:
    """Turns a byte stream into messages, with no I/O of its own.

    Why sans-IO: the same decoder runs under TCP, the in-memory pair, and tests that feed it
    arbitrary bytes one at a time. ``message_type`` is the msgspec type (usually a tagged union)
    each payload must decode to; it can be switched between frames (the transport decodes
    handshake messages first, then protocol messages) without losing buffered bytes.
    """

    def __init__(
        self,
        *,
        message_type: Any = Message,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        allow_compressed: bool = True,
    ) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes
        self._allow_compressed = allow_compressed
        self._error: RemoteFrameError | None = None
        self.message_type = message_type

    def set_limits(self, max_frame_bytes: int, allow_compressed: bool) -> None:
        """Change the frame limit and whether compressed frames are accepted, from the next
        frame on (the transport widens them once the peer is authenticated)."""
        self._max = max_frame_bytes
        self._allow_compressed = allow_compressed

    @property
    def message_type(self) -> Any:
        """The type each following frame's payload must decode to."""
        return self._message_type

    @message_type.setter
    def message_type(self, value: Any) -> None:
        self._message_type = value
        self._decoder = _decoder_for(value)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet forming a whole frame (non-zero at EOF = truncated)."""
        return len(self._buf)

    @property
    def error(self) -> RemoteFrameError | None:
        """The error that put this decoder into its error state, if any."""
        return self._error

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; call :meth:`next_message` to take messages out."""
        self._raise_if_failed()
        self._buf += data

    def next_message(self) -> Any | None:
        """The next whole message, or None if more bytes are needed.

        Raises :class:`RemoteFrameError` on bad input, and again on every later call.
        """
        self._raise_if_failed()
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        length, flags = HEADER.unpack_from(buf, 0)
        if flags & ~_KNOWN_FLAGS:
            self._fail(f"unknown frame flags 0x{flags:02x}")
        if flags & FLAG_ZSTD and not self._allow_compressed:
            self._fail("compressed frame before authentication")
        if length > self._max:
            self._fail(f"frame length {length} above the limit {self._max}")
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:  # one copy out of the buffer, not two
            payload = bytes(view[HEADER_SIZE:end])
        del buf[:end]
        if flags & FLAG_ZSTD:
            payload = self._decompress(payload)
        try:
            return self._decoder.decode(payload)
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError) as e:
            self._fail(f"bad message payload: {e}", e)

    def feed(self, data: bytes) -> list[Any]:
        """Buffer ``data`` and return every message it completes (instances of message_type)."""
        self.receive_data(data)
        out = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out

    def _decompress(self, payload: bytes) -> bytes:
        try:
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as e:
            self._fail(f"bad zstd frame header: {e}", e)
        if declared < 0:
            self._fail("zstd frame does not declare its content size")
        if declared > self._max:
            self._fail(f"zstd frame declares {declared} bytes, above the limit {self._max}")
        try:
            out = _decompressor().decompress(
                payload, max_output_size=declared, allow_extra_data=False
            )
        except zstandard.ZstdError as e:
            self._fail(f"bad zstd frame: {e}", e)
        if len(out) != declared:
            self._fail(f"zstd frame gave {len(out)} bytes, declared {declared}")
        return out

    def _fail(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        self._error = RemoteFrameError(reason)
        self._buf.clear()
        raise self._error from cause

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteFrameError(self._error.reason) from self._error
