"""A sync session fed values a store cannot hold: refused by name, never an exception in the
node. Found by the sync-port fuzz (``tests/integration/test_fuzz.py``): a cursor's knowledge
of 2**63 or more (msgpack carries uint64) reached the responder, whose ``sent[shard, lane] =
knowledge`` raised ``OverflowError`` out of the session (logged as a failed connection
handler with its traceback). Cursor fields and traffic counts are int64 in the message types
now, so such a frame is a named frame error that closes that connection; and a node's
traffic tally saturates, so reports summed from followers can no longer make its own pull
unencodable (``LocalFrameError``, which stopped the link's sender)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from ekko.net.errors import TransportError
from ekko.net.framing import encode_frame
from ekko.net.memory import memory_pair
from ekko.net.transport import ListenerStats
from ekko.node.metrics import sync_port_metrics
from ekko.node.sync_host import SYNC_SCHEMA, Outbox, ResponderHost
from ekko.protocol.messages import Catalog, CatalogRequest, Cursor, Error, PullRequest
from ekko.protocol.responder import Responder
from ekko.protocol.traffic import MAX_COUNT, TrafficTally
from ekko.store import Store
from ekko.store.spec import TableSpec


def _source() -> Store:
    store = Store(cache_capacity=64)
    t = store.create_table(TableSpec("emb", 4, 2))
    t.write(np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32), now_ns=1)
    return store


async def _session(*sends: PullRequest | CatalogRequest) -> tuple[list, bool]:
    """What a puller sending ``sends`` then a catalog ping gets back, and whether the
    session ended with the connection closed; ``serve_session`` must return, not raise."""
    server, client = memory_pair(schema=SYNC_SCHEMA, names=("source", "puller"))
    host = ResponderHost(Responder(_source()))
    session = asyncio.create_task(host.serve_session(server))
    got: list = []
    closed = False
    for msg in [*sends, CatalogRequest(req_id=99)]:
        await client.send(msg)
    try:
        async with asyncio.timeout(5):
            while not (got and isinstance(got[-1], Catalog)):
                got.append(await client.recv())
    except TransportError:
        closed = True
    await client.close()
    async with asyncio.timeout(5):
        await session  # raises whatever escaped the session
    await host.close()
    return got, closed


@pytest.mark.parametrize("knowledge", [2**63, 2**64 - 1])
async def test_a_cursor_beyond_int64_is_a_frame_error_that_closes_the_session(
    knowledge: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ekko.net")
    got, closed = await _session(PullRequest(1, 1000, 0, [Cursor("emb", 0, 0, knowledge)]))
    assert closed and got == []
    assert any(
        "bad frame" in r.getMessage() and "cursors[0].knowledge" in r.getMessage()
        for r in caplog.records
    )


async def test_a_traffic_count_beyond_int64_is_refused_and_bad_cursors_are_named() -> None:
    got, closed = await _session(PullRequest(1, 1000, traffic={"ctr": 2**63}))
    assert closed and got == []
    bad = PullRequest(2, 1000, 0, [Cursor("emb", 2**63 - 1, 0, 0)])
    got, closed = await _session(bad)
    assert not closed
    assert isinstance(got[0], Error) and got[0].code == "bad_cursor", got
    assert "got shard 9223372036854775807" in got[0].reason


def test_a_tally_saturates_so_its_report_stays_encodable() -> None:
    tally = TrafficTally()
    for _ in range(3):
        tally.add({"ctr": MAX_COUNT})
    owed = tally.take()
    assert owed == {"ctr": MAX_COUNT}
    encode_frame(PullRequest(1, 1000, traffic=owed))  # 3 * MAX_COUNT could not be encoded


def test_sessions_that_failed_are_counted_in_metrics() -> None:
    """A session that still ends in an exception of the node's is logged with its traceback
    by the listener and now shows in /metrics too (the fuzz asserts it stays 0)."""
    collect = sync_port_metrics("source", lambda: ListenerStats(handler_errors=2))
    samples = {s.name: s for family in collect() for s in family.samples}
    got = samples["ekko_sync_session_errors_total"]
    assert got.labels == {"node": "source"} and got.value == 2


async def test_a_message_that_cannot_be_framed_closes_the_link_instead_of_stalling_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outbox stopped at a ``LocalFrameError`` and left its connection open, so every
    later pull waited forever behind it (a traffic sum beyond uint64 did that); it now
    closes the link, which is dialled again, and logs the error with its traceback."""
    ours, theirs = memory_pair(schema=SYNC_SCHEMA, names=("replica", "source"))
    outbox = Outbox(ours)
    outbox.put(PullRequest(1, 1000, traffic={"ctr": 2**70}))  # no msgpack int holds it
    outbox.put(PullRequest(2, 1000))
    with pytest.raises(TransportError):
        async with asyncio.timeout(5):
            await theirs.recv()
    assert ours.closed
    assert any(r.exc_info and "closing the link" in r.getMessage() for r in caplog.records)
    await outbox.close()
    await theirs.close()
