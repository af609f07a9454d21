"""Signed admin requests: role credentials derived from the cluster secret.

Every state-changing or model-exposing HTTP route of a node needs a credential (the policy is
``ekko.node.access``). The nodes share the cluster secret (the sync handshake uses it); each
role has its own key derived from it, so an operator can hand out a ``writer`` key that cannot
sign as ``operator``::

    role key = HMAC-SHA256(cluster secret, "ekko-role-v1|" + role)
    x-ekko-signature: role=<role>,t=<unix s>,nonce=<hex>,mac=<hex HMAC-SHA256(role key,
                      label|role|t|nonce|METHOD|path?query|body)>

A request dated more than ``MAX_SKEW_S`` from the node's clock is refused, and a node
remembers every nonce it accepted for twice that window (``NonceCache``), so a captured
request cannot be replayed. Clients call ``auth_headers`` (holding the cluster secret) or
``role_headers`` (holding one role's key, e.g. a file written by ``ekko cluster keys``).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

SIGNATURE_HEADER = "x-ekko-signature"
MAX_SKEW_S = 60.0
ROLES = ("reader", "writer", "operator", "node")
"""``reader``: row reads, status; ``writer``: row writes, training data; ``operator``:
rollback, snapshot, refresh, resets; ``node``: messages between the nodes of a cluster."""

_LABEL = b"ekko-admin-v2"
_ROLE_LABEL = "ekko-role-v1|"
_MAX_NONCE_CHARS = 64


class SignatureError(ValueError):
    """A request that must be signed is not, or not validly; the message says why (HTTP 401)."""


def role_key(secret: bytes, role: str) -> bytes:
    """The key of ``role``, derived from the cluster secret (as the nodes hold it)."""
    if not secret:
        raise ValueError("secret must be non-empty bytes")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return hmac.new(secret, (_ROLE_LABEL + role).encode(), hashlib.sha256).digest()


def _mac(key: bytes, role: str, t: int, nonce: str, method: str, target: str, body: bytes) -> str:
    parts = [_LABEL, role.encode(), str(t).encode(), nonce.encode(), method.upper().encode(),
             target.encode("utf-8", "surrogateescape"), body]  # fmt: skip
    return hmac.new(key, b"\n".join(parts), hashlib.sha256).hexdigest()


def role_headers(
    key: bytes,
    role: str,
    method: str,
    path: str,
    body: bytes = b"",
    now: float | None = None,
) -> dict[str, str]:
    """Headers signing one request with ``role``'s key; ``path`` includes any ``?query``
    exactly as sent."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    t = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    mac = _mac(key, role, t, nonce, method, path, body)
    return {SIGNATURE_HEADER: f"role={role},t={t},nonce={nonce},mac={mac}"}


def auth_headers(
    secret: bytes, role: str, method: str, path: str, body: bytes = b""
) -> dict[str, str]:
    """Headers signing one request as ``role`` with a key derived from the cluster secret."""
    return role_headers(role_key(secret, role), role, method, path, body)


def signed_json(
    secret: bytes, path: str, doc: Any, role: str = "node"
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a signed JSON POST to ``path``."""
    body = json.dumps(doc).encode()
    headers = auth_headers(secret, role, "POST", path, body)
    return body, {"content-type": "application/json", **headers}


@dataclass(frozen=True)
class Credential:
    """The parsed ``x-ekko-signature`` header: who claims to sign, when, and the MAC."""

    role: str
    t: int
    nonce: str
    mac: str


def parse_credential(header: str | None, target: str) -> Credential:
    """The credential in ``header``; ``SignatureError`` naming what is missing or malformed."""
    if not header:
        raise SignatureError(
            f"missing {SIGNATURE_HEADER} header: {target} needs a credential "
            "(see README: credentials)"
        )
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        cred = Credential(fields["role"], int(fields["t"]), fields["nonce"], fields["mac"])
    except (KeyError, ValueError):
        raise SignatureError(
            f"malformed {SIGNATURE_HEADER} header (want role=<role>,t=<unix>,nonce=<hex>,mac=<hex>)"
        ) from None
    if cred.role not in ROLES:
        raise SignatureError(f"unknown role {cred.role!r} (roles: {', '.join(ROLES)})")
    if not cred.nonce or len(cred.nonce) > _MAX_NONCE_CHARS:
        raise SignatureError(f"nonce must be 1 to {_MAX_NONCE_CHARS} characters")
    return cred


def verify_credential(
    secret: bytes,
    cred: Credential,
    method: str,
    target: str,
    body: bytes,
    now: float | None = None,
    max_skew_s: float = MAX_SKEW_S,
) -> None:
    """Raise ``SignatureError`` unless ``cred`` signs exactly this request, recently."""
    age = (time.time() if now is None else now) - cred.t
    if age > max_skew_s:
        raise SignatureError(f"signature is {age:.0f} s old (limit {max_skew_s:.0f} s)")
    if -age > max_skew_s:
        raise SignatureError(
            f"signature is dated {-age:.0f} s ahead of this node's clock (limit {max_skew_s:.0f} s)"
        )
    key = role_key(secret, cred.role)
    expected = _mac(key, cred.role, cred.t, cred.nonce, method, target, body).encode()
    if not hmac.compare_digest(cred.mac.encode("utf-8", "replace"), expected):
        raise SignatureError(
            f"signature does not match the request (wrong key for role {cred.role}, or altered)"
        )


class NonceCache:
    """Nonces of accepted requests, each kept for twice the clock-skew window.

    Why: a signature is valid for ``MAX_SKEW_S`` either side of its timestamp, so without
    memory anyone who saw a signed request (a log, a proxy) could send it again within that
    window. Only requests with a valid MAC are remembered, so the cache grows only with
    genuine traffic; ``max_entries`` bounds it even then (a full cache refuses, it never
    forgets early).
    """

    def __init__(self, window_s: float = 2 * MAX_SKEW_S, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: set[str] = set()
        self._order: collections.deque[tuple[float, str]] = collections.deque()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, now: float) -> None:
        """Remember ``nonce``; ``SignatureError`` if it was seen within the window."""
        while self._order and self._order[0][0] <= now - self.window_s:
            self._seen.discard(self._order.popleft()[1])
        if nonce in self._seen:
            raise SignatureError("replayed request: this nonce was already used")
        if len(self._seen) >= self.max_entries:
            raise SignatureError("too many signed requests in the replay window; retry later")
        self._seen.add(nonce)
        self._order.append((now, nonce))
