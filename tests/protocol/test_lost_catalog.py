"""A lost answer that carried the session's catalog (DESIGN.md §3: drops are harmless).

Found by ``ekko sim``: a responder sends a session each catalog once; when that answer was
dropped, the next answer's rows named a table the replica never learnt and
``Puller.receive`` raised ``UnknownTableError``; a table with no rows was never learnt at
all. Every answer names the responder's catalog version: a puller that sees one newer than
the last catalog it received asks the responder to forget what it sent, and gets the
catalog and the rows again.
"""

from __future__ import annotations

import numpy as np

from ekko.protocol.puller import PullerConfig
from ekko.protocol.testing import SimNetwork, rows_by_key
from ekko.store import Store
from ekko.store.spec import TableSpec

SPEC = TableSpec("emb", 3, 2)


def _net(rows: int = 10) -> SimNetwork:
    net = SimNetwork(seed=1, puller_config=PullerConfig(wait_ms=100, window=2))
    source = Store()
    source.create_table(SPEC)
    net.add_node("source", source)
    if rows:
        keys = np.arange(rows, dtype=np.int64)
        net.write("source", "emb", keys, np.ones((rows, 3), np.float32))
    net.block("source", "replica")  # the answer carrying the catalog is lost
    net.add_node("replica", Store(origin=1), upstream="source")
    net.run_for(0.15)  # and the next: an empty answer when the parked pull expires
    net.unblock("source", "replica")
    return net


def _assert_equal(net: SimNetwork) -> None:
    src = net.nodes["source"].store.table("emb")
    rep = net.nodes["replica"].store.table("emb")
    for got, want in zip(rows_by_key(rep), rows_by_key(src), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rep.knowledge, src.knowledge)


def test_rows_of_a_table_whose_catalog_was_lost_are_sent_again_with_it() -> None:
    net = _net()
    net.write("source", "emb", np.arange(5, 15, dtype=np.int64), np.zeros((10, 3), np.float32))
    net.run_for(10.0)  # the next answer: rows of "emb", no catalog
    _assert_equal(net)


def test_a_quiet_table_whose_catalog_was_lost_is_learnt() -> None:
    """Nothing more is written: the next (empty) answer names a newer catalog."""
    net = _net()
    net.run_for(10.0)
    _assert_equal(net)


def test_an_empty_table_whose_catalog_was_lost_is_learnt() -> None:
    """No row ever names it: only the catalog version tells the replica it missed it."""
    net = _net(rows=0)
    net.run_for(10.0)
    assert net.nodes["replica"].store.specs() == [SPEC]
