"""Sans-IO frame codec: messages to bytes and bytes back to messages. No sockets here.

Frame layout::

    length  u32 big-endian   payload length on the wire
    flags   u8               bit 0: payload is a zstd frame; other bits must be 0
    payload                  msgpack of one tagged msgspec struct

numpy arrays inside a message travel as dtype + shape + raw buffer (:mod:`ekko.net.arrays`).
The transport knows no protocol: the caller names what a connection speaks in a
:class:`WireSchema` (message type, version, and the immutable parts a sender shares between
frames, which are encoded once and reused — same bytes on the wire).

:class:`FrameDecoder` keeps the h11 invariant: any bytes, split anywhere, give messages or a
:class:`~ekko.net.errors.RemoteFrameError`, never another exception; after an error it stays in
error.
"""

from __future__ import annotations

import struct
import threading
import typing
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import msgspec
import zstandard

from ekko.net.arrays import (
    ALLOWED_DTYPES,
    ARRAY_EXT,
    UnsupportedValue,
    dec_hook,
    enc_hook,
    ext_hook,
)
from ekko.net.errors import LocalFrameError, RemoteFrameError

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
_ZSTD_LEVEL = 1
__all__ = [  # ARRAY_EXT and ALLOWED_DTYPES: the array wire form, re-exported
    "ALLOWED_DTYPES",
    "ARRAY_EXT",
    "DEFAULT_MAX_FRAME_BYTES",
    "FLAG_ZSTD",
    "HANDSHAKE_MAX_FRAME_BYTES",
    "HEADER",
    "HEADER_SIZE",
    "FrameDecoder",
    "WireSchema",
    "encode_frame",
]

_ENCODER = msgspec.msgpack.Encoder(enc_hook=enc_hook)


@dataclass(frozen=True)
class WireSchema:
    """What a connection speaks once its peer is authenticated.

    Why the caller passes it: the transport frames any msgspec-typed message and must not know
    the sync protocol's classes. ``message_type`` is what each frame decodes to (usually a
    tagged union), ``version`` what the handshake checks, and ``encode_once`` the struct types
    whose instances a sender hands unchanged to several frames (the responder's chunks, one per
    store state and range, to every session in step): a message field typed ``list[T]`` with
    ``T`` among them is encoded item by item, reusing an item's bytes when that very object was
    encoded lately — the frame is byte for byte the plain encoding. Such instances must be
    immutable (frozen structs holding arrays nobody writes to).
    """

    message_type: Any
    version: int = 0
    encode_once: tuple[type[msgspec.Struct], ...] = ()


_ONCE_ENTRIES = 8
_ONCE_BYTES = 32 << 20
_local = threading.local()


def _encoded_once(obj: msgspec.Struct) -> msgspec.Raw:
    """``obj`` encoded, reusing the bytes when this very object was encoded lately.

    Keyed by identity; the cache holds the object itself, so an id is never reused while
    cached. Per thread, bounded in entries and bytes."""
    cache: dict[int, tuple[Any, bytes]] | None = getattr(_local, "once", None)
    if cache is None:
        cache = _local.once = {}
        _local.once_bytes = 0
    hit = cache.get(id(obj))
    if hit is not None and hit[0] is obj:
        return msgspec.Raw(hit[1])
    data = _ENCODER.encode(obj)
    if len(data) <= _ONCE_BYTES:
        while cache and (
            len(cache) >= _ONCE_ENTRIES or _local.once_bytes + len(data) > _ONCE_BYTES
        ):
            _local.once_bytes -= len(cache.pop(next(iter(cache)))[1])
        cache[id(obj)] = (obj, data)
        _local.once_bytes += len(data)
    return msgspec.Raw(data)


class _Twin(NamedTuple):
    """A message type's wire twin: same name, tag, field names and defaults (so the same
    bytes), with the shared-part lists typed as already-encoded ``Raw``."""

    cls: Any
    names: tuple[str, ...]
    shared: frozenset[str]


_TWINS: dict[tuple[type, tuple[type, ...]], _Twin | None] = {}


def _twin_of(cls: type, once: tuple[type, ...]) -> _Twin | None:
    key = (cls, once)
    if key in _TWINS:
        return _TWINS[key]
    twin = None
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        fields = msgspec.structs.fields(cls)
        shared = frozenset(
            f.name
            for f in fields
            if typing.get_origin(f.type) is list and typing.get_args(f.type)[0] in once
        )
        if shared:
            twin = _Twin(_define_twin(cls, fields, shared), tuple(f.name for f in fields), shared)
    _TWINS[key] = twin
    return twin


def _define_twin(cls: type, fields: Any, shared: frozenset[str]) -> Any:
    spec: list[Any] = []
    for f in fields:
        typ = list[msgspec.Raw] if f.name in shared else Any
        if f.default is not msgspec.NODEFAULT:
            spec.append((f.name, typ, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            spec.append((f.name, typ, msgspec.field(default_factory=f.default_factory)))
        else:
            spec.append((f.name, typ))
    config = cls.__struct_config__  # type: ignore[attr-defined]
    return msgspec.defstruct(
        cls.__name__,
        spec,
        kw_only=True,
        tag=config.tag,
        tag_field=config.tag_field,
        rename={f.name: f.encode_name for f in fields},
        omit_defaults=config.omit_defaults,
        array_like=config.array_like,
    )


def _encode_payload(msg: msgspec.Struct, once: tuple[type, ...]) -> bytes:
    twin = _twin_of(type(msg), once) if once else None
    if twin is None:
        return _ENCODER.encode(msg)
    values = {
        name: [_encoded_once(item) for item in value] if name in twin.shared else value
        for name, value in zip(twin.names, msgspec.structs.astuple(msg), strict=True)
    }
    return _ENCODER.encode(twin.cls(**values))


_DECODERS: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _decoder_for(message_type: Any) -> msgspec.msgpack.Decoder[Any]:
    dec = _DECODERS.get(message_type)
    if dec is None:
        dec = msgspec.msgpack.Decoder(message_type, ext_hook=ext_hook, dec_hook=dec_hook)
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
    encode_once: tuple[type[msgspec.Struct], ...] = (),
) -> bytes:
    """Frame one message. ``compress`` uses zstd level 1, kept only when it shrinks the payload;
    ``encode_once`` as in :class:`WireSchema`.

    Raises :class:`LocalFrameError` if the message holds a value with no wire form (an object
    or non-whitelisted array) or its payload, before compression, exceeds ``max_frame_bytes``
    (the receiver's decompression limit is the same number).
    """
    try:
        payload = _encode_payload(msg, encode_once)
    except (UnsupportedValue, TypeError, ValueError, OverflowError) as e:
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
        message_type: Any,
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
