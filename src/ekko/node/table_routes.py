"""The table routes of a node's HTTP API: list and create tables, write and read rows, in
JSON for humans and in the binary format of ``ekko.client.wire`` for programs.

Why one module: the JSON and binary forms of a route share its handler (the request's
``content-type`` says how to read the body, its ``accept`` how to answer), so a check added
to one form holds for the other. Table names may hold ``/`` (the publisher's ``dense/...``):
the ``{table:path}`` parameter takes the rest of the path up to ``/rows`` or ``/lookup``,
sent as ``dense/x`` or ``dense%2Fx``. Every body is checked in full before the store is
touched; a write is answered once it is in the write-ahead log on disk.
"""

from __future__ import annotations

import asyncio
import reprlib
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.client.wire import (
    ROWS_MEDIA_TYPE,
    RowsFrame,
    RowsManyFrame,
    TableRows,
    WireError,
    WrittenFrame,
    decode_lookup,
    decode_lookup_many,
    decode_write,
    encode,
    is_binary,
)
from ekko.net.httpkit import (
    CONTROL_BODY_BYTES,
    BodyRoute,
    Int64,
    RequestError,
    convert,
    guarded_by,
    json_response,
    offload,
    parse_json,
    read_body,
)
from ekko.node.core import NodeCore, NotReadyError, NotSourceError
from ekko.node.lookup_variant import Baseline, lookup_store
from ekko.schedule.quarantine import QuarantinedError
from ekko.store import StoreError, TableConflictError, UnknownTableError, WalError
from ekko.store.holding import MemoryBudgetError, NotHeldError
from ekko.store.spec import TableSpec
from ekko.store.table import Table

BadRequest = RequestError

MAX_TABLES = 4096
"""Tables a store may hold before ``POST /v1/tables`` refuses another (each costs memory on
every node of the cluster, so a runaway client is stopped, not obeyed)."""
MAX_DIM = 65536
MAX_SHARDS = 4096  # as a table in the config
_CREATED_ROWS = 16  # a created table starts small and grows with its writes
_OFFLOAD_ROWS = 4096

ROW_ERRORS: dict[type[BaseException], int | tuple[int, str]] = {
    WireError: 400,
    UnknownTableError: 404,
    TableConflictError: 409,
    NotSourceError: 409,
    QuarantinedError: 409,  # a rolled-back model's tables, until the time it names
    NotReadyError: 503,
    WalError: (503, "write not durable: "),  # in the store but not durable: not acknowledged
    NotHeldError: 421,  # a shard of another partition: its node takes it (issue 17)
    MemoryBudgetError: 507,  # the node's max_memory_mb: nothing stored, the node serves on
    StoreError: 400,
}
"""The status of each refusal of a row write or read (the routes, and write streams)."""
guarded = guarded_by(ROW_ERRORS)

_SEGMENT = r"[A-Za-z0-9_.:=@+-]+"
TableName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=rf"^{_SEGMENT}(/{_SEGMENT})*$")
]


class RowsBody(msgspec.Struct, forbid_unknown_fields=True):
    """A row write: one row of the table's ``dim`` finite numbers per key (``parse_rows``
    checks it, naming the field; the store checks finiteness and ``max_abs``). Binary:
    ``application/x-ekko-rows`` (``ekko.client.wire.WriteFrame``)."""

    keys: list[Int64]
    values: list[list[float]]


class LookupBody(msgspec.Struct, forbid_unknown_fields=True):
    """The keys to read. Binary: ``application/x-ekko-rows`` (``ekko.client.wire.LookupFrame``)."""

    keys: list[Int64]


class LookupManyBody(msgspec.Struct, forbid_unknown_fields=True):
    """Keys of several tables, binary only (``application/x-ekko-rows``,
    ``ekko.client.wire.LookupManyFrame``): ``tables`` named, ``counts`` keys each, ``keys``
    one table's after the other, ``known`` the versions the caller holds (-1: none; those
    rows come back without values)."""

    tables: list[str]
    counts: list[int]
    keys: list[Int64]
    known: list[Int64] | None = None


class TableSpecBody(msgspec.Struct, forbid_unknown_fields=True):
    """A table to create: its name (segments of letters, digits and ``_.:=@+-`` joined by
    ``/``, none of them ``.`` or ``..``), the length of its rows and its shard count."""

    name: TableName
    dim: Annotated[int, msgspec.Meta(ge=1, le=MAX_DIM)]
    shards: Annotated[int, msgspec.Meta(ge=1, le=MAX_SHARDS)] = 16

    def __post_init__(self) -> None:
        if any(segment in (".", "..") for segment in self.name.split("/")):
            # URLs drop dot segments: /v1/tables/x/../emb/rows reaches emb's route (or, for
            # "..", another route), so the table's own routes could never be called.
            raise ValueError(f"name: {self.name!r} has a segment '.' or '..', which URLs drop")

    def spec(self) -> TableSpec:
        return TableSpec(self.name, self.dim, self.shards)


def parse_keys(raw: Any, field: str = "keys") -> np.ndarray:
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{field}: expected a non-empty list of integers")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in raw):
        bad = next(k for k in raw if not isinstance(k, int) or isinstance(k, bool))
        raise BadRequest(f"{field}: every key must be an integer (int64), got {reprlib.repr(bad)}")
    try:
        return np.array(raw, dtype=np.int64)
    except OverflowError as exc:
        raise BadRequest(f"{field}: a key does not fit in int64") from exc


def parse_rows(body: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(body, dict):
        raise BadRequest('body: expected an object {"keys": [...], "values": [[...], ...]}')
    unknown = sorted(set(body) - {"keys", "values"})
    if unknown:
        raise BadRequest(f"body: unknown fields {unknown}")
    keys = parse_keys(body.get("keys"))
    raw = body.get("values")
    if not isinstance(raw, list) or len(raw) != len(keys):
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise BadRequest(f"values: expected a list of {len(keys)} rows (one per key), got {got}")
    for i, row in enumerate(raw):
        if not isinstance(row, list) or len(row) != dim:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise BadRequest(f"values[{i}]: expected {dim} numbers, got {got}")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row):
            raise BadRequest(f"values[{i}]: every element must be a number")
    values = np.array(raw, dtype=np.float32)
    return keys, values  # finiteness and max_abs: the store's write check, named per value


def parse_write(body: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A JSON row write's body, parsed and validated (run off the loop when large)."""
    return parse_rows(parse_json(body), dim)


def parse_lookup(body: bytes) -> np.ndarray:
    """A JSON lookup's keys."""
    doc = parse_json(body)
    if not isinstance(doc, dict) or set(doc) != {"keys"}:
        raise BadRequest('body: expected an object {"keys": [...]}')
    return parse_keys(doc["keys"])


def _binary_request(request: Request) -> bool:
    return is_binary(request.headers.get("content-type"))


async def _answer(
    request: Request, frame: msgspec.Struct, doc: Callable[[], Any], n: int
) -> Response:
    """``frame`` in the binary format if the request accepts it, else ``doc()`` as JSON
    (rendered off the loop for a large answer of ``n`` rows)."""
    if is_binary(request.headers.get("accept")):
        return Response(encode(frame), media_type=ROWS_MEDIA_TYPE)
    if n > _OFFLOAD_ROWS:
        return json_response(await asyncio.to_thread(doc))
    return json_response(doc())


def table_routes(core: NodeCore, max_body: int, baseline: Baseline | None = None) -> list[Route]:
    """The table routes of ``core``'s API; a row body is at most ``max_body`` bytes.
    ``baseline()``: the store ``POST /v1/lookup`` reads with ``x-ekko-variant: baseline``
    (``ekko.node.lookup_variant``)."""

    def table_of(request: Request):
        return core.store.table(request.path_params["table"])

    def held(table: Table, keys: np.ndarray) -> None:
        """421 (``NotHeldError``) for keys of another partition: read here, they would
        answer "not found" while their partition's holders have them."""
        holding = core.store.holding
        if holding is not None:
            holding.check_held(table, keys)

    @guarded
    async def list_tables(request: Request) -> Response:
        """The tables this node holds: name, dim, shards, rows."""
        tables = [
            {"name": t.name, "dim": t.dim, "shards": t.num_shards, "rows": t.rows}
            for t in core.store.tables.values()
        ]
        return json_response({"tables": tables})

    @guarded
    async def create_table(request: Request) -> Response:
        """Create a table at the source (the same spec again: nothing to do; another spec of
        an existing name: 409 naming both), answered once it is on disk. Replicas learn it
        with their next pull."""
        core.require_source("create tables at")
        spec = convert(parse_json(await read_body(request)), TableSpecBody, "a TableSpecBody")
        store = core.store
        exists = spec.name in store.tables
        if not exists and len(store.tables) >= MAX_TABLES:
            raise BadRequest(f"name: this store holds {MAX_TABLES} tables, the most it may")
        exists = not await core.create_table(spec.spec(), initial_rows=_CREATED_ROWS)
        status = 200 if exists else 201
        doc = {"name": spec.name, "dim": spec.dim, "shards": spec.shards, "created": not exists}
        return json_response(doc, status)

    @guarded
    async def get_rows(request: Request) -> Response:
        """Rows by key, as JSON (``?keys=1,2,3``)."""
        table = table_of(request)
        raw = request.query_params.get("keys", "")
        try:
            keys = [int(k) for k in raw.split(",") if k.strip()]
        except ValueError as exc:
            raise BadRequest(
                f"keys: expected comma-separated integers, got {reprlib.repr(raw)}"
            ) from exc
        keys_ = parse_keys(keys)
        held(table, keys_)
        return JSONResponse(core.read_rows(table.name, keys_))

    @guarded
    async def post_rows(request: Request) -> Response:
        """Write rows at the source, answered with their versions once durable."""
        core.require_source("write to")
        table = table_of(request)
        body = await read_body(request)
        parse = decode_write if _binary_request(request) else parse_write
        keys, values = await offload(parse, body, table.dim)
        return await _durable(request, table.name, core.write(table.name, keys, values))

    @guarded
    async def delete_rows(request: Request) -> Response:
        """Delete keys at the source (a body of keys, as a lookup), answered with the versions
        of their tombstones once durable, as a write."""
        core.require_source("delete at")
        table = table_of(request)
        body = await read_body(request)
        keys = await offload(decode_lookup if _binary_request(request) else parse_lookup, body)
        return await _durable(request, table.name, core.delete(table.name, keys))

    async def _durable(request: Request, table: str, versions: np.ndarray) -> Response:
        """The versions a write or delete took, answered once on disk (one fsync per group
        commit)."""
        await core.wait_durable()
        frame = WrittenFrame(table, versions)

        def doc() -> dict[str, Any]:
            return {"table": table, "versions": versions.tolist()}

        return await _answer(request, frame, doc, len(versions))

    @guarded
    async def lookup(request: Request) -> Response:
        """Rows by key (a body of keys, for batches too long for a query): values, versions
        and a found mask, in key order; an answer over the body limit is refused (413)."""
        table = table_of(request)
        body = await read_body(request)
        keys = await offload(decode_lookup if _binary_request(request) else parse_lookup, body)
        answer = keys.shape[0] * (4 * table.dim + 8 + 1)  # values, version, found per key
        if answer > max_body:  # a small body of keys must not make an answer without end
            raise RequestError(
                f"keys: {keys.shape[0]} rows of dim {table.dim} would answer {answer} bytes; "
                f"the limit is {max_body}: split the lookup",
                status=413,
            )
        held(table, keys)
        values, versions, found = table.lookup(keys)
        frame = RowsFrame(table.name, values, versions, found.view(np.uint8))

        def doc() -> dict[str, Any]:
            return {"table": table.name, "found": found.tolist(), "versions": versions.tolist(),
                    "values": values.tolist()}  # fmt: skip

        return await _answer(request, frame, doc, len(keys))

    @guarded
    async def lookup_many(request: Request) -> Response:
        """Rows of several tables in one binary body: what a serving node asks one partition
        holder for one predict batch. Every table is checked (it exists here, the answer fits
        ``max_body``) before any is read; rows at a ``known`` version come back without
        values. Binary only: the caller is a program and the answer is arrays."""
        if not _binary_request(request):
            raise RequestError(
                f"content-type: POST /v1/lookup takes {ROWS_MEDIA_TYPE} only, got "
                f"{request.headers.get('content-type')!r}",
                status=415,
            )
        store = lookup_store(core.name, core.store, baseline, request.headers)
        parts = await offload(decode_lookup_many, await read_body(request))
        tables = [(store.table(name), keys, known) for name, keys, known in parts]
        for table, keys, _ in tables:
            held(table, keys)
        answer = sum(k.shape[0] * (4 * t.dim + 8 + 1) for t, k, _ in tables)
        if answer > max_body:
            raise RequestError(
                f"tables: {sum(k.shape[0] for _, k, _ in tables)} rows would answer {answer} "
                f"bytes; the limit is {max_body}: split the lookup",
                status=413,
            )
        out = []
        for table, keys, known in tables:
            values, versions, found = table.lookup(keys)
            if known is not None:
                values = values[versions != known]
            out.append(TableRows(table.name, versions, found.view(np.uint8), values))
        return Response(encode(RowsManyFrame.of(out)), media_type=ROWS_MEDIA_TYPE)

    return [
        Route("/v1/tables", list_tables, methods=["GET"]),
        BodyRoute("/v1/lookup", lookup_many, max_body=max_body, body=LookupManyBody),
        BodyRoute("/v1/tables", create_table, max_body=CONTROL_BODY_BYTES, body=TableSpecBody),
        Route("/v1/tables/{table:path}/rows", get_rows, methods=["GET"]),
        BodyRoute("/v1/tables/{table:path}/rows", post_rows, max_body=max_body, body=RowsBody),
        BodyRoute("/v1/tables/{table:path}/lookup", lookup, max_body=max_body, body=LookupBody),
        BodyRoute(
            "/v1/tables/{table:path}/delete", delete_rows, max_body=max_body, body=LookupBody
        ),
    ]
