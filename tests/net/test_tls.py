"""Sync links over mutual TLS: who is refused, by which side, and what each side says.

A peer must hold a certificate from the cluster CA, be the node it dials or claims in the
secret handshake, and speak TLS at all; each refusal is logged by the refusing listener
(and counted), and the dialer's error names the cause. The conformance suite in
``test_transport`` runs over TLS too (``tcp-tls``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from ekko.net.connection import Connection
from ekko.net.errors import AuthError, BrokenConnection
from ekko.net.tls import TlsFiles
from ekko.net.transport import Listener, connect, serve
from ekko.node.sync_host import SYNC_SCHEMA
from ekko.protocol.messages import CatalogRequest

from .tls_files import Pki

SECRET = b"s3cret"
TIMEOUT = 10.0


async def _echo(conn: Connection) -> None:
    await conn.send(await conn.recv())


async def _listen(files: TlsFiles | None, handshake_timeout: float = 5.0) -> Listener:
    return await serve(
        "127.0.0.1", 0, node="server", secret=SECRET, schema=SYNC_SCHEMA, on_connection=_echo,
        tls=files.server_context(client_certs=True) if files else None,
        handshake_timeout=handshake_timeout,
    )  # fmt: skip


async def _dial(
    port: int, files: TlsFiles | None, *, node: str = "client", server_name: str = "server"
) -> Connection:
    return await connect(
        "127.0.0.1", port, node=node, secret=SECRET, schema=SYNC_SCHEMA, timeout=TIMEOUT,
        tls=files.client_context() if files else None, server_name=server_name,
    )  # fmt: skip


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Listener]:
    listener = await _listen(pki.files("server"))
    async with listener:
        yield listener


async def _refusal_logged(listener: Listener, caplog: pytest.LogCaptureFixture) -> str:
    async with asyncio.timeout(TIMEOUT):
        while listener.stats.auth_failures == 0:
            await asyncio.sleep(0.01)  # the listener's task logs on its own; bounded
    return caplog.text


async def test_cluster_certificates_on_both_sides_connect_and_name_each_other(
    server: Listener, pki: Pki
) -> None:
    conn = await _dial(server.port, pki.files("client"))
    async with conn:
        await conn.send(CatalogRequest(7))
        assert await conn.recv() == CatalogRequest(7)
        assert conn.peer == "server"
    assert server.stats.authenticated == 1 and server.stats.auth_failures == 0


async def test_a_client_certificate_from_another_ca_is_refused_by_the_server(
    server: Listener, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    # It trusts our CA (its certificate is public) and holds the secret: TLS still refuses it.
    stranger = pki.files("client", issuer="other", trust="cluster")
    with pytest.raises(AuthError, match="refused our TLS certificate"):
        await _dial(server.port, stranger)
    text = await _refusal_logged(server, caplog)
    assert (
        "refusing 127.0.0.1:" in text and "TLS handshake failed: certificate verify failed" in text
    )
    assert server.stats.authenticated == 0


async def test_a_server_certificate_from_another_ca_is_refused_by_the_client(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    async with await _listen(pki.files("server", issuer="other", trust="cluster")) as rogue:
        with pytest.raises(
            AuthError,
            match=r"TLS handshake with .* failed: certificate verify.*not signed by the cluster CA",
        ):
            await _dial(rogue.port, pki.files("client"))
        # ...and the server sees the client hang up in the TLS handshake
        text = await _refusal_logged(rogue, caplog)
        assert "refusing 127.0.0.1:" in text and "TLS handshake" in text
        assert rogue.stats.authenticated == 0


async def test_a_server_must_be_the_node_the_client_dials(server: Listener, pki: Pki) -> None:
    with pytest.raises(
        AuthError, match=r"certificate verify failed.*server-b.*not issued to that node"
    ):
        await _dial(server.port, pki.files("client"), server_name="server-b")


async def test_a_client_may_claim_only_the_node_its_certificate_names(
    server: Listener, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Fixes "any holder of the secret can claim a node name" where TLS is on."""
    caplog.set_level(logging.WARNING, logger="ekko.net")
    with pytest.raises(AuthError):
        await _dial(server.port, pki.files("client"), node="impostor")
    text = await _refusal_logged(server, caplog)
    assert "client claims node 'impostor' but its TLS certificate is issued to 'client'" in text


async def test_a_plaintext_client_is_refused_by_a_tls_port(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    async with await _listen(pki.files("server"), handshake_timeout=0.3) as listener:
        with pytest.raises((AuthError, BrokenConnection)):
            await _dial(listener.port, None)
        text = await _refusal_logged(listener, caplog)
        assert "TLS handshake timed out (a client without TLS?)" in text
        assert listener.stats.authenticated == 0


async def test_a_tls_client_refuses_a_plaintext_port(pki: Pki) -> None:
    async with await _listen(None) as listener:
        with pytest.raises(AuthError, match="does not speak TLS"):
            await _dial(listener.port, pki.files("client"))
