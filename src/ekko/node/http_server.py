"""The node's HTTP server: uvicorn inside the node's event loop, with deadlines and a cap.

uvicorn alone closes a keep-alive connection only after a response, so a connection that
never sends a request is held forever, and every byte that arrives restarts its keep-alive
timer, so a client sending a header byte a second is held for as long as it likes.
``DeadlineProtocol`` adds the missing deadline: a request's headers must be complete within
``header_timeout_s`` of the connection opening or of the previous response, or the connection
is closed. Bodies are bounded in size and time where they are read (``ekko.httpkit``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_INCOMPLETE_HEADERS = 16 << 10
"""Bytes of a request head h11 buffers before answering 400 (uvicorn's default is larger)."""


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: the node, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers.

    Why: see the module docstring; without it one slow client per socket holds the port.
    The deadline runs from the connection's start and again from each response's end, so
    an idle connection is also closed (after the keep-alive timeout, or this, whichever is
    first). ``header_timeout_s`` is set by ``deadline_protocol``.
    """

    header_timeout_s = 10.0
    timed_out = 0  # connections closed by the deadline, across the process

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in; the body is bounded where it is read

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expire(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            type(self).timed_out += 1
            self.transport.close()


def deadline_protocol(header_timeout_s: float) -> type[DeadlineProtocol]:
    """``DeadlineProtocol`` with this header deadline (uvicorn builds protocols from a class)."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"header_timeout_s": header_timeout_s})


def http_server(
    app: ASGIApp,
    *,
    header_timeout_s: float,
    idle_timeout_s: float,
    max_connections: int,
) -> EmbeddedServer:
    """The server for a node's admin/serving app. Over ``max_connections`` open connections
    (or requests in flight) uvicorn answers 503."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        http=deadline_protocol(header_timeout_s),
        timeout_keep_alive=idle_timeout_s,  # type: ignore[arg-type]  (call_later takes float)
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_INCOMPLETE_HEADERS,
    )
    return EmbeddedServer(config)
