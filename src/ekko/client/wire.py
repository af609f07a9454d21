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


class LookupManyFrame(msgspec.Struct, forbid_unknown_fields=True):
    """A lookup of several tables in one body (``POST /v1/lookup``): what a serving node
    asks one partition holder for one predict batch. Columnar, so a batch of 30 tables is
    a few arrays, not 30 of each: ``keys`` int64 [N] are the tables' keys one table after
    the other, ``counts`` int64 [T] how many each has (each >= 1); ``known`` int64 [N] or
    None: the version of each row the caller holds already (-1: none), and a row still at
    that version comes back without its values."""

    tables: list[str]
    counts: np.ndarray
    keys: np.ndarray
    known: np.ndarray | None = None


class TableRows(msgspec.Struct):
    """One table's rows of a multi-table lookup: ``versions`` int64 [n] (0 where not found),
    ``found`` uint8 [n], and ``values`` float32 [m, dim]: the rows whose version is not the
    ``known`` one the request gave, in key order (all n rows without ``known``)."""

    table: str
    versions: np.ndarray
    found: np.ndarray
    values: np.ndarray


class RowsManyFrame(msgspec.Struct):
    """The answer of a multi-table lookup, columnar as the request: ``versions`` int64 [N]
    and ``found`` uint8 [N] in the request's key order, ``dims`` int64 [T] each table's row
    length, ``rows`` int64 [T] how many rows of values each sends, and ``values`` float32
    [sum(rows * dims)]: each table's rows, flattened, one table after the other."""

    tables: list[str]
    versions: np.ndarray
    found: np.ndarray
    dims: np.ndarray
    rows: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, parts: list[TableRows]) -> RowsManyFrame:
        flat = [np.ascontiguousarray(p.values, dtype=np.float32).reshape(-1) for p in parts]
        return cls(
            [p.table for p in parts],
            np.concatenate([p.versions for p in parts]),
            np.concatenate([p.found for p in parts]),
            np.array([p.values.shape[1] for p in parts], dtype=np.int64),
            np.array([p.values.shape[0] for p in parts], dtype=np.int64),
            np.concatenate(flat) if flat else np.zeros(0, np.float32),
        )

    def split(self, counts: np.ndarray) -> list[TableRows]:
        """Each table's ``TableRows`` (views), given the request's ``counts``; ``WireError``
        when the arrays do not add up."""
        t = len(self.tables)
        n = int(counts.sum())
        for name, arr, dtype, shape in (
            ("versions", self.versions, np.int64, (n,)), ("found", self.found, np.uint8, (n,)),
            ("dims", self.dims, np.int64, (t,)), ("rows", self.rows, np.int64, (t,)),
        ):  # fmt: skip
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
                raise WireError(f"{name}: expected {np.dtype(dtype)} {list(shape)}")
        if (self.dims < 0).any() or (self.rows < 0).any():
            raise WireError("dims, rows: expected counts >= 0")
        sizes = self.rows * self.dims
        v = self.values
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.shape != (sizes.sum(),):
            raise WireError(f"values: expected float32 [{int(sizes.sum())}]")
        out = []
        key_end, value_end = np.cumsum(counts), np.cumsum(sizes)
        for i, table in enumerate(self.tables):
            k0, v0 = key_end[i] - counts[i], value_end[i] - sizes[i]
            values = v[v0 : value_end[i]].reshape(int(self.rows[i]), int(self.dims[i]))
            out.append(TableRows(table, self.versions[k0 : key_end[i]],
                                 self.found[k0 : key_end[i]], values))  # fmt: skip
        return out


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
    """A multi-table lookup's ``(table, keys, known)`` triples (views), decoded and checked:
    at least one table, each named once with at least one key, keys int64 [N], ``known``
    int64 [N] or absent."""
    frame = decode(body, LookupManyFrame, "{tables, counts: int64[T], keys: int64[N], known?}")
    t = len(frame.tables)
    if not t:
        raise WireError("tables: empty (name at least one table)")
    if t > MAX_LOOKUP_TABLES:
        raise WireError(f"tables: {t} tables, at most {MAX_LOOKUP_TABLES}")
    if len(set(frame.tables)) != t:
        twice = next(n for i, n in enumerate(frame.tables) if n in frame.tables[:i])
        raise WireError(f"tables: {twice!r} is named twice")
    counts = frame.counts
    if not isinstance(counts, np.ndarray) or counts.dtype != np.int64 or counts.shape != (t,):
        raise WireError(f"counts: expected int64 [{t}] (one per table)")
    if (counts < 1).any():
        i = int(np.flatnonzero(counts < 1)[0])
        raise WireError(f"counts[{i}]: table {frame.tables[i]!r} needs at least one key")
    keys = check_keys(frame.keys)
    if keys.shape[0] != counts.sum():
        raise WireError(
            f"keys: expected {int(counts.sum())} (the sum of counts), got {keys.shape[0]}"
        )
    known = frame.known
    if known is not None:
        known = check_keys(known, "known")
        if known.shape != keys.shape:
            raise WireError(
                f"known: expected {keys.shape[0]} versions (one per key), got {known.shape[0]}"
            )
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]]
    return [
        (name, keys[a:b], None if known is None else known[a:b])
        for name, a, b in zip(frame.tables, starts, ends, strict=True)
    ]
