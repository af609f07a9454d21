"""Chunks on a link with a row codec: rows packed into one :class:`~ekko.codec.RowBlock`.

Why here and not in the transport: the responder budgets an answer (and a paced link spends
tokens) by the bytes that will cross the link, which only the encoded block knows; and the
puller must reject a bad block before any of its rows reach the store.
"""

from __future__ import annotations

import numpy as np

from ekko.codec import CODECS, CodecError, RowBlock, decode_block, encode_block
from ekko.codec.rows import FP16, INT8
from ekko.protocol.messages import Chunk

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
    if codec == FP16:
        return BLOCK_ROW_OVERHEAD_BYTES + 2 * dim
    return BLOCK_ROW_OVERHEAD_BYTES + 4 * dim


def encode_chunk(chunk: Chunk, codec: str) -> Chunk:
    """``chunk`` with its rows moved into a block encoded with ``codec`` and zstd."""
    if chunk.block is not None or chunk.rows == 0:
        return chunk
    block = encode_block(
        chunk.keys, chunk.values, chunk.versions, chunk.wtimes, codec=codec, compress=True
    )
    empty = np.zeros(0, np.int64)
    return Chunk(
        table=chunk.table,
        lane=chunk.lane,
        shards=chunk.shards,
        bases=chunk.bases,
        knowledge=chunk.knowledge,
        counts=chunk.counts,
        keys=empty,
        values=np.zeros((0, chunk.values.shape[1]), np.float32),
        versions=empty,
        wtimes=empty,
        origin=chunk.origin,
        block=block,
    )


def chunk_rows(chunk: Chunk, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keys, values, versions, wtimes) of ``chunk``, decoding its block if it has one.

    Raises :class:`~ekko.codec.CodecError` for a corrupted block, one whose width is not the
    table's ``dim``, or one whose row count disagrees with the chunk's shard counts; nothing
    is decoded into the store before this returns.
    """
    block: RowBlock | None = chunk.block
    if block is None:
        return chunk.keys, chunk.values, chunk.versions, chunk.wtimes
    if block.dim != dim:
        raise CodecError(f"block of table {chunk.table!r} has dim {block.dim}, table has {dim}")
    if int(np.asarray(chunk.counts).sum()) != block.n:
        raise CodecError(
            f"block of table {chunk.table!r} holds {block.n} rows, shard counts say "
            f"{int(np.asarray(chunk.counts).sum())}"
        )
    return decode_block(block)
