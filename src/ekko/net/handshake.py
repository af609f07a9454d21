"""Handshake messages: the only messages a connection carries before authentication.

They are a separate union from the protocol's ``Message`` so an unauthenticated peer can never
reach the sync protocol: before the handshake completes the frame decoder is typed with
:data:`HandshakeMessage` and any data message is a decode error.
"""

from __future__ import annotations

import msgspec


class Challenge(msgspec.Struct, frozen=True, tag=True):
    """Server → client: a fresh nonce to bind the client's MAC to this connection."""

    nonce: bytes
    protocol_version: int
    node: str


class Auth(msgspec.Struct, frozen=True, tag=True):
    """Client → server: who the client is, its own nonce, and proof it holds the secret."""

    node: str
    nonce: bytes
    mac: bytes
    protocol_version: int


class AuthOk(msgspec.Struct, frozen=True, tag=True):
    """Server → client: proof the server holds the secret too (mutual authentication)."""

    mac: bytes


HandshakeMessage = Challenge | Auth | AuthOk
