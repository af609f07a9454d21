"""A pull link whose upstream stops answering while its connection stays open (SIGSTOP, a
wedged process) is dropped, so the replica fails over to its next candidate: the link
waited on it for ever (a follower of a stopped leader of ``ekko up --partitions 2`` stayed
behind it 30 s after the writes stopped, never dialling the source)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ekko.net.memory import memory_pair
from ekko.node.sync_host import SYNC_SCHEMA, run_pull_link
from ekko.protocol.puller import Puller, PullerConfig
from ekko.store import Store


async def test_a_link_silent_past_two_request_timeouts_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours, theirs = memory_pair(schema=SYNC_SCHEMA, names=("replica", "leader"))
    cfg = PullerConfig(wait_ms=50, poll_interval_ms=0, request_timeout_ms=100)
    puller = Puller(Store(), cfg, latency=None)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with caplog.at_level(logging.WARNING):
        broke = await asyncio.wait_for(run_pull_link(ours, puller, lambda msg: None), 5)
    took = loop.time() - start
    assert broke is False  # the link broke: the caller fails over
    assert 0.3 <= took < 1.5  # 2 x (wait_ms + poll_interval_ms + request_timeout_ms)
    assert puller.statistics().timeouts >= 1
    assert "silent" in caplog.text and "leader" in caplog.text
    await theirs.close()
