"""Hostile bytes and messages for a live node's sync port, before and after the handshake.

Before the handshake: raw bytes on a TCP connection (the node sends its challenge and must
close the connection without sending anything else). After an authenticated handshake:
well-typed messages with hostile fields, messages of the wrong direction, and valid frames
mutated (bytes flipped, lengths wrong, huge length prefixes, unknown flags, zstd bombs,
unknown msgpack ext types, deep nesting). Each exchange ends with a ``CatalogRequest`` ping:
the node answers it (its answers to what came before arrive first: a named ``Error``, or a
normal answer) or has closed the connection; a truncated frame may leave it waiting for the
rest, which it may (it holds only the bytes received).
"""

from __future__ import annotations

import asyncio
import functools
import struct
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import zstandard
from hypothesis import strategies as st

from ekko.codec import CODECS
from ekko.net.errors import TransportError
from ekko.net.framing import DEFAULT_MAX_FRAME_BYTES, FLAG_ZSTD, HEADER, encode_frame
from ekko.net.handshake import Auth, Challenge, HandshakeMessage
from ekko.net.transport import connect
from ekko.node.sync_host import SYNC_SCHEMA
from ekko.protocol.messages import (
    Catalog,
    CatalogRequest,
    Chunk,
    Cursor,
    Error,
    PullRequest,
    PullResponse,
)
from ekko.store.spec import TableSpec

PING = 2**31 - 7
FRAME_MUTATIONS = ["flip", "truncate", "length", "huge", "flags", "zstd_bomb", "zstd_big",
                   "zstd_lies", "ext", "deep", "random", "handshake"]  # fmt: skip
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64_EDGE = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
WIRE_INT = INT64 | UINT64_EDGE | st.integers(-3, 3)


def _frame(payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), flags) + payload


def cursors(tables: list[str]) -> st.SearchStrategy[list[Cursor]]:
    name = st.sampled_from(tables) | st.text(max_size=8)
    cursor = st.builds(Cursor, name, WIRE_INT, WIRE_INT | st.integers(0, 3), WIRE_INT)
    return st.lists(cursor, max_size=4)


def hostile_messages(tables: list[str]) -> st.SearchStrategy[Any]:
    """Well-typed messages a puller may send, with hostile values, and messages a responder
    never expects (answers, errors, catalogs)."""
    pull = st.builds(
        PullRequest,
        req_id=WIRE_INT,
        max_bytes=WIRE_INT | st.sampled_from([0, 1, 1 << 30]),
        wait_ms=st.sampled_from([-1, 0, 0, 1, 10**9]) | WIRE_INT,
        cursors=st.none() | cursors(tables),
        codec=st.none() | st.sampled_from(CODECS) | st.text(max_size=6),
        traffic=st.none() | st.dictionaries(st.text(max_size=6), st.integers(0, 2**64 - 1)),
        reset=st.booleans(),
        absorb=st.booleans(),
    )
    spec = st.builds(TableSpec, st.text(max_size=6), st.integers(-2, 5), st.integers(-2, 5))
    wrong = st.one_of(
        st.builds(CatalogRequest, WIRE_INT),
        st.builds(Catalog, WIRE_INT, WIRE_INT, st.lists(spec, max_size=2)),
        st.builds(Error, WIRE_INT, st.text(max_size=8), st.text(max_size=8)),
        st.builds(PullResponse, WIRE_INT, WIRE_INT, st.just([_chunk()])),
    )
    return pull | pull | wrong


def _chunk() -> Chunk:
    one = np.array([0], dtype=np.int64)
    return Chunk("emb", 0, one, one, one, np.array([1]), np.array([7], dtype=np.int64),
                 np.ones((1, 4), np.float32), np.array([1]), one)  # fmt: skip


def _ext(code: int, data: bytes) -> bytes:
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(code, data))


@st.composite
def mutated_frames(draw: st.DrawFn, tables: list[str]) -> bytes:
    """Bytes that look like frames: valid ones damaged, or crafted to cost the node."""
    msg = draw(hostile_messages(tables))
    frame = encode_frame(msg)
    kind = draw(st.sampled_from(FRAME_MUTATIONS))
    if kind == "flip":
        data = bytearray(frame)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if kind == "length":  # the prefix says less (or more) than the payload
        payload = frame[HEADER.size :]
        n = max(0, len(payload) + draw(st.integers(-8, 8)))
        return HEADER.pack(n, 0) + payload
    if kind == "huge":
        n = draw(st.sampled_from([DEFAULT_MAX_FRAME_BYTES + 1, 2**32 - 1, 2**31]))
        return HEADER.pack(n, 0) + b"\x00" * 16
    if kind == "flags":
        return HEADER.pack(len(frame) - HEADER.size, draw(st.integers(2, 255))) + frame[5:]
    if kind == "zstd_bomb":  # declares more than the frame limit: refused before inflating
        size = draw(st.sampled_from([DEFAULT_MAX_FRAME_BYTES + 1, 1 << 31, 2**64 - 1]))
        return _frame(_lying_zstd(size), FLAG_ZSTD)
    if kind == "zstd_big":  # within the limit: inflated (48 MiB), then not a message
        return _frame(_big_zstd(), FLAG_ZSTD)
    if kind == "zstd_lies":  # declares 16 bytes, inflates to 1 MiB
        return _frame(_lying_zstd(16, real=1 << 20), FLAG_ZSTD)
    if kind == "ext":
        code = draw(st.integers(-128, 127))
        data = draw(st.binary(max_size=32))
        return _frame(b"\x82\xa4type\xabPullRequest\xa6req_id" + _ext(code, data))
    if kind == "deep":
        depth = draw(st.sampled_from([100, 10_000, 100_000]))
        return _frame(b"\x91" * depth + b"\xc0")
    if kind == "handshake":  # a handshake message after the handshake
        auth = Auth(node="x", nonce=b"0" * 32, mac=b"0" * 32, protocol_version=2)
        return encode_frame(auth)
    return draw(st.binary(min_size=1, max_size=64))


def _lying_zstd(declared: int, real: int = 1024) -> bytes:
    """A zstd frame of ``real`` zero bytes whose header declares ``declared``."""
    body = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * real)
    fhd = body[4]
    single = bool(fhd & 0x20)
    fcs = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    start = 5 + (0 if single else 1)  # after the window descriptor (no dictionary id)
    return (body[:4] + bytes([0xC0 | (fhd & 0x3F)]) + body[5:start]
            + struct.pack("<Q", declared) + body[start + fcs :])  # fmt: skip


@functools.cache
def _big_zstd() -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(b"\x00" * (48 << 20))


@dataclass
class Outcome:
    """What the node did with one exchange."""

    answers: list[Any]
    closed: bool
    silent: bool


async def authenticated_exchange(
    host: str, port: int, secret: bytes, sends: list[Any], raw: bytes | None = None
) -> Outcome:
    """Handshake as a peer, send ``sends`` (messages) or ``raw`` (bytes), then the ping."""
    conn = await connect(host, port, node="fuzz-peer", secret=secret, schema=SYNC_SCHEMA)
    answers: list[Any] = []
    try:
        if raw is not None:
            await conn._write(raw)  # bytes the encoder would never produce
        for msg in [*sends, CatalogRequest(req_id=PING)]:
            await conn.send(msg)
        async with asyncio.timeout(5.0 if raw is None else 0.5):
            while True:
                msg = await conn.recv()
                answers.append(msg)
                if isinstance(msg, Catalog) and msg.req_id == PING:
                    return Outcome(answers, closed=False, silent=False)
    except TimeoutError:
        return Outcome(answers, closed=False, silent=True)
    except TransportError:  # the node closed the connection (a send may see it first)
        return Outcome(answers, closed=True, silent=False)
    finally:
        await conn.close()


async def raw_exchange(host: str, port: int, data: bytes) -> tuple[bytes, bool]:
    """Before any handshake: read the challenge, send ``data``; what else came, and whether
    the node closed the connection (within 6 s: its handshake deadline is 5 s)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(6.0):
            head = await reader.readexactly(HEADER.size)
            payload = await reader.readexactly(HEADER.unpack(head)[0])
        challenge = msgspec.msgpack.decode(payload, type=HandshakeMessage)
        assert isinstance(challenge, Challenge), challenge
        try:
            writer.write(data)
            await writer.drain()
        except OSError:
            return b"", True
        try:
            async with asyncio.timeout(6.0):
                got = await reader.read()  # to EOF: the node closes
        except TimeoutError:
            return b"", False
        except OSError:
            return b"", True
        return got, True
    finally:
        writer.close()


def pre_handshake_bytes(tables: list[str]) -> st.SearchStrategy[bytes]:
    auth = Auth(node="fuzz", nonce=b"\x00" * 32, mac=b"\x00" * 32, protocol_version=2)
    return st.one_of(
        st.binary(min_size=1, max_size=256),
        mutated_frames(tables),
        st.just(encode_frame(auth)),  # a valid-looking Auth with a wrong MAC
        st.just(encode_frame(CatalogRequest(req_id=1))),  # a data message before auth
        st.just(_frame(b"\x00" * 5000)),  # over the 4 KiB handshake frame limit
        st.just(_frame(zstandard.ZstdCompressor().compress(b"\x00" * 100), FLAG_ZSTD)),
    )


__all__ = [
    "PING",
    "Outcome",
    "authenticated_exchange",
    "hostile_messages",
    "mutated_frames",
    "pre_handshake_bytes",
    "raw_exchange",
]
