"""A node's HTTP port over TLS, and the one client helper every caller uses: https with the
cluster CA and the node's name checked; a plaintext client gets nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.node.config import ClusterConfig, load_config
from ekko.node.http_client import ClusterHttp
from ekko.node.http_server import http_server, tcp_listener
from ekko.ops.cluster_init import cluster_doc, write_cluster


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True, "scheme": request.url.scheme})


Serve = Callable[..., Awaitable[None]]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[ClusterConfig, Path, Serve]]:
    """A TLS cluster's config, and a way to serve a node's port with some node's cert."""
    path = write_cluster(cluster_doc(dcs=1, replicas=1, tls=True), tmp_path / "cluster.toml")
    cfg = load_config(path)
    servers = []

    async def serve(as_node: str, on_port_of: str = "source", header_s: float = 5.0) -> None:
        files = cfg.tls_files(tmp_path, as_node)
        assert files is not None
        srv = http_server(
            Starlette(routes=[Route("/ok", _ok)]), header_timeout_s=header_s, idle_timeout_s=5,
            max_connections=8, tls=files.server_context(client_certs=False),
        )  # fmt: skip
        node = cfg.node(on_port_of)
        sock = tcp_listener(node.host, node.admin_port)
        servers.append((srv, asyncio.create_task(srv.serve(sockets=[sock]))))
        deadline = time.monotonic() + 10
        while not srv.started:
            assert time.monotonic() < deadline, "the server never started"
            await asyncio.sleep(0.01)  # uvicorn sets a flag, no event; bounded by the deadline

    yield cfg, tmp_path, serve
    for srv, task in servers:
        srv.should_exit = True
        await task


async def test_https_with_the_cluster_ca_and_the_nodes_name(cluster) -> None:
    cfg, base, serve = cluster
    await serve("source")
    http = ClusterHttp(cfg, base)
    assert http.url("source", "/ok").startswith("https://127.0.0.1:")
    async with http.async_client(timeout=5) as client:
        r = await client.get(http.url("source", "/ok"))
    assert r.status_code == 200 and r.json() == {"ok": True, "scheme": "https"}


async def test_a_plaintext_client_gets_no_answer_and_the_port_serves_on(cluster) -> None:
    cfg, base, serve = cluster
    await serve("source")
    http = ClusterHttp(cfg, base)
    plain = http.url("source", "/ok").replace("https://", "http://")
    async with httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(plain)
    async with http.async_client(timeout=5) as client:
        assert (await client.get(http.url("source", "/ok"))).status_code == 200


async def test_a_port_presenting_another_nodes_certificate_is_refused(cluster) -> None:
    """Every node's certificate is valid for 127.0.0.1; the client checks the node's name."""
    cfg, base, serve = cluster
    await serve("dc1-r0", on_port_of="source")
    http = ClusterHttp(cfg, base)
    async with http.async_client(timeout=5) as client:
        with pytest.raises(httpx.ConnectError, match=r"certificate verify failed.*source"):
            await client.get(http.url("source", "/ok"))


async def test_a_tls_handshake_never_started_is_cut_at_the_header_deadline(cluster) -> None:
    """uvicorn leaves asyncio's 60 s for a TLS handshake, before its own deadline and its
    connection cap see the connection; the node's server cuts it at the header deadline."""
    cfg, base, serve = cluster
    await serve("source", header_s=0.3)
    node = cfg.node("source")
    reader, writer = await asyncio.open_connection(node.host, node.admin_port)
    try:
        async with asyncio.timeout(5):  # 60 s without the bound
            assert await reader.read() == b""
    finally:
        writer.close()
    http = ClusterHttp(cfg, base)
    async with http.async_client(timeout=5) as client:
        assert (await client.get(http.url("source", "/ok"))).status_code == 200
