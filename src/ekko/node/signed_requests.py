"""Signed admin requests between the nodes of a cluster (and from its operator).

A guard message redirects every DC's traffic or rolls a model back; on a plain HTTP port
anyone who can reach a node could forge one. The nodes already share the cluster secret (the
sync handshake uses it), so these requests carry an HMAC of what they say::

    x-ekko-signature: t=<unix seconds>,mac=<hex HMAC-SHA256(secret, label|t|method|path|body)>

A request older or newer than ``MAX_SKEW_S`` is refused, which bounds replays to that window
(the guard's messages are states, so a replay within it changes nothing). ``RequireSignature``
checks the routes that must be signed before the app sees them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SIGNATURE_HEADER = "x-ekko-signature"
MAX_SKEW_S = 60.0
MAX_SIGNED_BODY = 1 << 20  # guard messages and rollbacks are small
_LABEL = b"ekko-admin-v1"

# Node-to-node guard messages and the operator's rollback.
SIGNED_PATHS = re.compile(r"^/v1/models/[^/]+/(guard/[^/]+|rollback)$")


class SignatureError(ValueError):
    """A request that must be signed is not, or not validly; the message says why."""


def _mac(secret: bytes, t: int, method: str, path: str, body: bytes) -> str:
    msg = b"\n".join([_LABEL, str(t).encode(), method.upper().encode(), path.encode(), body])
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign_request(
    secret: bytes, method: str, path: str, body: bytes, now: float | None = None
) -> str:
    """The ``x-ekko-signature`` header value for this request."""
    if not secret:
        raise ValueError("secret must be non-empty bytes")
    t = int(time.time() if now is None else now)
    return f"t={t},mac={_mac(secret, t, method, path, body)}"


def signed_json(secret: bytes, path: str, doc: Any) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a signed JSON POST to ``path``."""
    body = json.dumps(doc).encode()
    sig = sign_request(secret, "POST", path, body)
    return body, {"content-type": "application/json", SIGNATURE_HEADER: sig}


def verify_request(
    secret: bytes,
    method: str,
    path: str,
    body: bytes,
    header: str | None,
    now: float | None = None,
    max_skew_s: float = MAX_SKEW_S,
) -> None:
    """Raise ``SignatureError`` unless ``header`` signs exactly this request, recently."""
    if not header:
        raise SignatureError(
            f"missing {SIGNATURE_HEADER} header: {path} accepts signed requests only"
        )
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        t = int(fields["t"])
        mac = fields["mac"]
    except (KeyError, ValueError):
        raise SignatureError(
            f"malformed {SIGNATURE_HEADER} header (want t=<unix>,mac=<hex>)"
        ) from None
    age = (time.time() if now is None else now) - t
    if age > max_skew_s:
        raise SignatureError(f"signature is {age:.0f} s old (limit {max_skew_s:.0f} s)")
    if -age > max_skew_s:
        raise SignatureError(
            f"signature is dated {-age:.0f} s ahead of this node's clock (limit {max_skew_s:.0f} s)"
        )
    expected = _mac(secret, t, method, path, body).encode()
    if not hmac.compare_digest(mac.encode("utf-8", "replace"), expected):
        raise SignatureError("signature does not match the request (wrong secret, or altered)")


class RequireSignature:
    """ASGI middleware: a POST to a path matching ``paths`` must carry a valid signature, or
    it is answered 401 with the reason and never reaches the app. The body is read once to
    check it and handed to the app unchanged."""

    def __init__(self, app: ASGIApp, secret: bytes, paths: re.Pattern[str] = SIGNED_PATHS) -> None:
        if not secret:
            raise ValueError("secret must be non-empty bytes")
        self.app = app
        self.secret = secret
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not self.paths.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_SIGNED_BODY:
                await _refuse(send, 413, f"body over {MAX_SIGNED_BODY} bytes on a signed route")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            verify_request(self.secret, "POST", scope["path"], body, headers.get(SIGNATURE_HEADER))
        except SignatureError as exc:
            await _refuse(send, 401, str(exc))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, why: str) -> None:
    payload = json.dumps({"error": why}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})
