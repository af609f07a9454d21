"""The write stream's frames: a client's rows to the source, and its answers, on one connection.

Why a stream beside the row routes: a ``POST`` of rows is signed with a MAC over its whole
body, framed by HTTP and msgpack, and read into fresh buffers, on both ends, for every batch;
at millions of rows a second that cost more than storing them. A stream is opened by one
signed HTTP request (``Upgrade: ekko-rows/1`` on :data:`STREAM_PATH`, the writer role, over
the node's own port and TLS) and then carries frames: the client sends its arrays' buffers
as they lie in memory, the node reads them into one buffer it reuses for every frame.

Client → node, one frame per write or delete (integers little-endian)::

    kind u8 (1: write, 2: delete)  flags u8 (0)  name_len u16  n u32  dim u32  seq u64
    name                utf-8, name_len bytes                                  (head: 20 bytes)
    keys                int64 [n]
    values              float32 [n, dim]            (a write; a delete has dim 0, no values)

Node → client, one answer per frame, in the order of the frames, once it is durable::

    kind u8 (1: written, 2: refused)  flags u8 (0)  status u16  n u32  seq u64   16 bytes
    written             versions int64 [n]
    refused             the reason, utf-8, n bytes (status as HTTP's: 400, 404, 409, 503)

A frame whose head is unusable (:class:`FrameError`: unknown kind, sizes out of bounds) is
refused and the stream closed, since what follows it cannot be found; a usable frame the
store refuses (unknown table, wrong dim, NaN) is refused alone and the stream goes on.

*Lookup streams* (:data:`LOOKUP_PATH`, ``Upgrade: ekko-lookup/1``, the reader role, any
node) carry frames of kind 3 only, each a lookup of several tables (one frame per batch: a
frame per table cost the node its per-frame work 26 times a batch)::

    kind u8 (3)  flags u8 (1: known versions follow)  name_len u16  n u32  tables u32  seq u64
    names               the tables' names, utf-8, joined by newlines
    counts              int64 [tables]   keys of each table, in order (each >= 1)
    keys                int64 [n]
    known               int64 [n]        with flag 1: the version of each row the caller holds
                                         (rows at it come back without values; -1: none)

answered at once, in order::

    kind u8 (3: found)  flags u8 (0)  status u16 (0)  n u32  seq u64  tables u32  0 u32  24 bytes
    dims                int64 [tables]   each table's row length
    rows                int64 [tables]   rows of values each table sends
    versions            int64 [n]        (0: not found, or deleted)
    values              float32          each table's rows not held at ``known``, in key order

Why a stream for lookups: a serving node that scatters a predict batch over partitions sends
one lookup per partition and table, and an HTTP request cost the holder ~0.6 ms of CPU before
it read a key (the ASGI server, routing, signature, msgpack), a frame a few microseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

STREAM_PATH = "/v1/streams/write"
UPGRADE = "ekko-rows/1"
LOOKUP_PATH = "/v1/streams/lookup"
LOOKUP_UPGRADE = "ekko-lookup/1"
VARIANT_HEADER = "x-ekko-variant"
"""Request header of a lookup (stream upgrade or ``POST /v1/lookup``): ``online`` (the
default: the node's store) or ``baseline`` (the guard's lagged store, where the node keeps
one; a node without one answers 409 naming itself, never the online rows)."""
VARIANTS = ("online", "baseline")
MAX_FRAME_HEADER = "ekko-max-frame-bytes"
"""Response header of the upgrade: the largest frame body the node takes (its body limit)."""

REQUEST = struct.Struct("<BBHIIQ")
ANSWER = struct.Struct("<BBHIQ")
FOUND_TAIL = struct.Struct("<II")  # dim, rows with values: after a found answer's head
KIND_WRITE = 1
KIND_DELETE = 2
KIND_LOOKUP = 3
FLAG_KNOWN = 1  # a lookup frame: the caller's versions follow the keys
WRITTEN = 1
REFUSED = 2
FOUND = 3
MAX_NAME_BYTES = 1024
MAX_DIM = 65536
MAX_REASON_BYTES = 4096
MAX_LOOKUP_TABLES = 4096


class FrameError(ValueError):
    """A frame whose head cannot be used: the stream cannot go on after it."""


@dataclass(frozen=True)
class WriteHead:
    """A frame's head: what the name and body that follow it hold."""

    seq: int
    name_len: int
    n: int
    dim: int
    kind: int = KIND_WRITE
    flags: int = 0

    @property
    def body_bytes(self) -> int:
        if self.kind == KIND_LOOKUP:  # dim: how many tables
            return 8 * self.dim + self.n * (16 if self.flags & FLAG_KNOWN else 8)
        return self.n * (8 + 4 * self.dim)


def parse_head(raw: bytes | bytearray | memoryview, max_body: int) -> WriteHead:
    """The head of a frame; ``FrameError`` naming the field out of bounds (a body over
    ``max_body`` bytes among them)."""
    kind, flags, name_len, n, dim, seq = REQUEST.unpack(raw)
    if kind not in (KIND_WRITE, KIND_DELETE, KIND_LOOKUP):
        raise FrameError(
            f"frame kind: {kind} is not a write ({KIND_WRITE}), a delete ({KIND_DELETE}) or a"
            f" lookup ({KIND_LOOKUP})"
        )
    if flags and not (kind == KIND_LOOKUP and flags == FLAG_KNOWN):
        raise FrameError(f"frame flags: {flags:#x}, not defined for a frame of kind {kind}")
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise FrameError(f"name_len: {name_len}, expected 1..{MAX_NAME_BYTES}")
    if kind == KIND_DELETE and dim != 0:
        raise FrameError(f"dim: {dim}, a delete carries no values (dim 0)")
    if kind == KIND_LOOKUP and not 1 <= dim <= MAX_LOOKUP_TABLES:
        raise FrameError(f"tables: {dim}, a lookup names 1..{MAX_LOOKUP_TABLES} tables")
    if kind == KIND_WRITE and not 1 <= dim <= MAX_DIM:
        raise FrameError(f"dim: {dim}, expected 1..{MAX_DIM}")
    if n < 1:
        raise FrameError("n: 0 rows; a frame holds at least one")
    head = WriteHead(seq, name_len, n, dim, kind, flags)
    if head.body_bytes > max_body:
        raise FrameError(
            f"n: {n} rows of dim {dim} are {head.body_bytes} bytes; this node takes at most "
            f"{max_body} a frame (header {MAX_FRAME_HEADER} of the upgrade): split the write"
        )
    return head


def write_frame(
    seq: int, name: bytes, keys: np.ndarray, values: np.ndarray
) -> list[bytes | memoryview]:
    """A write's frame as the buffers to send (``socket.sendmsg`` sends them without a
    copy): ``keys`` int64 [n] and ``values`` float32 [n, dim], C-contiguous, little-endian."""
    n, dim = values.shape
    head = REQUEST.pack(KIND_WRITE, 0, len(name), n, dim, seq)
    return [head, name, memoryview(keys).cast("B"), memoryview(values).cast("B")]


def delete_frame(seq: int, name: bytes, keys: np.ndarray) -> list[bytes | memoryview]:
    """A delete's frame: ``keys`` int64 [n], C-contiguous, little-endian."""
    head = REQUEST.pack(KIND_DELETE, 0, len(name), keys.shape[0], 0, seq)
    return [head, name, memoryview(keys).cast("B")]


def written(seq: int, versions: np.ndarray) -> list[bytes | memoryview]:
    """The answer to write ``seq``: the version of each of its rows."""
    v = np.ascontiguousarray(versions, dtype="<i8")
    return [ANSWER.pack(WRITTEN, 0, 0, v.shape[0], seq), memoryview(v).cast("B")]


def refused(seq: int, status: int, reason: str) -> bytes:
    """The answer to write ``seq`` that was not stored, and why."""
    why = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return ANSWER.pack(REFUSED, 0, status, len(why), seq) + why


def lookup_frame(
    seq: int,
    names: list[str],
    keys: list[np.ndarray],
    known: list[np.ndarray] | np.ndarray | None = None,
) -> list[bytes | memoryview]:
    """A lookup of several tables: ``keys[i]`` int64 of table ``names[i]`` and, if given,
    ``known[i]`` int64 (the version of each row the caller holds, -1: none), or ``known``
    int64 [n] for every key at once, in the keys' order."""
    counts = np.array([k.shape[0] for k in keys], dtype="<i8")
    flat = np.concatenate(keys)
    flat_known = None
    if known is not None:
        flat_known = known if isinstance(known, np.ndarray) else np.concatenate(known)
    return flat_lookup_frame(seq, names, counts, flat, flat_known)


def flat_lookup_frame(
    seq: int, names: list[str], counts: np.ndarray, keys: np.ndarray, known: np.ndarray | None
) -> list[bytes | memoryview]:
    """A lookup of several tables as it goes out: ``keys`` int64 [n] of every table, table
    ``names[i]``'s ``counts[i]`` of them after the table before it's, and if given ``known``
    int64 [n] (the version of each row the caller holds, -1: none)."""
    name = "\n".join(names).encode()
    c = np.ascontiguousarray(counts, dtype="<i8")
    flat = np.ascontiguousarray(keys, dtype="<i8")
    if c.shape != (len(names),) or int(c.sum()) != flat.shape[0]:
        raise ValueError(
            f"counts: {c.tolist()[:8]} for {len(names)} tables of {flat.shape[0]} keys"
        )
    flags = 0 if known is None else FLAG_KNOWN
    head = REQUEST.pack(KIND_LOOKUP, flags, len(name), flat.shape[0], len(names), seq)
    out = [head, name, memoryview(c).cast("B"), memoryview(flat).cast("B")]
    if known is not None:
        if known.shape != flat.shape:
            raise ValueError(f"known: {known.shape[0]} versions for {flat.shape[0]} keys")
        out.append(memoryview(np.ascontiguousarray(known, dtype="<i8")).cast("B"))
    return out


FOUND_HEAD = ANSWER.size + FOUND_TAIL.size
"""Bytes before a found answer's arrays."""


def found_head(out: np.ndarray, seq: int, n: int, tables: int) -> None:
    """Write the head of the answer to lookup ``seq`` (``n`` keys of ``tables`` tables)
    into the first ``FOUND_HEAD`` bytes of ``out`` (uint8); the arrays follow it: each
    table's row length and rows of values sent (int64 [tables] each), each key's version
    (int64 [n]), then each table's values (float32), as ``ekko.store.table_frames``'s
    ``FramePlan.answer`` writes them."""
    ANSWER.pack_into(out, 0, FOUND, 0, 0, n, seq)
    FOUND_TAIL.pack_into(out, ANSWER.size, tables, 0)
