"""``Client``: the cluster's rows from any Python process, over its nodes' HTTP ports."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import httpx
import numpy as np

from ekko.client import calls
from ekko.client.base import MAX_RESIGNS, Opening, Target
from ekko.client.calls import Call, Rows
from ekko.client.errors import ClientError
from ekko.client.stream import DEFAULT_WINDOW, WriteStream
from ekko.client.wire import TableRows
from ekko.net.signed_requests import needs_resign
from ekko.store.spec import TableSpec


class Client(Opening):
    """Writes rows to a cluster's source and reads them from a replica, in the binary row
    format (``ekko.client.wire``) or JSON (``fmt="json"``).

    Why a client: a training process in another machine or container publishes to the
    cluster without running a node; every request is signed (``Credentials``) and a write
    returns once the source has it on disk. Thread-safe (one connection pool), so several
    threads may have requests in flight (``RemoteSink`` does). A delete is a write too: it
    reaches every replica, and returns once the source has it on disk.

    Use::

        with Client.from_config("cluster.toml") as c:
            c.create_table(TableSpec("emb", dim=32, num_shards=16))
            versions = c.write("emb", keys, values)
            values, versions, found = c.lookup("emb", keys)
    """

    def __init__(self, target: Target, *, timeout: float = 60.0, pool: int = 16) -> None:
        self.target = target
        self.timeout = timeout
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self._http = httpx.Client(verify=target.verify, timeout=timeout, limits=limits)

    def write(self, table: str, keys: Any, values: Any) -> np.ndarray:
        """Write rows (int64 keys [n], float32 values [n, dim]); the versions they were
        written at, once the source has them on disk."""
        return self._send(calls.write(table, keys, values, self.target.fmt))

    def delete(self, table: str, keys: Any) -> np.ndarray:
        """Delete ``keys`` (int64 [n]; keys the table lacks are no error): the versions
        their deletes took, once the source has them on disk. Every replica then reports
        them not found."""
        return self._send(calls.delete(table, keys, self.target.fmt))

    def lookup(self, table: str, keys: Any) -> Rows:
        """``(values, versions, found)`` of ``keys``, in their order."""
        return self._send(calls.lookup(table, keys, self.target.fmt))

    def lookup_many(
        self, tables: Mapping[str, Any], known: Mapping[str, Any] | None = None
    ) -> dict[str, TableRows]:
        """Rows of several tables in one request (``calls.lookup_many``): ``{table:
        TableRows}``; ``known`` versions leave rows still at them without values."""
        return self._send(calls.lookup_many(tables, known))

    def create_table(self, spec: TableSpec) -> bool:
        """Create ``spec`` at the source; False if it exists with this spec already
        (``ClientError`` 409 naming both specs if with another)."""
        return self._send(calls.create_table(spec))["created"]

    def tables(self) -> dict[str, TableSpec]:
        """The tables the read node holds."""
        return self._send(calls.tables())

    def write_stream(self, *, window: int = DEFAULT_WINDOW) -> WriteStream:
        """A write stream to the source (the caller closes it): writes pipelined on one
        connection, signed once; ``RemoteSink`` publishes through one."""
        return WriteStream(self.target, timeout=self.timeout, window=window)

    def status(self, at: Literal["writes", "reads"] = "reads") -> dict:
        """``/v1/status`` of the read node (``at="writes"``: of the source)."""
        return self._send(calls.status(at))

    def _send(self, call: Call) -> Any:
        node = self.target.endpoint(call).url
        for _ in range(MAX_RESIGNS):
            request = self.target.request(self._http, call)
            try:
                r = self._http.send(request)
            except httpx.HTTPError as exc:
                raise ClientError(f"{call.method} {call.path} at {node}: {exc!r}") from exc
            if not needs_resign(r):
                break
        return calls.answer(
            call, node, r.status_code, r.headers.get("content-type", ""), r.content, r.headers
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
