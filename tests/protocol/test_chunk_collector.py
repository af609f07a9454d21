"""The responder's chunks: collected within a budget, holding only the rows they send, and
shared between sessions in step exactly as collecting afresh would answer."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from small_source import first_pull as _first_pull
from small_source import small_source as _source

from ekko.protocol.chunk_collector import ChunkCollector
from ekko.protocol.messages import PullRequest, PullResponse
from ekko.protocol.responder import Responder
from ekko.store import Store
from ekko.store.spec import HIGH_LANE, LANES


def test_the_same_range_at_the_same_state_is_collected_once() -> None:
    store = _source(rows=30)
    table = store.table("emb")
    collector = ChunkCollector(store)
    shards = np.arange(2)
    sent = np.zeros((2, len(LANES)), np.int64)
    a = collector.collect(table, HIGH_LANE, shards, sent, 1 << 20, True, None)
    b = collector.collect(table, HIGH_LANE, shards, sent.copy(), 1 << 20, True, None)
    assert a[0] is b[0] and a[0] is not None and a[0].rows == 30 and collector.hits == 1
    table.write(np.array([1], np.int64), np.zeros((1, 4), np.float32), now_ns=2)
    c = collector.collect(table, HIGH_LANE, shards, sent, 1 << 20, True, None)
    assert c[0] is not a[0] and collector.hits == 1  # the shard moved: collected again
    collector.forget()
    d = collector.collect(table, HIGH_LANE, shards, sent, 1 << 20, True, None)
    assert d[0] is not c[0] and collector.hits == 1  # forgotten (a new lineage)
    cut = collector.collect(table, HIGH_LANE, shards, sent, 5 * (24 + 16), True, None)
    assert cut[2] and cut[0] is not None and cut[0].rows == 5  # the budget truncated it


class _NoMemo(ChunkCollector):
    def _remember(self, key, entry):  # every answer collected afresh
        pass


def _fresh(store: Store) -> Responder:
    r = Responder(store)
    r._chunks = _NoMemo(store)
    return r


def _same_response(a: PullResponse, b: PullResponse) -> None:
    assert (a.req_id, a.more, a.tables, a.catalog_version) == (
        b.req_id,
        b.more,
        b.tables,
        b.catalog_version,
    )
    assert len(a.chunks) == len(b.chunks)
    for x, y in zip(a.chunks, b.chunks, strict=True):
        assert (x.table, x.lane, x.origin) == (y.table, y.lane, y.origin)
        for f in ("shards", "bases", "knowledge", "counts", "keys", "values", "versions", "wtimes"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert (a.holds is None) == (b.holds is None)


STEP = st.one_of(
    st.tuples(
        st.just("write"),
        st.lists(st.integers(0, 40), min_size=1, max_size=12),
        st.sampled_from(LANES),
    ),
    st.tuples(
        st.just("pull"), st.sampled_from("abc"), st.sampled_from([40, 200, 1 << 20]), st.booleans()
    ),
    st.tuples(st.just("changed")),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(STEP, max_size=30))
def test_shared_answers_equal_fresh_answers(steps: list[tuple]) -> None:
    """Whatever the sessions, budgets, waits and writes, a responder sharing answers between
    sessions sends exactly what one collecting every answer afresh sends."""
    stores = [_source(rows=20), _source(rows=20)]
    shared, fresh = Responder(stores[0]), _fresh(stores[1])
    req = 0
    for sid in "abc":
        req += 1
        got = [r.receive(sid, _first_pull(req), 0.0).sends for r in (shared, fresh)]
        for (_, a), (_, b) in zip(*got, strict=True):
            _same_response(a, b)
    for now, step in enumerate(steps, start=1):
        if step[0] == "write":
            keys = np.array(step[1], np.int64)
            for store in stores:
                store.table("emb").write(
                    keys, np.full((len(keys), 4), now, np.float32), now_ns=now, lanes=step[2]
                )
            continue
        if step[0] == "pull":
            req += 1
            msg = PullRequest(req, step[2], 500 if step[3] else 0)
            got = [r.receive(step[1], msg, float(now)).sends for r in (shared, fresh)]
        else:
            got = [r.store_changed(float(now)).sends for r in (shared, fresh)]
        assert [sid for sid, _ in got[0]] == [sid for sid, _ in got[1]]
        for (_, a), (_, b) in zip(*got, strict=True):
            _same_response(a, b)
    assert fresh.statistics().shared_chunks == 0  # the comparison is with fresh collection


def test_truncated_chunk_holds_only_the_rows_it_sends():
    """A budget-cut answer gathers only the rows that go out: its arrays are not views into a
    copy of everything newer than the cursor (which pinned the whole table per queued answer
    while a big catch-up waited on the WAN)."""
    store = _source(rows=5000)
    r = Responder(store)
    row_bytes = 24 + 16
    ((_, resp),) = r.receive("a", _first_pull(max_bytes=100 * row_bytes), 0.0).sends
    assert resp.more and sum(c.rows for c in resp.chunks) == 100
    for c in resp.chunks:
        for arr in (c.keys, c.values, c.versions, c.wtimes):
            owner = arr if arr.base is None else arr.base
            assert owner.nbytes == arr.nbytes
