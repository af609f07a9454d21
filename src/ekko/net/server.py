"""A TCP server that owns one task per accepted connection."""

from __future__ import annotations

import asyncio
from typing import Any, Self


class TaskServer:
    """Listens and runs each accepted connection in a task of its own, which it owns.

    Why: ``close`` must end every connection (a bench's relay, a node's listener, a test),
    callers bind port 0 and need the real ``port``, and the accept count feeds the stats.
    Accepting is a plain callback that spawns our own task, so ``close`` may cancel it
    without asyncio's stream callback logging the cancellation as an error. Subclasses
    implement ``_handle``.
    """

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepted = 0

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when asked for port 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, host, port)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        task = asyncio.create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting and end every connection's task."""
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the listening socket and every connection's task are gone."""
        if self._server is not None:
            await self._server.wait_closed()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
