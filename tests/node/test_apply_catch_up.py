"""Rows a replica applies that were written before its link came up are catch-up, not update
latency (issue 16: a source restarted on its data dir made replicas report p50 69 s).

A real ``Responder`` answers a real ``Puller`` (sans-IO); every step's ``Ready.applied`` goes
through the node's ``ApplyFanout`` as in a node, with the link's arrival times.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ekko.node.apply_port import ApplyFanout
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.responder import Responder
from ekko.quality.latency import LatencyHistogram
from ekko.store import Store
from ekko.store.spec import TableSpec

SPEC = TableSpec("emb", 4, 2)
S = 1_000_000_000  # ns per second


def _write(store: Store, keys: range, at_s: float) -> None:
    k = np.arange(keys.start, keys.stop, dtype=np.int64)
    store.table("emb").write(k, np.ones((k.size, 4), np.float32), now_ns=int(at_s * S))


class _Link:
    """A responder and a puller handing messages over directly; pulls not yet answered
    stay in the outbox between steps, as on a socket."""

    def __init__(self, source: Store, port: ApplyFanout, now: float) -> None:
        self.source, self.port = source, port
        self.responder = Responder(source)
        config = PullerConfig(wait_ms=0, poll_interval_ms=0, max_bytes=2_000)
        self.puller = Puller(Store(cache_capacity=64), config)
        self.outbox = list(self.puller.start(now).sends)

    def sync(self, now: float) -> None:
        """Pull the source to the end at wall time ``now`` (every row's arrival time)."""
        self.outbox.extend(self.puller.tick(now).sends)
        for _ in range(500):
            held = self.puller.store.tables.get("emb")
            if held is not None and (held.knowledge >= self.source.table("emb").knowledge).all():
                return
            if not self.outbox:
                self.outbox = list(self.puller.tick(now).sends)
                continue
            _, req = self.outbox.pop(0)
            for _, resp in self.responder.receive("s", req, now).sends:
                ready = self.puller.receive(resp, now)
                if ready.applied is not None:
                    self.port(ready.applied)
                self.outbox.extend(ready.sends)
        raise AssertionError("the puller did not catch up")


def test_rows_written_before_the_link_came_up_are_catch_up_not_latency(caplog) -> None:
    source = Store(cache_capacity=64)
    source.create_table(SPEC)
    _write(source, range(0, 300), at_s=100.0)  # the previous run's rows
    hist = LatencyHistogram()
    port = ApplyFanout(hist, [], lambda: None)
    port.link_up("source", at=1_000.0)
    with caplog.at_level(logging.INFO, logger="ekko.node.apply_port"):
        link = _Link(source, port, now=1_000.0)
        link.sync(now=1_000.2)
        assert hist.count == 0 and port.catch_up_rows == 300
        assert port.status()["catching_up_rows"] == 300
        _write(source, range(300, 310), at_s=1_000.25)  # written while the link is up
        link.sync(now=1_000.3)
        assert hist.count == 10 and port.catch_up_rows == 300
        assert hist.quantile(0.99) == pytest.approx(50.0, rel=0.03)  # 50 ms, not 900 s
        assert not [r for r in caplog.records if "caught up" in r.getMessage()]  # too soon
        _write(source, range(310, 320), at_s=1_001.0)
        link.sync(now=1_001.25)  # 1.05 s without a catch-up row: caught up
    assert hist.count == 20 and port.catch_up_rows == 300
    assert port.status() == {
        "rows": 300, "upstream": "source", "link_up_at": 1_000.0, "catching_up_rows": 0,
    }  # fmt: skip
    caught = [r.getMessage() for r in caplog.records if "caught up" in r.getMessage()]
    assert caught == [
        "caught up from source: 300 rows written before the link came up, the last applied "
        "0.2 s after it"
    ]


def test_without_a_link_every_row_is_latency() -> None:
    """Callers that never say a link came up (the benches, the baseline tests) keep the
    histogram of every row."""
    source = Store(cache_capacity=64)
    source.create_table(SPEC)
    _write(source, range(0, 50), at_s=100.0)
    hist = LatencyHistogram()
    port = ApplyFanout(hist, [], lambda: None)
    _Link(source, port, now=101.0).sync(now=101.0)
    assert hist.count == 50 and port.catch_up_rows == 0


def test_a_recent_latency_window_is_the_histogram_less_an_earlier_copy() -> None:
    h = LatencyHistogram()
    h.record_ns(np.full(100, 5_000 * 1_000_000))  # a 5 s burst
    earlier = LatencyHistogram().merge(h)
    h.record_ns(np.full(50, 40 * 1_000_000))
    recent = h.since(earlier)
    assert recent.count == 50 and recent.quantile(0.99) == pytest.approx(40.0, rel=0.03)
    assert h.quantile(0.99) > 4_000  # the cumulative one is pinned by the burst
    h.reset()
    assert h.since(earlier).count == 0  # reset in between: nothing recorded since
