"""Who may call which route of a node's HTTP API, and the middleware that enforces it.

Why a table in one place: a route added anywhere (admin, serving, training, guard) is covered
by the same rule set, and one not listed needs ``operator`` — a new route is closed until
someone decides otherwise. Credentials are signed requests (``ekko.net.signed_requests``).

=========================================  ==============================================
route                                      roles accepted
=========================================  ==============================================
GET /health, /metrics, /ready              open
GET /openapi.json                          open (routes and body shapes, no model data)
GET /ui, /v1/ui/series                     open (the figures /metrics exports, no rows)
GET /v2, /v2/health/live|ready             open (the Open Inference Protocol's probes)
GET /v1/models, POST .../predict           open with ``[http] serve_open`` (default),
POST .../feedback                          else reader+ / writer+
GET /v2/models/{m}, /v2/models/{m}/ready   as predict (with ``serve_open``, open;
POST /v2/models/{m}/infer                  else reader+), under .../versions/{v} too
GET /v1/status, /v1/latency                reader, writer, operator
GET /v1/knowledge                          reader, writer, operator, node
GET /v1/tables, /v1/tables/{t}/rows       reader, writer, operator
POST /v1/tables/{t}/lookup                 reader, writer, operator
POST /v1/lookup (several tables, binary)   reader, writer, operator, node
GET /v1/models/{m}/health|metrics|train    reader, writer, operator
POST /v1/tables, /v1/tables/{t}/rows       writer, operator
POST /v1/tables/{t}/delete                 writer, operator
POST /v1/streams/write (upgrade)           writer, operator
POST /v1/streams/lookup (upgrade)          reader, writer, operator, node
POST /v1/models/{m}/train                  writer, operator
POST /v1/latency/reset                     operator
POST /v1/checkpoint/refresh                operator
POST /v1/models/{m}/rollback               operator
POST /v1/models/{m}/train/quality/reset    operator
GET /v1/snapshot                           operator, node
POST /v1/models/{m}/guard/*                node
anything else                              operator
=========================================  ==============================================
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Generator
from dataclasses import dataclass

import httpx
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ekko.net.httpkit import OFFLOAD_BYTES, RequestError, receive_body
from ekko.net.openapi import Security
from ekko.net.signed_requests import (
    RESIGN_HEADER,
    ROLES,
    SIGNATURE_HEADER,
    NonceCache,
    SignatureError,
    SignedBeforeStart,
    auth_headers,
    parse_credential,
    target_of,
    verify_credential,
)

READ = frozenset({"reader", "writer", "operator"})
WRITE = frozenset({"writer", "operator"})
OPERATE = frozenset({"operator"})
NODE = frozenset({"node"})
_SERVING = "serving"  # placeholder: open, or READ/WRITE when serving is closed

_M = r"/v1/models/[^/]+"
_RULES: tuple[tuple[str, str, frozenset[str] | str | None], ...] = (
    ("GET", r"/health", None),
    ("GET", r"/metrics", None),
    ("GET", r"/ready", None),
    ("GET", r"/openapi\.json", None),
    ("GET", r"/ui", None),
    ("GET", r"/v1/ui/series", None),
    ("GET", r"/v1/status", READ),
    ("GET", r"/v1/latency", READ),
    ("GET", r"/v1/knowledge", READ | NODE),
    ("POST", r"/v1/latency/reset", OPERATE),
    ("GET", r"/v1/tables", READ),
    ("POST", r"/v1/tables", WRITE),
    # a table's name may hold "/" (dense/...): {t} is everything up to the last segment
    ("GET", r"/v1/tables/.+/rows", READ),
    ("POST", r"/v1/tables/.+/rows", WRITE),
    ("POST", r"/v1/streams/write", WRITE),
    ("POST", r"/v1/streams/lookup", READ | NODE),  # a serving node's scatter, streamed
    ("POST", r"/v1/tables/.+/lookup", READ),
    ("POST", r"/v1/tables/.+/delete", WRITE),
    ("POST", r"/v1/lookup", READ | NODE),  # several tables' rows: a serving node's scatter
    ("GET", r"/v1/snapshot", OPERATE | NODE),
    ("POST", r"/v1/checkpoint/refresh", OPERATE),
    ("GET", r"/v2(/health/(live|ready))?", None),
    ("GET", r"/v1/models", _SERVING),
    ("GET", r"/v2/models/[^/]+(/versions/[^/]+)?(/ready)?", _SERVING),
    ("POST", r"/v2/models/[^/]+(/versions/[^/]+)?/infer", _SERVING),
    ("POST", _M + r"/predict", _SERVING),
    ("POST", _M + r"/feedback", _SERVING),
    ("GET", _M + r"/(health|metrics|train)", READ),
    ("POST", _M + r"/train", WRITE),
    ("POST", _M + r"/train/quality/reset", OPERATE),
    ("POST", _M + r"/rollback", OPERATE),
    ("POST", _M + r"/guard/[^/]+", NODE),
)
_COMPILED = tuple((m, re.compile(p + r"\Z"), roles) for m, p, roles in _RULES)


@dataclass(frozen=True)
class AccessPolicy:
    """Which roles each route accepts (``None``: open). ``serve_open`` leaves predict,
    feedback and the model list open to the application's servers; closed, predict needs
    a reader and feedback (it moves the guard's quality figures) a writer."""

    serve_open: bool = True

    def required(self, method: str, path: str) -> frozenset[str] | None:
        method = "GET" if method == "HEAD" else method
        for m, pattern, roles in _COMPILED:
            if m == method and pattern.match(path):
                if roles != _SERVING:
                    return roles  # type: ignore[return-value]
                if self.serve_open:
                    return None
                return WRITE if path.endswith("/feedback") else READ
        return OPERATE


def least_role(method: str, path: str, policy: AccessPolicy | None = None) -> str | None:
    """The least powerful role ``policy`` accepts for this route (None: open)."""
    need = (policy or AccessPolicy()).required(method, path.partition("?")[0])
    return None if need is None else next(r for r in ROLES if r in need)


def signature_security(policy: AccessPolicy) -> Security:
    """The signed-request scheme as OpenAPI states it: the ``x-ekko-signature`` header, and
    the roles ``policy`` accepts on each route."""
    scheme = {
        "type": "apiKey",
        "in": "header",
        "name": SIGNATURE_HEADER,
        "description": (
            "role=<role>,t=<unix s.ms>,nonce=<hex>,mac=<hex HMAC-SHA256(role key, label|role|t|"
            "nonce|METHOD|host|path?query|body)>, role key = HMAC-SHA256(cluster secret, "
            '"ekko-role-v1|" + role); see ekko.net.signed_requests'
        ),
    }
    return Security("ekkoSignature", scheme, policy.required)


class ClusterAuth(httpx.Auth):
    """httpx auth for clients holding the cluster secret (CLI, demo, benches, tests): each
    request is signed with the least role its route accepts, so no caller names roles.

    Why not one operator credential for everything: a request then proves no more than it
    needs, and a client bug that reaches the wrong route is refused rather than obeyed."""

    requires_request_body = True

    def __init__(self, secret: bytes, policy: AccessPolicy | None = None) -> None:
        self.secret = secret
        self.policy = policy or AccessPolicy(serve_open=False)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = target_of(request.url)
        role = least_role(request.method, target, self.policy)
        if role is None:
            yield request
            return
        for _ in range(3):  # a node that started after we signed asks for a fresh signature
            host = request.headers["host"]
            body = request.content
            request.headers.update(
                auth_headers(self.secret, role, request.method, target, body, host=host)
            )
            response = yield request
            if response.status_code != 401 or RESIGN_HEADER not in response.headers:
                return


class RequireRole:
    """ASGI middleware: a request to a route that needs a role must carry a credential for
    one of the roles ``policy`` accepts there, or it is answered (401 missing/invalid/replayed,
    403 wrong role, 413/408 body) with the reason and never reaches the app. The role is
    checked before the body is read; the body is read once to check the MAC (bounded by its
    route's limit: ``BodyLimit`` in front) and handed to the app unchanged."""

    def __init__(
        self,
        app: ASGIApp,
        secret: bytes,
        policy: AccessPolicy | None = None,
        nonces: NonceCache | None = None,
        names: frozenset[str] = frozenset(),
    ) -> None:
        if not secret:
            raise ValueError("secret must be non-empty bytes")
        self.app = app
        self.secret = secret
        self.policy = policy or AccessPolicy()
        self.nonces = nonces if nonces is not None else NonceCache()  # an empty one is falsy
        self.names = frozenset(n.lower() for n in names)
        self.refused: dict[int, int] = {}  # by status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        need = self.policy.required(method, path)
        if need is None:
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        target = f"{path}?{query}" if query else path
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            cred = parse_credential(headers.get(SIGNATURE_HEADER), f"{method} {path}")
        except SignatureError as exc:
            return await self._refuse(scope, receive, send, 401, str(exc))
        if cred.role not in need:
            why = f"role {cred.role} may not {method} {path} (needs {' or '.join(sorted(need))})"
            return await self._refuse(scope, receive, send, 403, why)
        try:
            body = await receive_body(receive)
        except RequestError as exc:
            return await self._refuse(scope, receive, send, exc.status, str(exc))
        if body is None:
            return  # the client went away
        host = headers.get("host", "")
        if not is_own_host(host, scope.get("server"), self.names):
            why = f"request signed for host {host[:100]!r}, which is not this node"
            return await self._refuse(scope, receive, send, 401, why)
        args = (self.secret, cred, method, target, body)
        try:
            if len(body) > OFFLOAD_BYTES:
                await asyncio.to_thread(verify_credential, *args, host=host)
            else:
                verify_credential(*args, host=host)
            self.nonces.add(cred.nonce, time.time(), signed_at=cred.t)
        except SignedBeforeStart as exc:
            return await self._refuse(scope, receive, send, 401, str(exc), resign=True)
        except SignatureError as exc:
            return await self._refuse(scope, receive, send, 401, str(exc))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        why: str,
        resign: bool = False,
    ) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1
        headers = {RESIGN_HEADER: "1"} if resign else None
        await JSONResponse({"error": why}, status_code=status, headers=headers)(
            scope, receive, send
        )


def _split_host(host: str) -> tuple[str, int | None]:
    name, sep, port = host.rpartition(":") if not host.endswith("]") else ("", "", "")
    if not sep:
        name, port = host, ""
    name = name.strip("[]").lower()
    try:
        return name, int(port) if port else None
    except ValueError:
        return name, -1


def is_own_host(host: str, server: tuple[str, int] | None, names: frozenset[str]) -> bool:
    """Whether a request's ``Host`` names this node: the address and port the connection
    reached (``server``; ``localhost`` too when that is a loopback address), or one of
    ``names`` (``[http] names``: DNS names or proxied ``host:port`` the node is reached by)."""
    if not host:
        return False
    name, port = _split_host(host)
    if host.lower() in names or (port is None and name in names):
        return True
    if server is None:
        return False
    s_host, s_port = server[0].lower(), server[1] or 80  # ASGI test transports give None
    if (port if port is not None else 80) != s_port:
        return False
    if name == s_host or name in names:
        return True
    try:
        loopback = ipaddress.ip_address(s_host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    return loopback and name == "localhost"
