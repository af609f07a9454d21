"""numpy arrays in msgpack: dtype + shape + raw buffer, never pickle.

An array travels as a msgpack Ext (code :data:`ARRAY_EXT`) whose data is
``u16 big-endian header length | msgpack [dtype str, shape] | raw C-contiguous buffer`` (the
vLLM v1 ``serial_utils`` idea). Only the dtypes in :data:`ALLOWED_DTYPES` cross the wire,
little-endian. Decoded arrays are read-only: zero-copy views into the payload when it is
aligned for their dtype, otherwise aligned copies (also read-only, so every decoded array
behaves the same). The hooks plug into any msgspec msgpack encoder/decoder.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
import numpy as np

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


class BadArray(ValueError):
    """An array ext from the wire failed validation (becomes a RemoteFrameError)."""


class UnsupportedValue(TypeError):
    """A value we were asked to encode has no wire form (becomes a LocalFrameError)."""


def enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.generic) and obj.dtype.name in ALLOWED_DTYPES:
        return obj.item()
    raise UnsupportedValue(f"cannot encode {type(obj).__name__}")


# dtype -> (little-endian wire dtype, its str); ``dtype.name`` is a slow Python property and
# this runs for every array of every chunk. Filled on first use of each allowed dtype.
_WIRE_OF: dict[np.dtype[Any], tuple[np.dtype[Any], str]] = {}


def _wire_of(dtype: np.dtype[Any]) -> tuple[np.dtype[Any], str]:
    hit = _WIRE_OF.get(dtype)
    if hit is None:
        if dtype.kind == "O" or dtype.name not in ALLOWED_DTYPES:
            raise UnsupportedValue(f"array dtype {dtype} is not allowed on the wire")
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
        raise BadArray(f"bad array header: {e}") from e
    dtype = _WIRE_DTYPES.get(dtype_str)
    if dtype is None:
        raise BadArray(f"array dtype {dtype_str!r} is not allowed on the wire")
    if len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
        raise BadArray(f"bad array shape {shape}")
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    hit = _HEADERS[header] = (dtype, shape, math.prod(shape))
    return hit


def ext_hook(code: int, data: memoryview) -> Any:
    if code != ARRAY_EXT:
        raise BadArray(f"unknown msgpack ext code {code}")
    if len(data) < _ARRAY_HEADER_LEN.size:
        raise BadArray("array ext shorter than its header length")
    (hlen,) = _ARRAY_HEADER_LEN.unpack_from(data, 0)
    start = _ARRAY_HEADER_LEN.size + hlen
    if start > len(data):
        raise BadArray(f"array header length {hlen} exceeds ext size {len(data)}")
    dtype, shape, count = _array_header(bytes(data[_ARRAY_HEADER_LEN.size : start]))
    nbytes = count * dtype.itemsize
    if nbytes != len(data) - start:
        raise BadArray(
            f"array {dtype.str}{list(shape)} needs {nbytes} bytes, ext has {len(data) - start}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    if len(shape) != 1:
        try:
            arr = arr.reshape(shape)
        except ValueError as e:  # no elements, but more of them along an axis than numpy holds
            raise BadArray(f"bad array shape {shape}: {e}") from e
    if not arr.flags.aligned:
        arr = arr.copy()
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


def dec_hook(typ: type, obj: Any) -> Any:
    if typ is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise BadArray(f"expected {getattr(typ, '__name__', typ)}, got {type(obj).__name__}")
