"""``HttpHolders``: the scatter's ``Fetch`` over the nodes' HTTP ports (``POST /v1/lookup``).

Why here and not in the node: the serving node, the integration tests and ``ekko bench
scale`` all reach holders the same way (a signed binary request per partition); the node
hands over what only it knows — an httpx client that checks its cluster's TLS names
(``ClusterHttp.async_client``) and the credentials it signs with.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import numpy as np

from ekko.client import calls
from ekko.client.base import MAX_RESIGNS
from ekko.client.credentials import Credentials
from ekko.client.wire import TableRows, WireError
from ekko.net.signed_requests import host_of, needs_resign
from ekko.serve.scatter import HolderFailed


class HttpHolders:
    """Asks one holder (a node's base URL, ``http://host:port``) for rows of several tables
    in one signed binary request, as a reader.

    Why a class: one connection pool for every holder and batch (keep-alive: a batch costs
    a request, not a TCP handshake per partition).

    Args:
        client: the pool (the node's ``ClusterHttp.async_client``; closed by ``close``).
        credentials: what the requests are signed with (the cluster secret at a node).
    """

    def __init__(self, client: httpx.AsyncClient, credentials: Credentials) -> None:
        self.client = client
        self.credentials = credentials

    async def __call__(
        self, holder: str, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray]
    ) -> Mapping[str, TableRows]:
        call = calls.lookup_many(tables, known)
        url = holder.rstrip("/") + call.url_path
        host = host_of(url)
        assert call.content_type is not None
        for _ in range(MAX_RESIGNS):
            headers = {"accept": call.accept, "content-type": call.content_type}
            headers.update(
                self.credentials.headers(call.role, call.method, call.path, call.body, host)
            )
            try:
                r = await self.client.post(url, content=call.body, headers=headers)
            except httpx.HTTPError as exc:
                raise HolderFailed(holder, f"{type(exc).__name__}: {exc}") from exc
            if not needs_resign(r):
                break
        if r.status_code >= 300:
            why = str(calls.refusal(call, holder, r.status_code, r.content))
            raise HolderFailed(holder, why.partition(f"at {holder}: ")[2] or why, r.status_code)
        try:
            return call.read(r.content, r.headers.get("content-type", ""))
        except (WireError, ValueError, KeyError, TypeError) as exc:
            raise HolderFailed(holder, f"unreadable answer: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()
