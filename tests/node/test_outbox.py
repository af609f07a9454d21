"""A connection's outbox closes without swallowing its caller's cancellation: a replica
whose upstream link was closing when SIGTERM cancelled it kept dialing for good."""

from __future__ import annotations

import asyncio

import pytest

from ekko.node.sync_host import Outbox
from ekko.protocol.messages import CatalogRequest


class SlowToStop:
    """A connection whose send, once cancelled, finishes only when ``release`` is set (a
    frame still leaving over the WAN delay line)."""

    peer = "slow"

    def __init__(self) -> None:
        self.sending = asyncio.Event()
        self.release = asyncio.Event()
        self.closed = False

    async def send(self, msg: object) -> int:
        self.sending.set()
        try:
            await asyncio.Event().wait()
        finally:
            await self.release.wait()
        return 0

    async def close(self) -> None:
        self.closed = True


async def test_close_lets_the_callers_cancellation_through() -> None:
    conn = SlowToStop()
    outbox = Outbox(conn)  # type: ignore[arg-type]
    outbox.put(CatalogRequest(req_id=1))
    await asyncio.wait_for(conn.sending.wait(), 5)
    closing = asyncio.create_task(outbox.close())
    await asyncio.sleep(0)  # close() now waits for the outbox's task
    closing.cancel()  # the node's shutdown cancels the link's task meanwhile
    conn.release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, 5)
    assert outbox.task.cancelled() and conn.closed


async def test_close_alone_ends_the_outbox_and_the_connection() -> None:
    conn = SlowToStop()
    outbox = Outbox(conn)  # type: ignore[arg-type]
    outbox.put(CatalogRequest(req_id=1))
    await asyncio.wait_for(conn.sending.wait(), 5)
    conn.release.set()
    await asyncio.wait_for(outbox.close(), 5)
    assert outbox.task.cancelled() and conn.closed
