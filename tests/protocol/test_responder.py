"""Responder behaviour: long-poll parking, budgets, sessions, named errors."""

from __future__ import annotations

import numpy as np
from small_source import first_pull as _first_pull
from small_source import small_source as _source

from ekko.protocol.messages import Catalog, CatalogRequest, Cursor, Error, PullRequest, PullResponse
from ekko.protocol.responder import Responder
from ekko.store.spec import TableSpec


def test_first_pull_returns_every_row_and_catalog():
    store = _source()
    r = Responder(store)
    ((sid, resp),) = r.receive("a", _first_pull(), 0.0).sends
    assert isinstance(resp, PullResponse) and sid == "a"
    assert sum(c.rows for c in resp.chunks) == 10
    assert [t.name for t in resp.tables] == ["emb"]
    assert not resp.more


def test_session_does_not_resend_and_long_poll_parks_until_write():
    store = _source()
    r = Responder(store)
    r.receive("a", _first_pull(), 0.0)
    ready = r.receive("a", PullRequest(2, 1 << 20, 500), 0.1)
    assert ready.sends == [] and ready.wake_at == 0.6
    store.table("emb").write(np.array([3], np.int64), np.zeros((1, 4), np.float32), now_ns=2)
    ((_, resp),) = r.store_changed(0.2).sends
    assert resp.req_id == 2
    assert [c.keys.tolist() for c in resp.chunks if c.rows] == [[3]]
    # The low lane carries no rows but its knowledge moves with the shard's version counter.
    assert all(c.knowledge.tolist() == [5] for c in resp.chunks)


def test_parked_pull_expires_empty():
    store = _source()
    r = Responder(store)
    r.receive("a", _first_pull(), 0.0)
    r.receive("a", PullRequest(2, 1 << 20, 100), 0.0)
    assert r.tick(0.05).sends == []
    ((_, resp),) = r.tick(0.1).sends
    assert resp.req_id == 2 and resp.chunks == []


def test_budget_truncates_with_more_and_prefix_knowledge():
    store = _source(rows=50)
    r = Responder(store)
    row_bytes = 24 + 16
    ((_, resp),) = r.receive("a", _first_pull(max_bytes=10 * row_bytes), 0.0).sends
    assert resp.more
    assert sum(c.rows for c in resp.chunks) == 10
    c = resp.chunks[0]
    # Knowledge of a cut shard is the last version sent: a valid cursor to continue from.
    assert int(c.knowledge[-1]) == int(c.versions[-1])


def test_unknown_table_cursor_is_a_named_error():
    r = Responder(_source())
    ((_, err),) = r.receive("a", PullRequest(7, 100, 0, [Cursor("nope", 0, 0, 0)]), 0.0).sends
    assert isinstance(err, Error) and err.code == "unknown_table" and "nope" in err.reason


def test_catalog_request():
    r = Responder(_source())
    ((_, cat),) = r.receive("a", CatalogRequest(5), 0.0).sends
    assert isinstance(cat, Catalog) and cat.tables == [TableSpec("emb", 4, 2)]


# -- sessions in step share one answer -----------------------------------------------------------


def test_sessions_in_step_get_the_same_chunks_once():
    """Three pullers parked on the same state (DC leaders on the source's latest write) get
    the same Chunk objects for the next write: collected once, encoded once downstream."""
    store = _source()
    r = Responder(store)
    for sid in "abc":
        r.receive(sid, _first_pull(), 0.0)
        r.receive(sid, PullRequest(2, 1 << 20, 500), 0.0)
    before = r.statistics().shared_chunks
    store.table("emb").write(np.array([3, 4], np.int64), np.zeros((2, 4), np.float32), now_ns=2)
    sends = r.store_changed(0.1).sends
    assert sorted(sid for sid, _ in sends) == ["a", "b", "c"]
    first = sends[0][1].chunks
    assert sum(c.rows for c in first) == 2
    for _, resp in sends[1:]:
        assert len(resp.chunks) == len(first)
        assert all(x is y for x, y in zip(resp.chunks, first, strict=True))
    assert r.statistics().shared_chunks - before == 2 * len(first)
    # Each session still advanced on its own: nothing new for any of them now.
    for sid in "abc":
        assert r.receive(sid, PullRequest(3, 1 << 20, 500), 0.2).sends == []
