"""Chunks on a link with a row codec: rows packed into one :class:`~ekko.codec.RowBlock`.

Why here and not in the transport: the responder budgets an answer (and a paced link spends
tokens) by the bytes that will cross the link, which only the encoded block knows; and the
puller must reject a bad block before any of its rows reach the store.
"""

from __future__ import annotations

import msgspec
import numpy as np

from ekko.codec import CODECS, CodecError, RowBlock, decode_block, decode_dead, encode_block
from ekko.codec.rows import FP16, INT4, INT8
from ekko.protocol.messages import Chunk, ShardMeta

BLOCK_ROW_OVERHEAD_BYTES = 6
"""What a row's key, version and write time cost in a block, about: delta-coded varints of
keys sorted within a chunk and of versions and write times close to each other."""


def check_codec(codec: str | None) -> None:
    """Raise ``ValueError`` naming the codecs when ``codec`` is not None and not one of them."""
    if codec is not None and codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)} (or none)")


def row_bytes(codec: str | None, dim: int, plain_overhead: int) -> int:
    """Estimated wire bytes of one row of ``dim`` values under ``codec`` (None: plain arrays,
    ``plain_overhead`` bytes of key, version and write time)."""
    if codec is None:
        return plain_overhead + 4 * dim
    if codec == INT8:
        return BLOCK_ROW_OVERHEAD_BYTES + dim + 8
    if codec == INT4:
        return BLOCK_ROW_OVERHEAD_BYTES + (dim + 1) // 2 + 8
    if codec == FP16:
        return BLOCK_ROW_OVERHEAD_BYTES + 2 * dim
    return BLOCK_ROW_OVERHEAD_BYTES + 4 * dim


def encode_chunk(chunk: Chunk, codec: str) -> Chunk:
    """``chunk`` with its rows moved into a block encoded with ``codec`` and zstd, and its
    shard columns into varint columns (a knowledge-only chunk gets no block)."""
    if chunk.meta is not None:
        return chunk
    block = None
    if chunk.rows:
        block = encode_block(
            chunk.keys, chunk.values, chunk.versions, chunk.wtimes, codec=codec, compress=True,
            dead=chunk.dead,
        )  # fmt: skip
    meta = ShardMeta(
        shards=chunk.shards.tolist(),
        bases=chunk.bases.tolist(),
        spans=(chunk.knowledge - chunk.bases).tolist(),
        counts=chunk.counts.tolist(),
    )
    empty = np.zeros(0, np.int64)
    return Chunk(
        table=chunk.table,
        lane=chunk.lane,
        shards=empty,
        bases=empty,
        knowledge=empty,
        counts=empty,
        keys=empty,
        values=np.zeros((0, chunk.values.shape[1]), np.float32),
        versions=empty,
        wtimes=empty,
        origin=chunk.origin,
        block=block,
        meta=meta,
    )


def decode_chunk(chunk: Chunk, dim: int) -> Chunk:
    """``chunk`` with plain arrays: its block and shard columns decoded (a plain chunk is
    returned as is).

    Raises :class:`~ekko.codec.CodecError` for a corrupted block or shard columns, a block
    whose width is not the table's ``dim``, or one whose row count disagrees with the shard
    counts; nothing reaches the store before this returns.
    """
    block: RowBlock | None = chunk.block
    meta = chunk.meta
    if meta is None:
        if block is not None:
            raise CodecError(f"block chunk of table {chunk.table!r} without shard columns")
        return chunk
    if chunk.dead is not None:
        raise CodecError(f"block chunk of table {chunk.table!r} with plain tombstone flags")
    m = len(meta.shards)
    if not len(meta.bases) == len(meta.spans) == len(meta.counts) == m:
        raise CodecError(f"chunk of table {chunk.table!r}: shard columns differ in length")
    try:
        shards, bases, spans, counts = (
            np.array(col, dtype=np.int64)
            for col in (meta.shards, meta.bases, meta.spans, meta.counts)
        )
    except OverflowError as exc:
        raise CodecError(f"chunk of table {chunk.table!r}: shard column out of range") from exc
    if (spans < 0).any() or (counts < 0).any():
        raise CodecError(f"block chunk of table {chunk.table!r}: negative span or count")
    rows = 0 if block is None else block.n
    if int(counts.sum()) != rows:
        raise CodecError(
            f"chunk of table {chunk.table!r} holds {rows} rows, shard counts say "
            f"{int(counts.sum())}"
        )
    dead = None
    if block is None:
        empty = np.zeros(0, np.int64)
        keys, values, versions, wtimes = empty, np.zeros((0, dim), np.float32), empty, empty
    else:
        if block.dim != dim:
            raise CodecError(f"block of table {chunk.table!r} has dim {block.dim}, table has {dim}")
        keys, values, versions, wtimes = decode_block(block)
        dead = decode_dead(block) if block.ndead else None
    return Chunk(
        table=chunk.table,
        lane=chunk.lane,
        shards=shards,
        bases=bases,
        knowledge=bases + spans,
        counts=counts,
        keys=keys,
        values=values,
        versions=versions,
        wtimes=wtimes,
        origin=chunk.origin,
        dead=dead,
    )


def keep_rows(chunk: Chunk, keep: np.ndarray) -> Chunk:
    """``chunk`` holding only the rows ``keep`` marks (its per-shard counts dropped)."""
    return msgspec.structs.replace(
        chunk,
        counts=chunk.counts[:0],
        keys=chunk.keys[keep],
        values=chunk.values[keep],
        versions=chunk.versions[keep],
        wtimes=chunk.wtimes[keep],
        dead=None if chunk.dead is None else chunk.dead[keep],
    )
