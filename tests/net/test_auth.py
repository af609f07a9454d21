"""Mutual HMAC challenge–response: sans-IO state machines, then over TCP."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ekko.net.auth import NONCE_BYTES, ClientHandshake, ServerHandshake
from ekko.net.connection import Connection
from ekko.net.errors import AuthError
from ekko.net.framing import FrameDecoder, encode_frame
from ekko.net.handshake import Auth, AuthOk, Challenge, HandshakeMessage
from ekko.net.transport import connect, serve
from ekko.node.sync_host import SYNC_SCHEMA
from ekko.protocol.messages import PROTOCOL_VERSION, CatalogRequest

SECRET = b"cluster-secret"


def _pair(
    server_secret: bytes = SECRET, client_secret: bytes = SECRET
) -> tuple[ServerHandshake, ClientHandshake]:
    return (
        ServerHandshake(node="src", secret=server_secret, protocol_version=PROTOCOL_VERSION),
        ClientHandshake(node="dc1-leader", secret=client_secret, protocol_version=PROTOCOL_VERSION),
    )


# -- sans-IO -------------------------------------------------------------------------------------


def test_good_secret_authenticates_both_ways() -> None:
    server, client = _pair()
    auth = client.receive_challenge(server.start())
    client.receive_ok(server.receive_auth(auth))
    assert server.peer == "dc1-leader" and client.peer == "src" and client.authenticated


def test_wrong_secret_fails_on_the_server() -> None:
    server, client = _pair(client_secret=b"other")
    auth = client.receive_challenge(server.start())
    with pytest.raises(AuthError, match="wrong cluster secret"):
        server.receive_auth(auth)
    assert server.peer is None


def test_wrong_secret_fails_on_the_client() -> None:
    """A server without the secret cannot produce a valid AuthOk (mutual authentication)."""
    server, client = _pair(server_secret=b"other")
    client.receive_challenge(server.start())
    with pytest.raises(AuthError, match="wrong cluster secret"):
        client.receive_ok(AuthOk(mac=b"\x00" * 32))
    assert not client.authenticated


def test_client_mac_cannot_be_reflected_as_server_proof() -> None:
    server, client = _pair()
    auth = client.receive_challenge(server.start())
    with pytest.raises(AuthError):
        client.receive_ok(AuthOk(mac=auth.mac))


def test_mac_binds_node_name_and_nonces() -> None:
    server, client = _pair()
    auth = client.receive_challenge(server.start())
    forged = Auth(node="someone-else", nonce=auth.nonce, mac=auth.mac, protocol_version=1)
    with pytest.raises(AuthError):
        server.receive_auth(forged)
    other_server = ServerHandshake(
        node="src", secret=SECRET, protocol_version=PROTOCOL_VERSION
    )  # another connection's challenge
    with pytest.raises(AuthError):
        other_server.receive_auth(auth)


def test_version_mismatch_names_both_versions_on_either_side() -> None:
    server = ServerHandshake(node="src", secret=SECRET, protocol_version=PROTOCOL_VERSION + 1)
    client = ClientHandshake(node="c", secret=SECRET, protocol_version=PROTOCOL_VERSION)
    with pytest.raises(
        AuthError, match=rf"peer speaks {PROTOCOL_VERSION + 1}.*we speak {PROTOCOL_VERSION}"
    ):
        client.receive_challenge(server.start())
    server = ServerHandshake(node="src", secret=SECRET, protocol_version=PROTOCOL_VERSION)
    old = ClientHandshake(node="c", secret=SECRET, protocol_version=PROTOCOL_VERSION + 5)
    auth = old.receive_challenge(
        Challenge(nonce=b"s" * NONCE_BYTES, protocol_version=PROTOCOL_VERSION + 5, node="x")
    )
    with pytest.raises(
        AuthError, match=rf"peer speaks {PROTOCOL_VERSION + 5}.*we speak {PROTOCOL_VERSION}"
    ):
        server.receive_auth(auth)


def test_unexpected_messages_and_bad_nonces_are_auth_errors() -> None:
    server, client = _pair()
    with pytest.raises(AuthError, match="expected Auth"):
        server.receive_auth(server.start())
    with pytest.raises(AuthError, match="before Challenge"):
        client.receive_ok(AuthOk(mac=b""))
    with pytest.raises(AuthError, match="nonce"):
        client.receive_challenge(
            Challenge(nonce=b"short", protocol_version=PROTOCOL_VERSION, node="s")
        )


# -- over TCP ------------------------------------------------------------------------------------


async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.read()


def _frames(data: bytes) -> list[object]:
    return FrameDecoder(message_type=HandshakeMessage).feed(data)


async def _eager_server(handled: list[str]):
    async def on_connection(conn: Connection) -> None:
        handled.append(conn.peer)
        await conn.send(CatalogRequest(req_id=1))  # a data message the moment it is allowed

    return await serve(
        "127.0.0.1", 0, node="src", secret=SECRET, schema=SYNC_SCHEMA, on_connection=on_connection
    )


async def test_good_secret_over_tcp() -> None:
    handled: list[str] = []
    async with await _eager_server(handled) as listener:
        conn = await connect(
            "127.0.0.1", listener.port, node="dc1", secret=SECRET, schema=SYNC_SCHEMA
        )
        async with conn:
            assert conn.peer == "src"
            assert await conn.recv() == CatalogRequest(req_id=1)
        assert handled == ["dc1"]
        assert listener.stats.authenticated == 1 and listener.stats.auth_failures == 0


async def test_wrong_secret_over_tcp_fails_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    handled: list[str] = []
    caplog.set_level(logging.WARNING, logger="ekko.net")
    async with await _eager_server(handled) as listener:
        with pytest.raises(AuthError, match="closed the connection before the handshake completed"):
            await connect(
                "127.0.0.1", listener.port, node="dc1", secret=b"wrong", schema=SYNC_SCHEMA
            )
        # the server side failed too (it counts and logs before it closes, so this is settled
        # once the client saw the close), and the handler never ran
        assert listener.stats.auth_failures == 1 and listener.stats.authenticated == 0
        assert handled == []
        assert "wrong cluster secret" in caplog.text


async def test_wrong_secret_server_sends_nothing_but_the_challenge() -> None:
    handled: list[str] = []
    async with await _eager_server(handled) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        dec = FrameDecoder(message_type=HandshakeMessage)
        async with asyncio.timeout(10):
            while not (got := dec.feed(await reader.read(1))):
                pass
        (challenge,) = got
        assert isinstance(challenge, Challenge)
        client = ClientHandshake(
            node="intruder", secret=b"wrong", protocol_version=PROTOCOL_VERSION
        )
        writer.write(encode_frame(client.receive_challenge(challenge)))
        rest = await _read_until_eof(reader)
        writer.close()
        assert rest == b"" and dec.buffered_bytes == 0
        assert handled == []


async def test_version_mismatch_over_tcp(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    async with await _eager_server([]) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        dec = FrameDecoder(message_type=HandshakeMessage)
        async with asyncio.timeout(10):
            while not (got := dec.feed(await reader.read(1))):
                pass
        client = ClientHandshake(
            node="future", secret=SECRET, protocol_version=PROTOCOL_VERSION + 1
        )
        auth = client.receive_challenge(
            Challenge(nonce=got[0].nonce, protocol_version=PROTOCOL_VERSION + 1, node="src")
        )
        writer.write(encode_frame(auth))
        assert await _read_until_eof(reader) == b""
        writer.close()
    assert f"peer speaks {PROTOCOL_VERSION + 1}, we speak {PROTOCOL_VERSION}" in caplog.text
