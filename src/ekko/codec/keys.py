"""Integer columns on the wire: keys, versions and write times as LEB128 varints.

Keys are delta-coded: sorted int64 keys (see :func:`sort_rows_by_key`) have small gaps, and
``zigzag(delta)`` as a LEB128 varint takes 1–3 bytes for gaps up to 2**20 instead of 8. The
deltas wrap modulo 2**64, so *any* int64 array round-trips exactly: unsorted arrays,
duplicates and the int64 extremes included (they merely cost more bytes).

Versions and write times inside a block sorted by key are not sorted themselves, so
:func:`encode_ints` picks, per column, the smallest of three modes: delta (like keys),
frame-of-reference (``min`` then unsigned offsets from it; a dense version range costs the
same few bytes whatever its order), or constant (every row written at the same time).

Everything is vectorised with numpy: loops run over the at most 10 byte positions of a
varint, never over rows.

Corruption: decoding checks the structure exactly (count of varints, no truncated or trailing
bytes, no varint longer than 10 bytes or overflowing 64 bits, canonical encoding) and raises
:class:`CodecError`. A flipped bit that still leaves a well-formed varint stream decodes to a
wrong value of the right shape: that cannot be caught without a checksum, which is the job of
:mod:`ekko.codec.frames` (and of the block CRC in :mod:`ekko.codec.block`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ekko.codec.errors import CodecError

_MAX_VARINT = 10
_U64 = np.uint64
# thresholds[j] = 2**(7*(j+1)): a value >= thresholds[j] needs more than j+1 bytes
_THRESHOLDS = [_U64(1) << _U64(7 * (j + 1)) for j in range(_MAX_VARINT - 1)]

MODE_DELTA = 0
MODE_FOR = 1
MODE_CONST = 2


def _as_int64(values: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise CodecError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and arr.size:
        raise CodecError(f"{what} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _zigzag(d: np.ndarray) -> np.ndarray:
    """int64 -> uint64 with small magnitudes (either sign) mapping to small numbers."""
    return ((d << 1) ^ (d >> 63)).view(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return ((z >> _U64(1)) ^ (_U64(0) - (z & _U64(1)))).view(np.int64)


def _varint_lengths(z: np.ndarray) -> np.ndarray:
    lens = np.ones(z.shape, dtype=np.int64)
    for t in _THRESHOLDS:
        lens += z >= t
    return lens


@njit(cache=True)
def _encode_kernel(z: np.ndarray, out: np.ndarray) -> int:  # pragma: no cover - numba
    pos = 0
    for i in range(z.shape[0]):
        v = z[i]
        while v >= 0x80:
            out[pos] = np.uint8((v & np.uint64(0x7F)) | np.uint64(0x80))
            v = v >> np.uint64(7)
            pos += 1
        out[pos] = np.uint8(v)
        pos += 1
    return pos


# _decode_kernel's answers: >= 0 is fine; the rest name what is wrong.
_ERR_COUNT, _ERR_CANONICAL, _ERR_OVERFLOW, _ERR_TRAILING = -1, -2, -3, -4


@njit(cache=True)
def _decode_kernel(buf: np.ndarray, out: np.ndarray) -> int:  # pragma: no cover - numba
    n = out.shape[0]
    pos = 0
    size = buf.shape[0]
    for i in range(n):
        v = np.uint64(0)
        j = 0
        while True:
            if pos >= size:
                return _ERR_COUNT
            b = buf[pos]
            pos += 1
            if j == 9 and b > 1:
                return _ERR_OVERFLOW
            v |= np.uint64(b & 0x7F) << np.uint64(7 * j)
            j += 1
            if b < 0x80:
                if j > 1 and b == 0:
                    return _ERR_CANONICAL
                break
            if j == 10:
                return _ERR_OVERFLOW
        out[i] = v
    if pos != size:
        return _ERR_TRAILING
    return 0


def _varint_encode(z: np.ndarray, lens: np.ndarray | None = None) -> bytes:
    """uint64 array -> concatenated LEB128 varints (``lens``, if known, sizes the buffer)."""
    if z.size == 0:
        return b""
    cap = int(lens.sum()) if lens is not None else _MAX_VARINT * z.size
    out = np.empty(cap, dtype=np.uint8)
    used = _encode_kernel(np.ascontiguousarray(z, dtype=np.uint64), out)
    return out[:used].tobytes()


def _varint_decode(data: bytes | memoryview, n: int, what: str) -> np.ndarray:
    """Concatenated LEB128 varints -> uint64[n]; the whole of ``data`` must be used."""
    if n < 0:
        raise CodecError(f"{what}: negative count {n}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if n == 0:
        if buf.size:
            raise CodecError(f"{what}: {buf.size} bytes for 0 values")
        return np.zeros(0, dtype=np.uint64)
    if buf.size < n:
        raise CodecError(f"{what}: truncated, {buf.size} bytes for {n} values")
    z = np.empty(n, dtype=np.uint64)
    err = _decode_kernel(buf, z)
    if err == _ERR_COUNT:
        raise CodecError(f"{what}: bad length, truncated varint before {n} values")
    if err == _ERR_CANONICAL:
        raise CodecError(f"{what}: non-canonical varint (trailing zero byte)")
    if err == _ERR_OVERFLOW:
        raise CodecError(f"{what}: varint overflows 64 bits (longer than {_MAX_VARINT} bytes)")
    if err == _ERR_TRAILING:
        raise CodecError(f"{what}: bad length, trailing bytes after {n} values")
    return z


def _delta(k: np.ndarray) -> np.ndarray:
    """First value, then successive differences, all modulo 2**64 (wrap is well defined)."""
    u = k.view(np.uint64)
    d = np.empty_like(u)
    if u.size:
        d[0] = u[0]
        np.subtract(u[1:], u[:-1], out=d[1:])
    return d.view(np.int64)


def _undelta(d: np.ndarray) -> np.ndarray:
    return np.cumsum(d.view(np.uint64), dtype=np.uint64).view(np.int64)


def encode_keys(keys: np.ndarray) -> bytes:
    """int64 keys -> ``zigzag(delta)`` LEB128 varints. Exact for any int64 array; compact when
    the keys are sorted (sort rows first with :func:`sort_rows_by_key`)."""
    k = _as_int64(keys, "keys")
    return _varint_encode(_zigzag(_delta(k)))


def decode_keys(data: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`encode_keys`; ``n`` is the number of keys (carried by the message).

    Raises :class:`CodecError` on truncated, trailing or malformed bytes.
    """
    return _undelta(_unzigzag(_varint_decode(data, n, "keys")))


def encode_ints(values: np.ndarray) -> bytes:
    """int64 column -> one mode byte + varints, in the smallest of delta / frame-of-reference /
    constant coding. Exact for any int64 array."""
    v = _as_int64(values, "ints")
    if v.size == 0:
        return bytes([MODE_CONST])
    base = v.min()
    if v.max() == base:
        return bytes([MODE_CONST]) + _varint_encode(_zigzag(np.array([base], dtype=np.int64)))
    dz = _zigzag(_delta(v))
    off = v.view(np.uint64) - base.view(np.uint64)  # max-min < 2**64: fits unsigned
    dl = _varint_lengths(dz)
    ol = _varint_lengths(off)
    if int(dl.sum()) <= int(ol.sum()):
        return bytes([MODE_DELTA]) + _varint_encode(dz, dl)
    head = _varint_encode(_zigzag(np.array([base], dtype=np.int64)))
    return bytes([MODE_FOR]) + head + _varint_encode(off, ol)


def decode_ints(data: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`encode_ints` for a column of ``n`` values."""
    if len(data) < 1:
        raise CodecError("ints: empty column (missing mode byte)")
    mode = data[0]
    body = memoryview(data)[1:]
    if mode == MODE_DELTA:
        if n == 0:
            raise CodecError("ints: delta mode with 0 values")
        return _undelta(_unzigzag(_varint_decode(body, n, "ints")))
    if mode in (MODE_FOR, MODE_CONST):
        if n == 0:
            if len(body):
                raise CodecError(f"ints: {len(body)} bytes for 0 values")
            return np.zeros(0, dtype=np.int64)
        buf = np.frombuffer(body, dtype=np.uint8)
        term = np.flatnonzero(buf < 0x80)
        if term.size == 0:
            raise CodecError("ints: truncated base value")
        cut = int(term[0]) + 1
        base = _unzigzag(_varint_decode(body[:cut], 1, "ints base"))
        if mode == MODE_CONST:
            if cut != len(body):
                raise CodecError(f"ints: {len(body) - cut} trailing bytes after constant")
            return np.full(n, base[0], dtype=np.int64)
        off = _varint_decode(body[cut:], n, "ints")
        return (off + base.view(np.uint64)[0]).view(np.int64)
    raise CodecError(f"ints: unknown column mode {mode}")


def sort_rows_by_key(keys: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return ``(keys_sorted, *arrays_permuted)``, rows permuted together by ascending key.

    The sort is stable, so rows sharing a key keep their relative order. Every array must have
    the same length (first axis) as ``keys``.
    """
    k = _as_int64(keys, "keys")
    for i, a in enumerate(arrays):
        if len(a) != k.size:
            raise CodecError(f"array {i} has {len(a)} rows, keys have {k.size}")
    order = np.argsort(k, kind="stable")
    return (k[order], *(np.asarray(a)[order] for a in arrays))
