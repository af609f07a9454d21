"""zstd frames with an integrity header.

Layout (little endian, 16 bytes header then body)::

    magic  b"EKZ"   3 bytes
    method u8       0 = stored (body is the original bytes), 1 = zstd frame
    length u64      length of the original bytes
    crc32  u32      zlib.crc32 of the original bytes

``compress`` stores the data as-is when zstd would not make it smaller (quantised random values
barely shrink, see ENVIRONMENT.md), so a frame never costs more than 16 bytes over its input.

``decompress`` rejects, with :class:`CodecError`: a bad magic or method, a claimed length above
``max_size`` (checked *before* any work), a zstd frame whose own content size differs from the
claimed length (zstd then also refuses to write past it, so a forged frame cannot balloon), a
trailing second frame or junk, and a CRC mismatch of the decompressed bytes.
"""

from __future__ import annotations

import struct
import zlib

import zstandard

from ekko.codec.errors import CodecError

MAGIC = b"EKZ"
METHOD_STORED = 0
METHOD_ZSTD = 1
_HEADER = struct.Struct("<3sBQI")
HEADER_SIZE = _HEADER.size  # 16

_DCTX = zstandard.ZstdDecompressor()
_CCTX: dict[int, zstandard.ZstdCompressor] = {}


def _cctx(level: int) -> zstandard.ZstdCompressor:
    ctx = _CCTX.get(level)
    if ctx is None:
        ctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _CCTX[level] = ctx
    return ctx


def compress(data: bytes, level: int = 1) -> bytes:
    """Wrap ``data`` in a checked frame, zstd-compressed at ``level`` when that helps."""
    raw = bytes(data) if not isinstance(data, bytes) else data
    crc = zlib.crc32(raw)
    body = _cctx(level).compress(raw) if raw else b""
    if len(body) < len(raw):
        return _HEADER.pack(MAGIC, METHOD_ZSTD, len(raw), crc) + body
    return _HEADER.pack(MAGIC, METHOD_STORED, len(raw), crc) + raw


def decompress(data: bytes, *, max_size: int) -> bytes:
    """Open a frame made by :func:`compress`; refuse anything larger than ``max_size`` bytes."""
    if len(data) < HEADER_SIZE:
        raise CodecError(f"frame truncated: {len(data)} bytes, header needs {HEADER_SIZE}")
    magic, method, length, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CodecError(f"bad frame magic {magic!r}")
    if length > max_size:
        raise CodecError(f"frame claims {length} bytes, above max_size {max_size}")
    body = memoryview(data)[HEADER_SIZE:]
    if method == METHOD_STORED:
        if len(body) != length:
            raise CodecError(f"bad stored frame length: body {len(body)}, header {length}")
        out = bytes(body)
    elif method == METHOD_ZSTD:
        try:
            declared = zstandard.frame_content_size(body)
        except zstandard.ZstdError as e:
            raise CodecError(f"bad zstd frame header: {e}") from e
        if declared != length:
            raise CodecError(f"zstd content size {declared} differs from frame length {length}")
        try:
            out = _DCTX.decompress(body, max_output_size=length, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise CodecError(f"corrupted zstd frame: {e}") from e
        if len(out) != length:  # zstd checks this itself; keep the guarantee local
            raise CodecError(f"decompressed {len(out)} bytes, frame length {length}")
    else:
        raise CodecError(f"unknown frame method {method}")
    if zlib.crc32(out) != crc:
        raise CodecError("frame checksum mismatch")
    return out
