"""The binary bodies of the row routes: numpy arrays in msgpack, one format both ways.

A write, a lookup and their answers travel as msgpack maps whose arrays are ``net.arrays``
extensions (dtype + shape + raw little-endian buffer), so a client hands the node the
buffers it already holds and the node reads them without parsing a number. JSON stays for
humans and scripts; a request says which it sends (``content-type``) and which it wants back
(``accept``). Both media types name this one format: :data:`ROWS_MEDIA_TYPE` is Ekko's name,
``application/msgpack`` the generic one a msgpack client knows.

What a body must hold is checked here, before anything is stored, and every refusal is a
``WireError`` naming the field: keys int64 [n] (n ≥ 1), values float32 [n, dim] of the
table's dim. Finiteness and ``max_abs`` are the write port's check (``check_write_values``),
the same for every writer.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from ekko.net.arrays import BadArray, dec_hook, enc_hook, ext_hook

ROWS_MEDIA_TYPE = "application/x-ekko-rows"
MSGPACK_MEDIA_TYPE = "application/msgpack"
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPES = (ROWS_MEDIA_TYPE, MSGPACK_MEDIA_TYPE)


class WireError(ValueError):
    """A binary body that cannot be used as sent; the message names the field (HTTP 400)."""


class WriteFrame(msgspec.Struct, forbid_unknown_fields=True):
    """A row write: ``keys`` int64 [n], ``values`` float32 [n, dim]."""

    keys: np.ndarray
    values: np.ndarray


class LookupFrame(msgspec.Struct, forbid_unknown_fields=True):
    """A lookup: ``keys`` int64 [n]."""

    keys: np.ndarray


class WrittenFrame(msgspec.Struct):
    """A write's answer: the version each row was written at, int64 [n]."""

    table: str
    versions: np.ndarray


class RowsFrame(msgspec.Struct):
    """A lookup's answer: ``values`` float32 [n, dim] (zero where not found), ``versions``
    int64 [n] (0 where not found), ``found`` uint8 [n] (1 where the table holds the key)."""

    table: str
    values: np.ndarray
    versions: np.ndarray
    found: np.ndarray


class TableKeys(msgspec.Struct, forbid_unknown_fields=True):
    """One table's part of a multi-table lookup: ``keys`` int64 [n]; ``known`` int64 [n] or
    None: the version of each row the caller holds already (a row still at that version
    comes back without its values)."""

    table: str
    keys: np.ndarray
    known: np.ndarray | None = None


class LookupManyFrame(msgspec.Struct, forbid_unknown_fields=True):
    """A lookup of several tables in one body (``POST /v1/lookup``): what a serving node
    asks one partition holder for one predict batch."""

    tables: list[TableKeys]


class TableRows(msgspec.Struct):
    """One table's answer in a multi-table lookup: ``versions`` int64 [n] (0 where not
    found), ``found`` uint8 [n], and ``values`` float32 [m, dim]: the rows whose version is
    not the ``known`` one the request gave, in key order (all n rows without ``known``)."""

    table: str
    versions: np.ndarray
    found: np.ndarray
    values: np.ndarray


class RowsManyFrame(msgspec.Struct):
    """The answer of a multi-table lookup: one ``TableRows`` per requested table, in order."""

    tables: list[TableRows]


_ENCODER = msgspec.msgpack.Encoder(enc_hook=enc_hook)
_DECODERS: dict[type, msgspec.msgpack.Decoder] = {
    t: msgspec.msgpack.Decoder(t, dec_hook=dec_hook, ext_hook=ext_hook)
    for t in (WriteFrame, LookupFrame, WrittenFrame, RowsFrame, LookupManyFrame, RowsManyFrame)
}


def is_binary(media_type: str | None) -> bool:
    """Whether a ``content-type`` or ``accept`` header names the binary format."""
    if not media_type:
        return False
    return any(m.split(";")[0].strip().lower() in BINARY_MEDIA_TYPES for m in media_type.split(","))


def encode(frame: msgspec.Struct) -> bytes:
    """``frame`` as msgpack, its arrays as ``net.arrays`` extensions (no copy of a
    C-contiguous little-endian array beyond the one into the body)."""
    try:
        return _ENCODER.encode(frame)
    except TypeError as exc:
        raise WireError(str(exc)) from exc


def decode(body: bytes, frame: type[Any], what: str) -> Any:
    """``body`` as ``frame``; ``WireError`` naming what is wrong (``what``: the body's shape)."""
    if not body:
        raise WireError(f"body: empty (expected {what})")
    try:
        return _DECODERS[frame].decode(body)
    except BadArray as exc:
        raise WireError(f"body: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise WireError(f"body: {exc} (expected {what})") from exc
    except msgspec.DecodeError as exc:  # truncated, or not msgpack at all
        raise WireError(f"body: not a msgpack {what}: {exc}") from exc


def check_keys(keys: Any, field: str = "keys") -> np.ndarray:
    """``keys`` as sent must be int64 [n], n ≥ 1 (never cast: a float key is a bug)."""
    if not isinstance(keys, np.ndarray):
        raise WireError(f"{field}: expected an int64 array, got {type(keys).__name__}")
    if keys.dtype != np.int64:
        raise WireError(f"{field}: dtype must be int64, got {keys.dtype}")
    if keys.ndim != 1 or keys.shape[0] == 0:
        raise WireError(f"{field}: expected shape [n] with n >= 1, got {list(keys.shape)}")
    return keys


def check_write(frame: WriteFrame, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values of a decoded write to a table of ``dim``; ``WireError`` naming
    the field that is wrong."""
    keys = check_keys(frame.keys)
    values = frame.values
    if not isinstance(values, np.ndarray):
        raise WireError(f"values: expected a float32 array, got {type(values).__name__}")
    if values.dtype != np.float32:
        raise WireError(f"values: dtype must be float32, got {values.dtype}")
    if values.shape != (keys.shape[0], dim):
        raise WireError(
            f"values: expected shape [{keys.shape[0]}, {dim}] (one row of the table's dim "
            f"{dim} per key), got {list(values.shape)}"
        )
    return keys, values


def decode_write(body: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A binary write's body, decoded and checked (run off the loop when large)."""
    return check_write(decode(body, WriteFrame, "{keys: int64[n], values: float32[n, dim]}"), dim)


def decode_lookup(body: bytes) -> np.ndarray:
    """A binary lookup's keys, decoded and checked."""
    return check_keys(decode(body, LookupFrame, "{keys: int64[n]}").keys)


MAX_LOOKUP_TABLES = 4096
"""Tables one multi-table lookup may name (as many as a store may hold)."""


def decode_lookup_many(body: bytes) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """A multi-table lookup's ``(table, keys, known)`` triples, decoded and checked: at
    least one table, each named once, keys int64 [n >= 1], ``known`` int64 [n] or absent."""
    frame = decode(body, LookupManyFrame, "{tables: [{table, keys: int64[n], known?}]}")
    if not frame.tables:
        raise WireError("tables: empty (name at least one table)")
    if len(frame.tables) > MAX_LOOKUP_TABLES:
        raise WireError(f"tables: {len(frame.tables)} tables, at most {MAX_LOOKUP_TABLES}")
    out: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    seen: set[str] = set()
    for i, part in enumerate(frame.tables):
        if part.table in seen:
            raise WireError(f"tables[{i}].table: {part.table!r} is named twice")
        seen.add(part.table)
        keys = check_keys(part.keys, f"tables[{i}].keys")
        known = part.known
        if known is not None:
            known = check_keys(known, f"tables[{i}].known")
            if known.shape != keys.shape:
                raise WireError(
                    f"tables[{i}].known: expected {keys.shape[0]} versions (one per key), "
                    f"got {known.shape[0]}"
                )
        out.append((part.table, keys, known))
    return out
