"""Signed admin requests: role credentials derived from the cluster secret.

Every state-changing or model-exposing HTTP route of a node needs a credential (the policy is
``ekko.node.access``). The nodes share the cluster secret (the sync handshake uses it); each
role has its own key derived from it, so an operator can hand out a ``writer`` key that cannot
sign as ``operator``::

    role key = HMAC-SHA256(cluster secret, "ekko-role-v1|" + role)
    x-ekko-signature: role=<role>,t=<unix s, ms>,nonce=<hex>,mac=<hex HMAC-SHA256(role key,
                      label|role|t|nonce|METHOD|host|path?query|body)>

``host`` is the request's ``Host`` header (``host:port`` as the client addressed the node):
a node accepts only its own (``RequireRole``), so a request signed for one node is refused by
every other. A request dated more than ``MAX_SKEW_S`` from the node's clock is refused, and a
node remembers every nonce it accepted for twice that window (``NonceCache``). The cache lives
in memory, so a node also refuses anything dated before the cache began (its start): every
timestamp it accepts is covered by the nonces it remembers, and a captured request cannot be
replayed after a restart either. Such a refusal carries ``RESIGN_HEADER``; clients sign again
(``ClusterAuth`` does). Clients call ``auth_headers`` (holding the cluster secret) or
``role_headers`` (holding one role's key, e.g. a file written by ``ekko cluster keys``).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx

SIGNATURE_HEADER = "x-ekko-signature"
RESIGN_HEADER = "x-ekko-resign"
"""On a 401: the signature predates the node's start; the same request signed now is accepted."""
MAX_SKEW_S = 60.0
ROLES = ("reader", "writer", "operator", "node")
"""``reader``: row reads, status; ``writer``: row writes, training data; ``operator``:
rollback, snapshot, refresh, resets; ``node``: messages between the nodes of a cluster."""

_LABEL = b"ekko-admin-v3"
_ROLE_LABEL = "ekko-role-v1|"
_MAX_NONCE_CHARS = 64


class SignatureError(ValueError):
    """A request that must be signed is not, or not validly; the message says why (HTTP 401)."""


class SignedBeforeStart(SignatureError):
    """A valid signature dated before the node started: the node cannot know whether it was
    used before the restart, so it refuses it; the client signs again (``RESIGN_HEADER``)."""


def _ms_floor(t: float) -> float:
    return math.floor(t * 1000.0) / 1000.0


def role_key(secret: bytes, role: str) -> bytes:
    """The key of ``role``, derived from the cluster secret (as the nodes hold it)."""
    if not secret:
        raise ValueError("secret must be non-empty bytes")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return hmac.new(secret, (_ROLE_LABEL + role).encode(), hashlib.sha256).digest()


def _mac(
    key: bytes, role: str, t: str, nonce: str, method: str, host: str, target: str, body: bytes
) -> str:
    parts = [_LABEL, role.encode(), t.encode(), nonce.encode(), method.upper().encode(),
             host.lower().encode("utf-8", "surrogateescape"),
             target.encode("utf-8", "surrogateescape"), b""]  # fmt: skip
    mac = hmac.new(key, b"\n".join(parts), hashlib.sha256)
    mac.update(body)  # the same MAC as over the joined bytes, without copying a large body
    return mac.hexdigest()


def role_headers(
    key: bytes,
    role: str,
    method: str,
    path: str,
    body: bytes = b"",
    now: float | None = None,
    *,
    host: str,
) -> dict[str, str]:
    """Headers signing one request with ``role``'s key for the node at ``host`` (the ``Host``
    header as sent: ``host:port``, see ``host_of``); ``path`` includes any ``?query``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if not host:
        raise ValueError("host must name the node the request is for (its Host header)")
    t = f"{_ms_floor(time.time() if now is None else now):.3f}"
    nonce = secrets.token_hex(16)
    mac = _mac(key, role, t, nonce, method, host, path, body)
    return {SIGNATURE_HEADER: f"role={role},t={t},nonce={nonce},mac={mac}"}


def host_of(url: str) -> str:
    """The ``Host`` header an HTTP client sends for ``url`` (``host:port``, default port
    omitted): what a signature for that URL must name."""
    return httpx.URL(url).netloc.decode("ascii")


def target_of(url: str | httpx.URL) -> str:
    """What a signature for ``url`` signs as its target: the path percent-decoded (as the
    node routes it: ``dense%2Fx`` is ``dense/x``) and the query as sent."""
    u = httpx.URL(url)
    query = u.query.decode("latin-1")
    return f"{u.path}?{query}" if query else u.path


def auth_headers(
    secret: bytes, role: str, method: str, path: str, body: bytes = b"", *, host: str
) -> dict[str, str]:
    """Headers signing one request to the node at ``host`` as ``role``, with a key derived
    from the cluster secret."""
    return role_headers(role_key(secret, role), role, method, path, body, host=host)


def signed_json(
    secret: bytes, url: str, doc: Any, role: str = "node"
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a signed JSON POST to ``url`` (the full URL: it names the node)."""
    body = json.dumps(doc).encode()
    headers = auth_headers(secret, role, "POST", target_of(url), body, host=host_of(url))
    return body, {"content-type": "application/json", **headers}


def needs_resign(response: httpx.Response) -> bool:
    """Whether ``response`` refused a signature only for predating the node's start."""
    return response.status_code == 401 and RESIGN_HEADER in response.headers


@dataclass(frozen=True)
class Credential:
    """The parsed ``x-ekko-signature`` header: who claims to sign, when, and the MAC."""

    role: str
    t: float
    t_text: str  # as signed
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
        t_text = fields["t"]
        if len(t_text) > 24 or not math.isfinite(t := float(t_text)):
            raise ValueError(t_text)
        cred = Credential(fields["role"], t, t_text, fields["nonce"], fields["mac"])
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
    *,
    host: str,
) -> None:
    """Raise ``SignatureError`` unless ``cred`` signs exactly this request to ``host``
    (the ``Host`` header it came with), recently."""
    age = (time.time() if now is None else now) - cred.t
    if age > max_skew_s:
        raise SignatureError(f"signature is {age:.0f} s old (limit {max_skew_s:.0f} s)")
    if -age > max_skew_s:
        raise SignatureError(
            f"signature is dated {-age:.0f} s ahead of this node's clock (limit {max_skew_s:.0f} s)"
        )
    key = role_key(secret, cred.role)
    expected = _mac(key, cred.role, cred.t_text, cred.nonce, method, host, target, body).encode()
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
    forgets early). The cache is complete only for signatures dated from its creation on
    (``started``): an older one may have been used before a restart, so it is refused.
    """

    def __init__(
        self,
        window_s: float = 2 * MAX_SKEW_S,
        max_entries: int = 1_000_000,
        started: float | None = None,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        # The millisecond it began: the port was still the previous process's before it.
        self.started = _ms_floor(time.time() if started is None else started)
        self._seen: set[str] = set()
        self._order: collections.deque[tuple[float, str]] = collections.deque()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, now: float, signed_at: float | None = None) -> None:
        """Remember ``nonce``; ``SignatureError`` if it was seen within the window, or
        ``SignedBeforeStart`` if it was signed (``signed_at``) before this cache began."""
        if signed_at is not None and round(signed_at * 1000.0) < round(self.started * 1000.0):
            raise SignedBeforeStart(
                f"signature is dated {self.started - signed_at:.3f} s before this node started;"
                " sign the request again"
            )
        while self._order and self._order[0][0] <= now - self.window_s:
            self._seen.discard(self._order.popleft()[1])
        if nonce in self._seen:
            raise SignatureError("replayed request: this nonce was already used")
        if len(self._seen) >= self.max_entries:
            raise SignatureError("too many signed requests in the replay window; retry later")
        self._seen.add(nonce)
        self._order.append((now, nonce))
