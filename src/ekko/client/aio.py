"""``AsyncClient``: ``Client`` for asyncio code (the same calls, awaited)."""

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
from ekko.client.wire import TableRows
from ekko.net.signed_requests import needs_resign
from ekko.store.spec import TableSpec


class AsyncClient(Opening):
    """``Client`` for asyncio code: the same calls, awaited, over one async connection pool
    (several requests in flight from as many tasks).

    Use::

        async with AsyncClient.from_config("cluster.toml") as c:
            versions = await c.write("emb", keys, values)
    """

    def __init__(self, target: Target, *, timeout: float = 60.0, pool: int = 16) -> None:
        self.target = target
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self._http = httpx.AsyncClient(verify=target.verify, timeout=timeout, limits=limits)

    async def write(self, table: str, keys: Any, values: Any) -> np.ndarray:
        """Write rows (int64 keys [n], float32 values [n, dim]); the versions they were
        written at, once the source has them on disk."""
        return await self._send(calls.write(table, keys, values, self.target.fmt))

    async def delete(self, table: str, keys: Any) -> np.ndarray:
        """Delete ``keys`` (int64 [n]; keys the table lacks are no error): the versions
        their deletes took, once the source has them on disk."""
        return await self._send(calls.delete(table, keys, self.target.fmt))

    async def lookup(self, table: str, keys: Any) -> Rows:
        """``(values, versions, found)`` of ``keys``, in their order."""
        return await self._send(calls.lookup(table, keys, self.target.fmt))

    async def lookup_many(
        self, tables: Mapping[str, Any], known: Mapping[str, Any] | None = None
    ) -> dict[str, TableRows]:
        """Rows of several tables in one request (``calls.lookup_many``): ``{table:
        TableRows}``; ``known`` versions leave rows still at them without values."""
        return await self._send(calls.lookup_many(tables, known))

    async def create_table(self, spec: TableSpec) -> bool:
        """Create ``spec`` at the source; False if it exists with this spec already
        (``ClientError`` 409 naming both specs if with another)."""
        return (await self._send(calls.create_table(spec)))["created"]

    async def tables(self) -> dict[str, TableSpec]:
        """The tables the read node holds."""
        return await self._send(calls.tables())

    async def status(self, at: Literal["writes", "reads"] = "reads") -> dict:
        """``/v1/status`` of the read node (``at="writes"``: of the source)."""
        return await self._send(calls.status(at))

    async def _send(self, call: Call) -> Any:
        node = self.target.endpoint(call).url
        for _ in range(MAX_RESIGNS):
            request = self.target.request(self._http, call)
            try:
                r = await self._http.send(request)
            except httpx.HTTPError as exc:
                raise ClientError(f"{call.method} {call.path} at {node}: {exc!r}") from exc
            if not needs_resign(r):
                break
        return calls.answer(
            call, node, r.status_code, r.headers.get("content-type", ""), r.content, r.headers
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
