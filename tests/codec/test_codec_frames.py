"""zstd frames: round trip, corruption detected, decompression bombs refused."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.codec import CodecError, compress, decompress
from ekko.codec.frames import HEADER_SIZE, MAGIC, METHOD_STORED, METHOD_ZSTD

payloads = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, 5000).map(lambda n: b"\0" * n),
    st.integers(1, 300).map(lambda n: bytes(range(256)) * n),
)


@settings(max_examples=200, deadline=None)
@given(payloads, st.integers(1, 5))
def test_roundtrip(data: bytes, level: int) -> None:
    frame = compress(data, level)
    assert len(frame) <= len(data) + HEADER_SIZE  # incompressible data is stored
    assert decompress(frame, max_size=len(data)) == data


def test_compressible_data_is_compressed() -> None:
    data = np.zeros(100_000, dtype=np.int64).tobytes()
    frame = compress(data)
    assert frame[3] == METHOD_ZSTD
    assert len(frame) < len(data) // 50
    rand = np.random.default_rng(0).bytes(10_000)
    assert compress(rand)[3] == METHOD_STORED


@settings(max_examples=300, deadline=None)
@given(payloads, st.data())
def test_a_byte_flip_never_yields_other_bytes(data: bytes, draw: st.DataObject) -> None:
    """A flipped byte is refused, or the frame still opens to exactly the original bytes.

    Not every flip can be refused: bit 4 of a zstd frame header descriptor is unused (RFC 8878
    §3.1.1.1.1, decoders must ignore it), so flipping it changes nothing decoded (hypothesis
    found 18 zero bytes with frame byte 20 XOR 16). What must hold is that no flip ever hands
    the caller different bytes."""
    frame = bytearray(compress(data))
    i = draw.draw(st.integers(0, len(frame) - 1))
    frame[i] ^= draw.draw(st.integers(1, 255))
    try:
        out = decompress(bytes(frame), max_size=len(data) + 10)
    except CodecError:
        return
    assert out == data


def test_the_unused_zstd_header_bit_changes_nothing() -> None:
    data = bytes(18)
    frame = bytearray(compress(data))
    assert frame[3] == METHOD_ZSTD
    frame[HEADER_SIZE + 4] ^= 0x10  # the descriptor's unused bit
    assert decompress(bytes(frame), max_size=len(data)) == data


@settings(max_examples=200, deadline=None)
@given(payloads, st.data())
def test_truncation_and_trailing_bytes_detected(data: bytes, draw: st.DataObject) -> None:
    frame = compress(data)
    cut = draw.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(CodecError):
        decompress(frame[:cut], max_size=len(data) + 10)
    with pytest.raises(CodecError):
        decompress(frame + draw.draw(st.binary(min_size=1, max_size=8)), max_size=len(data) + 10)


def test_claimed_size_above_max_is_refused() -> None:
    data = b"x" * 5000
    with pytest.raises(CodecError, match="above max_size"):
        decompress(compress(data), max_size=4999)


def test_forged_header_bomb_is_refused() -> None:
    """A header claiming a small size over a zstd body that expands to 64 MiB is refused
    without decompressing it (the frame's own content size must match the claim)."""
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * (64 << 20))
    assert len(bomb) < 10_000
    small = struct.pack("<3sBQI", MAGIC, METHOD_ZSTD, 1000, zlib.crc32(b"\0" * 1000))
    with pytest.raises(CodecError):
        decompress(small + bomb, max_size=1 << 20)
    honest = struct.pack("<3sBQI", MAGIC, METHOD_ZSTD, 64 << 20, 0)
    with pytest.raises(CodecError, match="above max_size"):
        decompress(honest + bomb, max_size=1 << 20)


def test_frame_without_content_size_is_refused() -> None:
    body = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 1000)
    head = struct.pack("<3sBQI", MAGIC, METHOD_ZSTD, 1000, zlib.crc32(b"a" * 1000))
    with pytest.raises(CodecError):
        decompress(head + body, max_size=1 << 20)


def test_bad_header_fields() -> None:
    frame = bytearray(compress(b"hello world" * 10))
    with pytest.raises(CodecError, match="magic"):
        decompress(b"XYZ" + bytes(frame[3:]), max_size=1000)
    frame[3] = 9
    with pytest.raises(CodecError, match="unknown frame method"):
        decompress(bytes(frame), max_size=1000)
    with pytest.raises(CodecError, match="truncated"):
        decompress(b"EKZ", max_size=1000)
    assert decompress(compress(b""), max_size=0) == b""
