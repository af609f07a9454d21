"""What ``Client`` and ``AsyncClient`` share: the nodes they talk to, how a request is
built and signed, and the options both take."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from ekko.client import calls
from ekko.client.calls import Call, Format
from ekko.client.cluster import ClusterFile, Endpoint
from ekko.client.credentials import Credentials
from ekko.net.signed_requests import host_of

MAX_RESIGNS = 3
"""A node that started after a request was signed asks for a fresh signature this often."""


@dataclass(frozen=True)
class Target:
    """Where a client writes (the source) and reads (a replica, or the source), how it signs
    and what it trusts."""

    writes: Endpoint
    reads: Endpoint
    credentials: Credentials
    verify: ssl.SSLContext | bool = True
    tls: bool = False
    fmt: Format = "binary"

    def __post_init__(self) -> None:
        if self.fmt not in calls.FORMATS:
            raise ValueError(f"format: expected one of {calls.FORMATS}, got {self.fmt!r}")

    @classmethod
    def from_config(
        cls,
        path: Path | str,
        node: str | None = None,
        *,
        credentials: Credentials | None = None,
        fmt: Format = "binary",
    ) -> Target:
        """The cluster of ``path``: writes to its source, reads from ``node`` (default: its
        first replica), signed with its secret unless ``credentials`` are given."""
        cluster = ClusterFile.read(path)
        creds = credentials or Credentials.from_secret_file(cluster.secret_file)
        return cls(
            writes=cluster.endpoint(cluster.source),
            reads=cluster.endpoint(node or cluster.replica()),
            credentials=creds,
            verify=cluster.verify(),
            tls=cluster.ca is not None,
            fmt=fmt,
        )

    @classmethod
    def at(
        cls,
        url: str,
        credentials: Credentials,
        *,
        read_url: str | None = None,
        verify: ssl.SSLContext | bool = True,
        fmt: Format = "binary",
    ) -> Target:
        """A node at ``url`` (the source) and optionally another to read from."""
        writes = Endpoint(httpx.URL(url).host, url.rstrip("/"))
        reads = Endpoint(httpx.URL(read_url).host, read_url.rstrip("/")) if read_url else writes
        return cls(writes, reads, credentials, verify, url.startswith("https"), fmt)

    def endpoint(self, call: Call) -> Endpoint:
        return self.writes if call.at == "writes" else self.reads

    def request(self, client: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
        """``call`` to its node, signed now (again for each attempt)."""
        node = self.endpoint(call)
        url = node.url + call.url_path
        headers = {"accept": call.accept}
        if call.content_type is not None:
            headers["content-type"] = call.content_type
        host = host_of(url)
        headers.update(self.credentials.headers(call.role, call.method, call.path, call.body, host))
        extensions: dict[str, Any] = {"sni_hostname": node.name} if self.tls else {}
        return client.build_request(
            call.method, url, content=call.body or None, headers=headers, extensions=extensions
        )


class Opening:
    """How either client is opened (from a cluster config, or at an address): one
    definition for ``Client`` and ``AsyncClient``, which differ only in their I/O."""

    @classmethod
    def from_config(
        cls,
        path: Path | str,
        node: str | None = None,
        *,
        credentials: Credentials | None = None,
        fmt: Format = "binary",
        **kwargs: Any,
    ) -> Self:
        """Writes to the source of the cluster config at ``path``, reads from ``node``
        (default: the first replica); signed with the cluster secret unless ``credentials``."""
        return cls(Target.from_config(path, node, credentials=credentials, fmt=fmt), **kwargs)

    @classmethod
    def at(cls, url: str, credentials: Credentials, **kwargs: Any) -> Self:
        """The node at ``url`` for writes and reads (``read_url=``: another for reads)."""
        opts = {k: kwargs.pop(k) for k in ("read_url", "verify", "fmt") if k in kwargs}
        return cls(Target.at(url, credentials, **opts), **kwargs)
