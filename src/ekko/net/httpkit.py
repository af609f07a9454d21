"""The HTTP toolkit every node route shares: errors as 4xx JSON, bounded bodies, safe JSON.

Admin, serving, training and guard routes all go through here, so a body is read the same
way everywhere and a malformed one is always a 4xx naming the problem, never a 500 or a
stalled event loop. A route declares its body limit once (``BodyRoute``; a route that
declares none takes ``CONTROL_BODY_BYTES``); ``BodyLimit``, the outermost layer of the app
(``bounded_app``), bounds whatever reads the body (the signature check in front of the
routes, or the handler): one over the limit is refused from ``content-length`` before a
byte of it is read, and one without a length is cut as the count passes the limit.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import reprlib
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")

MAX_BODY_BYTES = 16 << 20
"""Body limit of a data route (a row write of ~100 k rows of dim 16 fits; ``[http]
max_body_bytes`` sets the rows route's)."""
CONTROL_BODY_BYTES = 1 << 20
"""Body limit of a route that declares none: reads, control and guard messages."""
BODY_TIMEOUT_S = 30.0
"""A body must arrive within this long once the headers are in (a slow drip is refused)."""
OFFLOAD_BYTES = 256 << 10
"""JSON bodies larger than this are parsed in a worker thread, off the event loop."""
_MAX_INT_DIGITS = 20  # int64 needs at most 19 digits (and a sign)
_ENCODER = msgspec.json.Encoder()
_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$")

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""A non-negative int64 (an epoch, a version)."""
Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
"""A finite number: NaN and ±inf are refused by name (NaN fails both bounds)."""


class RequestError(ValueError):
    """A request that cannot be served as sent (HTTP ``status``); the message names the field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UnknownModel(RequestError, KeyError):
    """A model name this node does not serve (or train, or guard): HTTP 404."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r} (served: {known})", 404)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return self.args[0]


class OversizedInt(str):
    """An integer literal too long for any field (its digits are kept as a string): field
    validation refuses it by name instead of ``json.loads`` failing on the whole body."""

    def __repr__(self) -> str:
        return f"a {len(self.lstrip('-'))}-digit number"


class ErrorBody(msgspec.Struct):
    """What every refusal answers (4xx, 503): the reason, naming the field or the problem."""

    error: str


def json_response(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        _ENCODER.encode(doc), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return json_response(ErrorBody(message), status, headers)


def guarded_by(
    errors: Mapping[type[BaseException], int | tuple[int, str]],
) -> Callable[[Handler], Handler]:
    """A decorator mapping ``RequestError`` (its own status) and each of ``errors`` (the
    first that matches, in order) to its status with the reason, after the prefix if one is
    given (503 also says ``retry-after``; an error with ``http_headers`` adds those); the
    server keeps serving."""
    kinds = tuple(errors)
    table = {t: (v, "") if isinstance(v, int) else v for t, v in errors.items()}

    def guarded(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(request: Request) -> Response:
            try:
                return await fn(request)
            except RequestError as exc:
                headers = {"retry-after": "1"} if exc.status == 503 else None
                return error_response(str(exc), exc.status, headers)
            except kinds as exc:
                status, prefix = next(v for t, v in table.items() if isinstance(exc, t))
                headers = {"retry-after": "1"} if status == 503 else None
                extra = getattr(exc, "http_headers", None)  # fields a client reads (a 409's)
                if extra:
                    headers = {**(headers or {}), **extra}
                message = str(exc)
                if isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__:
                    message = str(exc.args[0]) if exc.args else message  # not its repr
                return error_response(prefix + message, status, headers)

        return wrapper

    return guarded


def by_model(objects: Mapping[str, T], request: Request) -> T:
    """The object for the request's ``{model}`` path parameter; 404 (``UnknownModel``) if none."""
    name = request.path_params["model"]
    obj = objects.get(name)
    if obj is None:
        raise UnknownModel(name, sorted(objects))
    return obj


class BodyRoute(Route):
    """A route that takes a body, with its limit and type declared beside its path.

    Why on the route: ``BodyLimit`` checks the limit before anything reads the body (the
    signature check in front of the routes reads it too), so the route table is the one place
    a limit is said, and a route added later cannot forget one (it gets
    ``CONTROL_BODY_BYTES``). ``body`` is the msgspec type the handler decodes the JSON body
    to (None: it takes none, or any), which the node's ``/openapi.json`` documents
    (``ekko.net.openapi``).
    """

    def __init__(
        self,
        path: str,
        endpoint: Callable[..., Any],
        *,
        methods: Collection[str] = ("POST",),
        max_body: int,
        body: Any = None,
    ) -> None:
        super().__init__(path, endpoint, methods=list(methods))
        self.max_body = max_body
        self.body = body


def body_limit(routes: Sequence[BaseRoute], scope: Scope, default: int) -> int:
    """The declared limit of the route ``scope`` goes to (``default`` if it declares none
    or none matches)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.max_body if isinstance(route, BodyRoute) else default
    return default


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """``RequestError`` 413 when ``content-length`` already says the body is over ``limit``."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body: {declared} bytes; the limit is {limit}", status=413)


def bounded_receive(receive: Receive, headers: Mapping[str, str], limit: int) -> Receive:
    """``receive`` bounded to ``limit`` body bytes: its first call raises ``RequestError``
    413 when ``content-length`` declares more (before reading any of it), and any call once
    the count passes ``limit`` (a body sent without a length, never read past the limit).

    The check waits for the first read so that a request refused for another reason first
    (a missing credential: 401) is answered as that, still without reading its body."""
    size = 0
    checked = False

    async def bounded() -> Message:
        nonlocal size, checked
        if not checked:
            check_declared_length(headers, limit)
            checked = True
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise RequestError(f"body: over {limit} bytes; the limit is {limit}", 413)
        return message

    return bounded


class BodyLimit:
    """ASGI middleware bounding every request's body by its route's declared limit (see the
    module docstring); outermost, so nothing in front of a handler reads past it."""

    def __init__(
        self, app: ASGIApp, routes: Sequence[BaseRoute], default: int = CONTROL_BODY_BYTES
    ) -> None:
        self.app = app
        self.routes = routes
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(self.routes, scope, self.default)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive(receive, headers, limit), watched)
        except RequestError as exc:  # a reader that did not answer it itself
            if started:
                raise
            await error_response(str(exc), exc.status)(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route 404, wrong method 405) as ``ErrorBody`` JSON
    naming the request, like every other refusal."""
    assert isinstance(exc, HTTPException)
    why = f"{exc.detail}: {request.method} {reprlib.repr(request.url.path)}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every route on this path, not only the first one's methods
        methods = {
            m
            for route in request.app.routes
            if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE
            for m in route.methods or ()
        }
        headers["Allow"] = ", ".join(sorted(methods))
        why += f" (allowed: {headers['Allow']})"
    return error_response(why, exc.status_code, headers)


def bounded_app(routes: Sequence[BaseRoute], middleware: Sequence[Middleware] = ()) -> Starlette:
    """A Starlette app over ``routes`` with ``BodyLimit`` outermost, then ``middleware``;
    every refusal, the router's too, is an ``ErrorBody``."""
    return Starlette(
        routes=list(routes),
        middleware=[Middleware(BodyLimit, routes=routes), *middleware],
        exception_handlers={HTTPException: _http_error},
    )


async def receive_body(receive: Receive, timeout: float = BODY_TIMEOUT_S) -> bytes | None:
    """The body from ASGI ``receive``, or None if the client went away; ``RequestError``
    408 if it takes longer than ``timeout`` to arrive (its size is bounded by ``BodyLimit``
    in front)."""
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise RequestError(f"body: not received within {timeout:.0f} s", 408) from None


async def read_body(request: Request) -> bytes:
    """The request body, bounded as ``receive_body`` says."""
    body = await receive_body(request.receive)
    if body is None:
        raise RequestError("body: the client disconnected while sending it")
    return body


def _int(raw: str) -> int | str:
    return OversizedInt(raw) if len(raw) > _MAX_INT_DIGITS else int(raw)


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; ``RequestError`` (400) naming what is wrong. Integer literals too
    long for int64 come back as ``OversizedInt`` for the field check to name."""
    try:
        return json.loads(body, parse_int=_int)
    except RecursionError:
        raise RequestError("body: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"body: not valid JSON: {exc}") from exc
    except ValueError as exc:  # any other literal json refuses to convert
        raise RequestError(f"body: not valid JSON: {exc}") from exc


def invalid(exc: msgspec.ValidationError, what: str) -> RequestError:
    """``exc`` as a 400 naming the field at fault (``what``: the expected shape, for a refusal
    of the body as a whole)."""
    text = str(exc)
    for bound in (f"`float` >= {-sys.float_info.max!r}", f"`float` <= {sys.float_info.max!r}"):
        text = text.replace(bound, "a finite number")  # ``Finite``: NaN fails the bounds too
    m = _AT.match(text)
    if m is None:  # the top level itself: wrong type or unknown field
        return RequestError(f"body: {text} (expected {what})")
    path = m["path"].lstrip(".")
    return RequestError(f"{path}: {m['msg'][0].lower()}{m['msg'][1:]}")


def convert(doc: Any, typ: type[T], what: str) -> T:
    """Parsed JSON ``doc`` as ``typ`` (a msgspec type); ``RequestError`` naming the field."""
    try:
        return msgspec.convert(doc, typ)
    except msgspec.ValidationError as exc:
        raise invalid(exc, what) from exc


async def offload(fn: Callable[..., Any], body: bytes, *args: Any, **kwargs: Any) -> Any:
    """``fn(body, *args, **kwargs)``, in a worker thread when ``body`` is large."""
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, body, *args, **kwargs)
    return fn(body, *args, **kwargs)
