"""The HTTP toolkit every node route shares: errors as 4xx JSON, bounded bodies, safe JSON.

Admin, serving, training and guard routes all go through here, so a body is read the same
way everywhere (refused from ``content-length`` before reading, counted while streaming,
bounded in time) and a malformed one is always a 4xx naming the problem, never a 500 or a
stalled event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

Handler = Callable[[Request], Awaitable[Response]]

MAX_BODY_BYTES = 16 << 20
"""Default body limit of a route (a row write of ~100 k rows of dim 16 fits)."""
BODY_TIMEOUT_S = 30.0
"""A body must arrive within this long once the headers are in (a slow drip is refused)."""
OFFLOAD_BYTES = 256 << 10
"""JSON bodies larger than this are parsed in a worker thread, off the event loop."""
_MAX_INT_DIGITS = 20  # int64 needs at most 19 digits (and a sign)
_ENCODER = msgspec.json.Encoder()


class RequestError(ValueError):
    """A request that cannot be served as sent (HTTP ``status``); the message names the field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class OversizedInt(str):
    """An integer literal too long for any field (its digits are kept as a string): field
    validation refuses it by name instead of ``json.loads`` failing on the whole body."""

    def __repr__(self) -> str:
        return f"a {len(self.lstrip('-'))}-digit number"


def json_response(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        _ENCODER.encode(doc), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def guarded_by(
    errors: Mapping[type[BaseException], int | tuple[int, str]],
) -> Callable[[Handler], Handler]:
    """A decorator mapping ``RequestError`` and each of ``errors`` (the first that matches,
    in order) to its status with the reason, after the prefix if one is given (503 also says
    ``retry-after``); the server keeps serving."""
    kinds = tuple(errors)
    table = {t: (v, "") if isinstance(v, int) else v for t, v in errors.items()}

    def guarded(fn: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            try:
                return await fn(request)
            except RequestError as exc:
                return error_response(str(exc), exc.status)
            except kinds as exc:
                status, prefix = next(v for t, v in table.items() if isinstance(exc, t))
                headers = {"retry-after": "1"} if status == 503 else None
                message = str(exc).strip("'\"") if isinstance(exc, KeyError) else str(exc)
                return error_response(prefix + message, status, headers)

        return wrapper

    return guarded


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """``RequestError`` 413 when ``content-length`` already says the body is over ``limit``."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body: {declared} bytes; the limit is {limit}", status=413)


async def receive_body(
    receive: Receive,
    headers: Mapping[str, str],
    limit: int = MAX_BODY_BYTES,
    timeout: float = BODY_TIMEOUT_S,
) -> bytes | None:
    """The body from ASGI ``receive``, or None if the client went away. ``RequestError``
    413 when over ``limit`` bytes (before reading, if the length is declared; as soon as the
    count passes it, if chunked), 408 if it takes longer than ``timeout`` to arrive."""
    check_declared_length(headers, limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    raise RequestError(f"body: over {limit} bytes; the limit is {limit}", 413)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise RequestError(f"body: not received within {timeout:.0f} s", 408) from None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, bounded as ``receive_body`` says."""
    body = await receive_body(request.receive, request.headers, limit)
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


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The body parsed as JSON, large bodies in a worker thread so the loop keeps serving."""
    body = await read_body(request, limit)
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_json, body)
    return parse_json(body)


async def offload(fn: Callable[..., Any], body: bytes, *args: Any, **kwargs: Any) -> Any:
    """``fn(body, *args, **kwargs)``, in a worker thread when ``body`` is large."""
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, body, *args, **kwargs)
    return fn(body, *args, **kwargs)
