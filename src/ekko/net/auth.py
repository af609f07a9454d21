"""Sans-IO mutual challenge–response authentication over a shared cluster secret.

::

    server → Challenge(nonce_s, protocol_version, server_node)
    client → Auth(client_node, nonce_c, mac_c, protocol_version)
             mac_c = HMAC-SHA256(secret, b"ekko-client" + nonce_s + nonce_c + client_node)
    server → AuthOk(mac_s)
             mac_s = HMAC-SHA256(secret, b"ekko-server" + nonce_c + nonce_s)

Both nonces are exactly :data:`NONCE_BYTES` long, so the concatenations are unambiguous; the
distinct labels stop a MAC from one direction being reflected into the other. MACs are compared
with :func:`hmac.compare_digest`. Every failure raises :class:`~ekko.net.errors.AuthError`; the
transport then closes without sending anything else, so an unauthenticated peer never sees
more than the challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import ClassVar

from ekko.net.errors import AuthError
from ekko.net.handshake import Auth, AuthOk, Challenge

NONCE_BYTES = 32
MAX_NODE_NAME_BYTES = 255
_CLIENT_LABEL = b"ekko-client"
_SERVER_LABEL = b"ekko-server"


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _check_node_name(node: str) -> bytes:
    raw = node.encode("utf-8")
    if not raw or len(raw) > MAX_NODE_NAME_BYTES or not node.isprintable():
        raise AuthError(f"bad node name {node[:64]!r}")
    return raw


def _check_nonce(nonce: bytes, who: str) -> None:
    if len(nonce) != NONCE_BYTES:
        raise AuthError(f"{who} nonce is {len(nonce)} bytes, expected {NONCE_BYTES}")


def _check_version(theirs: int, ours: int) -> None:
    if theirs != ours:
        raise AuthError(f"protocol version mismatch: peer speaks {theirs}, we speak {ours}")


def _check_secret(secret: bytes) -> None:
    if not secret:
        raise ValueError("secret must be non-empty bytes")


class _Handshake:
    """What both sides hold: our node name, the secret, the protocol version we speak (the
    caller's: the transport knows no protocol) and our nonce."""

    def __init__(
        self, *, node: str, secret: bytes, protocol_version: int, nonce: bytes | None = None
    ) -> None:
        _check_secret(secret)
        self._name = _check_node_name(node)
        self._node = node
        self._secret = secret
        self._version = protocol_version
        self._nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
        _check_nonce(self._nonce, self._side)
        self.peer: str | None = None

    _side: ClassVar[str]


class ServerHandshake(_Handshake):
    """The accepting side's handshake state.

    Why sans-IO: the transport drives it over any byte stream, and tests drive it directly with
    fixed nonces. Use: ``start()`` → send the Challenge; ``receive_auth(msg)`` → send the
    returned AuthOk; ``peer`` is then the authenticated client name.
    """

    _side = "server"

    def start(self) -> Challenge:
        """The first (and, until the client proves itself, only) message the server sends."""
        return Challenge(nonce=self._nonce, protocol_version=self._version, node=self._node)

    def receive_auth(self, msg: object) -> AuthOk:
        """Verify the client's Auth; return the AuthOk to send. Raises AuthError."""
        if not isinstance(msg, Auth):
            raise AuthError(f"expected Auth, got {type(msg).__name__}")
        _check_version(msg.protocol_version, self._version)
        _check_nonce(msg.nonce, "client")
        name = _check_node_name(msg.node)
        expected = _mac(self._secret, _CLIENT_LABEL, self._nonce, msg.nonce, name)
        if not hmac.compare_digest(expected, msg.mac):
            raise AuthError(f"bad MAC from client {msg.node!r}: wrong cluster secret")
        self.peer = msg.node
        return AuthOk(mac=_mac(self._secret, _SERVER_LABEL, msg.nonce, self._nonce))


class ClientHandshake(_Handshake):
    """The connecting side's handshake state.

    Why: the client must also check the server holds the secret (mutual authentication), or a
    stranger could feed it forged rows. Use: ``receive_challenge(msg)`` → send the returned
    Auth; ``receive_ok(msg)`` → authenticated; ``peer`` is the server's node name.
    """

    _side = "client"
    _server_nonce: bytes | None = None
    authenticated = False

    def receive_challenge(self, msg: object) -> Auth:
        """Answer the server's Challenge. Raises AuthError on a version mismatch."""
        if not isinstance(msg, Challenge):
            raise AuthError(f"expected Challenge, got {type(msg).__name__}")
        _check_version(msg.protocol_version, self._version)
        _check_nonce(msg.nonce, "server")
        _check_node_name(msg.node)
        self._server_nonce = msg.nonce
        self.peer = msg.node
        mac = _mac(self._secret, _CLIENT_LABEL, msg.nonce, self._nonce, self._name)
        return Auth(node=self._node, nonce=self._nonce, mac=mac, protocol_version=self._version)

    def receive_ok(self, msg: object) -> None:
        """Verify the server's proof. Raises AuthError."""
        if self._server_nonce is None:
            raise AuthError("AuthOk before Challenge")
        if not isinstance(msg, AuthOk):
            raise AuthError(f"expected AuthOk, got {type(msg).__name__}")
        expected = _mac(self._secret, _SERVER_LABEL, self._nonce, self._server_nonce)
        if not hmac.compare_digest(expected, msg.mac):
            raise AuthError(f"bad MAC from server {self.peer!r}: wrong cluster secret")
        self.authenticated = True
