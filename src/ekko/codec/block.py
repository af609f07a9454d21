"""A chunk of rows on the wire: keys, values, versions and write times in one struct.

Encoding: rows are first sorted by key (stable), keys are delta-coded varints
(:func:`ekko.codec.keys.encode_keys`), versions and write times are varint columns in their
cheapest mode (:func:`ekko.codec.keys.encode_ints`: delta, frame-of-reference or constant),
values use a row codec (:mod:`ekko.codec.rows`). With ``compress=True`` each field is wrapped
in a zstd frame (:mod:`ekko.codec.frames`) *only if that makes it smaller*; ``zmask`` records
which fields are framed, so small or incompressible fields pay no frame header.

**Order:** :func:`decode_block` returns the rows sorted by key, not in the order given to
:func:`encode_block`. Apply is idempotent and last-version-wins per key, so the order of rows
within a block does not matter to the receiver.

Deletes: a block may carry tombstones (``dead``: the positions, in key order, of rows that
are deletes, delta-coded like keys; ``ndead`` of them). A tombstone has a key, a version and a
write time but no values: ``values`` encodes the live rows only, and decoding gives a
tombstone a row of zeros.

Integrity: ``crc`` is the CRC-32 of all bytes fields as sent, checked before anything is
decoded, so corruption is detected with or without compression; framed fields also carry the
CRC of their original bytes. Every length is checked against ``n`` and ``dim``.
"""

from __future__ import annotations

import zlib

import msgspec
import numpy as np

from ekko.codec import frames
from ekko.codec.errors import CodecError
from ekko.codec.keys import decode_ints, decode_keys, encode_ints, encode_keys, sort_rows_by_key
from ekko.codec.rows import EncodedRows, decode_rows, encode_rows

_FIELDS = ("keys", "versions", "wtimes", "values", "params")
_BIT = {name: 1 << i for i, name in enumerate(_FIELDS)}
_VARINT_MAX = 10


class RowBlock(msgspec.Struct, frozen=True, array_like=True):
    """Wire form of a chunk of rows (one table, shard and lane).

    Why a flat struct of bytes fields: it embeds in any msgspec sync message without copies,
    its size is known before sending (``nbytes``, used for ``max_bytes`` budgeting and byte
    accounting), and the receiver can validate it completely before applying anything.
    """

    n: int
    dim: int
    codec: str
    zmask: int
    crc: int
    keys: bytes
    versions: bytes
    wtimes: bytes
    values: bytes
    params: bytes = b""
    dead: bytes = b""  # positions of the tombstones (rows sorted by key), delta varints
    ndead: int = 0

    @property
    def nbytes(self) -> int:
        """Wire size estimate: the sum of the bytes fields (fixed fields add ~20 bytes)."""
        return (
            len(self.keys)
            + len(self.versions)
            + len(self.wtimes)
            + len(self.values)
            + len(self.params)
            + len(self.dead)
        )


def _crc(parts: tuple[bytes, ...]) -> int:
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c


def encode_block(
    keys: np.ndarray,
    values: np.ndarray,
    versions: np.ndarray,
    wtimes: np.ndarray,
    *,
    codec: str,
    compress: bool,
    level: int = 1,
    dead: np.ndarray | None = None,
) -> RowBlock:
    """Encode ``n`` rows: keys int64[n], values float32[n, dim], versions int64[n],
    wtimes int64[n]; ``dead`` bool/uint8[n] marks tombstones (their values are not sent).
    ``codec`` is a row codec name (fp16 may fall back to fp32, see rows)."""
    vals = np.asarray(values)
    if vals.ndim != 2:
        raise CodecError(f"values must be [n, dim], got shape {vals.shape}")
    n = vals.shape[0]
    for name, arr in (("keys", keys), ("versions", versions), ("wtimes", wtimes)):
        a = np.asarray(arr)
        if a.shape != (n,):
            raise CodecError(f"{name} must have shape ({n},), got {a.shape}")
    flags = np.zeros(n, np.bool_) if dead is None else np.asarray(dead).astype(np.bool_)
    if flags.shape != (n,):
        raise CodecError(f"dead must have shape ({n},), got {flags.shape}")
    k, v, ver, wt, flags = sort_rows_by_key(keys, vals, versions, wtimes, flags)
    positions = np.flatnonzero(flags)
    enc = encode_rows(v[~flags] if positions.size else v, codec)
    raw = {
        "keys": encode_keys(k),
        "versions": encode_ints(ver),
        "wtimes": encode_ints(wt),
        "values": enc.payload,
        "params": enc.params,
    }
    zmask = 0
    if compress:
        for name in _FIELDS:
            data = raw[name]
            if not data:
                continue
            framed = frames.compress(data, level)
            if len(framed) < len(data):
                raw[name] = framed
                zmask |= _BIT[name]
    parts = tuple(raw[name] for name in _FIELDS)
    dead_bytes = encode_keys(positions) if positions.size else b""
    return RowBlock(
        n=n,
        dim=enc.dim,
        codec=enc.codec,
        zmask=zmask,
        crc=_crc((*parts, dead_bytes)),
        keys=parts[0],
        versions=parts[1],
        wtimes=parts[2],
        values=parts[3],
        params=parts[4],
        dead=dead_bytes,
        ndead=int(positions.size),
    )


def decode_block(block: RowBlock) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode to ``(keys int64[n], values float32[n, dim], versions int64[n],
    wtimes int64[n])``, sorted by key. :class:`CodecError` on any corruption or mismatch."""
    n, dim = block.n, block.dim
    if not isinstance(n, int) or not isinstance(dim, int) or n < 0 or dim < 0:
        raise CodecError(f"bad block shape n={n!r} dim={dim!r}")
    if not isinstance(block.zmask, int) or block.zmask < 0 or block.zmask >> len(_FIELDS):
        raise CodecError(f"bad block zmask {block.zmask!r}")
    parts = tuple(getattr(block, name) for name in _FIELDS)
    if _crc((*parts, block.dead)) != block.crc:
        raise CodecError("block checksum mismatch")
    dead = decode_dead(block)
    live = n - int(block.ndead)
    limits = {
        "keys": _VARINT_MAX * n,
        "versions": 1 + _VARINT_MAX * max(n, 1),
        "wtimes": 1 + _VARINT_MAX * max(n, 1),
        "values": 4 * n * dim,
        "params": 8 * n,
    }
    raw = {}
    for name, data in zip(_FIELDS, parts, strict=True):
        raw[name] = (
            frames.decompress(data, max_size=limits[name]) if block.zmask & _BIT[name] else data
        )
    keys = decode_keys(raw["keys"], n)
    versions = decode_ints(raw["versions"], n)
    wtimes = decode_ints(raw["wtimes"], n)
    values = decode_rows(EncodedRows(block.codec, live, dim, raw["values"], raw["params"]))
    if live != n:
        full = np.zeros((n, values.shape[1]), np.float32)
        full[dead == 0] = values
        values = full
    return keys, values, versions, wtimes


def decode_dead(block: RowBlock) -> np.ndarray:
    """The tombstone flags (uint8[n], 1: a delete) of ``decode_block``'s rows, in its order.
    :class:`CodecError` when the positions are malformed, out of range or not increasing."""
    n, count = block.n, block.ndead
    if not isinstance(count, int) or not 0 <= count <= n:
        raise CodecError(f"bad block ndead={count!r} for n={n!r}")
    out = np.zeros(n, np.uint8)
    if count == 0:
        if block.dead:
            raise CodecError("block has tombstone bytes but ndead=0")
        return out
    positions = decode_keys(block.dead, count)
    if positions[0] < 0 or positions[-1] >= n or (np.diff(positions) <= 0).any():
        raise CodecError(f"block tombstone positions are not increasing within [0, {n})")
    out[positions] = 1
    return out
