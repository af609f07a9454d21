"""The client's requests without I/O: what each call sends and how its answer is read.

Why sans-IO: ``Client`` (threads) and ``AsyncClient`` (asyncio) send the same requests and
read the same answers; only the sending differs, so each call is written once here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import numpy as np

from ekko.client.errors import ClientError, Quarantined
from ekko.client.wire import (
    JSON_MEDIA_TYPE,
    ROWS_MEDIA_TYPE,
    LookupFrame,
    LookupManyFrame,
    RowsFrame,
    RowsManyFrame,
    TableRows,
    WireError,
    WriteFrame,
    WrittenFrame,
    decode,
    encode,
    is_binary,
)
from ekko.store.spec import TableSpec

Format = Literal["binary", "json"]
FORMATS: tuple[Format, ...] = ("binary", "json")


@dataclass(frozen=True)
class Call:
    """One request: ``path`` as the node routes and signs it (decoded; ``url_path`` is it
    percent-encoded), the role it needs, the node it goes to (``at``: the source for
    ``writes``, the read node for ``reads``) and how to read a 2xx answer."""

    method: str
    path: str
    role: str
    at: Literal["writes", "reads"]
    body: bytes
    content_type: str | None
    accept: str
    read: Callable[[bytes, str], Any]

    @property
    def url_path(self) -> str:
        return quote(self.path, safe="/")


@dataclass(frozen=True)
class Rows:
    """A lookup's answer, in key order: ``values`` float32 [n, dim] (zero where not found),
    ``versions`` int64 [n] (0 where not found), ``found`` bool [n]."""

    values: np.ndarray
    versions: np.ndarray
    found: np.ndarray

    def __iter__(self):  # values, versions, found = client.lookup(...)
        return iter((self.values, self.versions, self.found))


def _rows_path(table: str, what: str) -> str:
    if not table:
        raise ValueError("table: empty name")
    return f"/v1/tables/{table}/{what}"


def _keys(keys: Any) -> np.ndarray:
    k = np.asarray(keys)
    if k.dtype.kind not in "iu" or k.ndim != 1:
        raise ValueError(f"keys: expected a 1-D integer array, got {k.dtype} {list(k.shape)}")
    return np.ascontiguousarray(k, dtype=np.int64)


def _values(values: Any, n: int) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype.kind != "f" or v.ndim != 2 or v.shape[0] != n:
        raise ValueError(f"values: expected float [{n}, dim], got {v.dtype} {list(v.shape)}")
    return np.ascontiguousarray(v, dtype=np.float32)


def _json(body: bytes, media: str) -> Any:
    return json.loads(body)


def _binary(frame: type) -> Callable[[bytes, str], Any]:
    def read(body: bytes, media: str) -> Any:
        if not is_binary(media):
            raise WireError(f"expected {ROWS_MEDIA_TYPE}, the node answered {media!r}")
        return decode(body, frame, frame.__name__)

    return read


def write(table: str, keys: Any, values: Any, fmt: Format) -> Call:
    """Write rows (the source); answered with the versions once durable."""
    k = _keys(keys)
    v = _values(values, k.shape[0])
    if fmt == "binary":
        return _versioned(_rows_path(table, "rows"), encode(WriteFrame(k, v)), fmt)
    body = json.dumps({"keys": k.tolist(), "values": v.tolist()}).encode()
    return _versioned(_rows_path(table, "rows"), body, fmt)


def delete(table: str, keys: Any, fmt: Format) -> Call:
    """Delete keys (the source); answered with the versions of their tombstones once
    durable, as a write. A key the table does not hold is no error."""
    k = _keys(keys)
    if fmt == "binary":
        return _versioned(_rows_path(table, "delete"), encode(LookupFrame(k)), fmt)
    return _versioned(_rows_path(table, "delete"), json.dumps({"keys": k.tolist()}).encode(), fmt)


def _versioned(path: str, body: bytes, fmt: Format) -> Call:
    """A source change answered with the versions it issued (a write, a delete)."""
    if fmt == "binary":

        def read(b: bytes, media: str) -> np.ndarray:
            return np.asarray(_binary(WrittenFrame)(b, media).versions)

        return Call("POST", path, "writer", "writes", body, ROWS_MEDIA_TYPE, ROWS_MEDIA_TYPE, read)

    def read_json(b: bytes, media: str) -> np.ndarray:
        return np.asarray(_json(b, media)["versions"], dtype=np.int64)

    return Call("POST", path, "writer", "writes", body, JSON_MEDIA_TYPE, JSON_MEDIA_TYPE, read_json)


def lookup(table: str, keys: Any, fmt: Format) -> Call:
    """Rows by key (any node)."""
    k = _keys(keys)
    path = _rows_path(table, "lookup")
    if fmt == "binary":

        def read(b: bytes, media: str) -> Rows:
            f = _binary(RowsFrame)(b, media)
            return Rows(f.values, f.versions, f.found.astype(bool))

        body = encode(LookupFrame(k))
        return Call("POST", path, "reader", "reads", body, ROWS_MEDIA_TYPE, ROWS_MEDIA_TYPE, read)

    def read_json(b: bytes, media: str) -> Rows:
        doc = _json(b, media)
        values = np.asarray(doc["values"], dtype=np.float32).reshape(len(doc["found"]), -1)
        versions = np.asarray(doc["versions"], dtype=np.int64)
        return Rows(values, versions, np.asarray(doc["found"], dtype=bool))

    body = json.dumps({"keys": k.tolist()}).encode()
    return Call("POST", path, "reader", "reads", body, JSON_MEDIA_TYPE, JSON_MEDIA_TYPE, read_json)


LOOKUP_MANY_PATH = "/v1/lookup"


def lookup_many(tables: Mapping[str, Any], known: Mapping[str, Any] | None = None) -> Call:
    """Rows of several tables in one request (binary only): ``tables`` maps each table to
    its keys; ``known`` optionally maps a table to the version the caller holds of each of
    its keys, and rows still at that version come back without values. Answered as
    ``{table: TableRows}`` (``ekko.client.wire.TableRows``), in the order given."""
    if not tables:
        raise ValueError("tables: name at least one table")
    known = known or {}
    unknown = sorted(set(known) - set(tables))
    if unknown:
        raise ValueError(f"known: tables {unknown} are not looked up")
    names = list(tables)
    keys = [_keys(tables[t]) for t in names]
    counts = np.array([k.shape[0] for k in keys], dtype=np.int64)
    if (counts == 0).any():
        raise ValueError(f"tables: {names[int(np.flatnonzero(counts == 0)[0])]!r} has no keys")
    held = None
    if known:
        parts = []
        for t, k in zip(names, keys, strict=True):
            v = _keys(known[t]) if t in known else np.full(k.shape[0], -1, np.int64)
            if v.shape != k.shape:
                raise ValueError(f"known[{t!r}]: expected {k.shape[0]} versions, got {v.shape[0]}")
            parts.append(v)
        held = np.concatenate(parts)
    body = encode(LookupManyFrame(names, counts, np.concatenate(keys), held))

    def read(b: bytes, media: str) -> dict[str, TableRows]:
        f = _binary(RowsManyFrame)(b, media)
        if f.tables != names:
            raise WireError(f"tables: asked for {names}, the answer holds {f.tables}")
        return {t.table: t for t in f.split(counts)}

    return Call(
        "POST", LOOKUP_MANY_PATH, "reader", "reads", body, ROWS_MEDIA_TYPE, ROWS_MEDIA_TYPE, read
    )


def create_table(spec: TableSpec) -> Call:
    """Create a table at the source (the same spec again: nothing to do)."""
    body = json.dumps({"name": spec.name, "dim": spec.dim, "shards": spec.num_shards}).encode()
    return Call(
        "POST", "/v1/tables", "writer", "writes", body, JSON_MEDIA_TYPE, JSON_MEDIA_TYPE, _json
    )


def tables() -> Call:
    """The tables a node holds, as specs."""

    def read(b: bytes, media: str) -> dict[str, TableSpec]:
        return {
            t["name"]: TableSpec(t["name"], t["dim"], t["shards"])
            for t in _json(b, media)["tables"]
        }

    return Call("GET", "/v1/tables", "reader", "reads", b"", None, JSON_MEDIA_TYPE, read)


def status(at: Literal["writes", "reads"] = "reads") -> Call:
    """The ``/v1/status`` document of the read node (``at="writes"``: of the source)."""
    if at not in ("writes", "reads"):
        raise ValueError(f"at: expected 'writes' or 'reads', got {at!r}")
    return Call("GET", "/v1/status", "reader", at, b"", None, JSON_MEDIA_TYPE, _json)


def refusal(
    call: Call, node: str, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> ClientError:
    """The error of a non-2xx answer, naming the request, the node and its reason: a
    ``Quarantined`` for a write refused during a rollback's quarantine (409 with its
    headers)."""
    try:
        why = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        why = body[:200].decode("utf-8", "replace") or "(no reason given)"
    message = f"{call.method} {call.path} at {node}: {status} {why}"
    return Quarantined.parse(status, message, headers) or ClientError(message, status)


def answer(
    call: Call,
    node: str,
    status: int,
    media: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """A 2xx answer read; ``ClientError`` for a refusal (``Quarantined`` for a rollback's)
    or an answer that does not parse."""
    if status >= 300:
        raise refusal(call, node, status, body, headers)
    try:
        return call.read(body, media)
    except (WireError, ValueError, KeyError, TypeError) as exc:
        raise ClientError(f"{call.method} {call.path} at {node}: unreadable answer: {exc}") from exc
