"""A node's per-peer pull totals are its pullers' own statistics: a link is shown from the
moment it is pulled from, ended pullers' counts are kept, and a checkpoint copy counts as
one response."""

from __future__ import annotations

import numpy as np

from ekko.node.links import PullLinks
from ekko.protocol.chunk_codec import encode_chunk
from ekko.protocol.messages import Chunk, PullResponse
from ekko.protocol.puller import Puller
from ekko.store import Store
from ekko.store.spec import TableSpec


def _puller_with_rows(n: int) -> Puller:
    store = Store()
    store.create_table(TableSpec("emb", 8, 1))
    puller = Puller(store, latency=None)
    puller.start(0.0)
    keys = np.arange(n, dtype=np.int64)
    chunk = Chunk(
        "emb", 0, np.array([0]), np.array([0]), np.array([n]), np.array([n]), keys,
        np.ones((n, 8), np.float32), keys + 1, np.full(n, 9, np.int64),
    )  # fmt: skip
    puller.receive(PullResponse(1, 0, [encode_chunk(chunk, "int8")]), 1.0)
    return puller


def test_links_sum_live_and_ended_pullers_and_copies_per_peer():
    links = PullLinks()
    links.declare("ckpt-source")
    assert links.as_json()["ckpt-source"]["responses"] == 0  # shown before any copy
    first = _puller_with_rows(3)
    links.attach("leader", first)
    live = links.statistics()["leader"]
    assert (live.responses, live.rows_received) == (1, 3) and live.bytes_received > 0
    links.attach("leader", _puller_with_rows(5))  # reconnected: the first one's counts stay
    assert links.statistics()["leader"].rows_received == 8
    links.detach("leader")
    ended = links.statistics()["leader"]
    assert ended.rows_received == 8 and ended.in_flight == 0
    links.count_copy("ckpt-source", rows=100, nbytes=4_000)
    doc = links.as_json()["ckpt-source"]
    assert (doc["rows"], doc["bytes"], doc["responses"]) == (100, 4_000, 1)
    assert doc == links.as_json()["ckpt-source"] and "rows_received" not in doc


def test_two_live_links_to_one_peer_are_both_counted_and_end_apart():
    links = PullLinks()  # a partitioned node pulling two groups of partitions from a source
    p0, p1 = _puller_with_rows(3), _puller_with_rows(5)
    links.attach("source", p0)
    links.attach("source", p1)
    assert links.statistics()["source"].rows_received == 8
    links.detach("source", p0)
    assert links.statistics()["source"].rows_received == 8  # p0's kept, p1 still live
    assert links.statistics()["source"].in_flight == p1.statistics().in_flight
    links.detach("source", p1)
    assert links.statistics()["source"].rows_received == 8 and "source" not in links._live
