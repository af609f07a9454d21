"""Pulls answered by full scan (DESIGN.md §3, update cache + dominator; Catch-up).

A new replica, a reconnect after more than ``cache_capacity`` writes to a shard, a node
restored from a snapshot, or ``use_cache = false`` all answer from one pass over the table.
That pass once chained its cursors in a two-lane array while ``LANES`` has three: rows of
one shard's high lane went out in another shard's new-key chunk and were stored in the
wrong lane, or the source crashed. Checked here against a brute-force answer per response
(every lane, every codec, budgets that cut), and end to end on a simulated network.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.codec import CODECS, max_abs_error
from ekko.protocol.chunk_codec import decode_chunk, row_bytes
from ekko.protocol.chunk_collector import ROW_OVERHEAD_BYTES
from ekko.protocol.messages import Chunk, Cursor, PullRequest, PullResponse
from ekko.protocol.puller import PullerConfig
from ekko.protocol.responder import Responder, ResponderConfig
from ekko.protocol.testing import Faults, SimNetwork, rows_by_key
from ekko.store import Store, Table, shard_of
from ekko.store.spec import LANES, TableSpec

DIM = 3
LANE = st.sampled_from(LANES)
CODEC = st.sampled_from((None, *CODECS))


def _write(table: Table, rows: list[tuple[int, int]], now: int) -> None:
    keys = np.array([k for k, _ in rows], np.int64)
    lanes = np.array([ln for _, ln in rows], np.uint8)
    values = (keys[:, None] * 0.25 + np.arange(DIM) + now).astype(np.float32)
    table.write(keys, values, now_ns=now, lanes=lanes)


def _check_chunk(table: Table, chunk: Chunk, sent: np.ndarray, codec: str | None) -> None:
    """``chunk`` holds exactly the rows of its lane with base < version <= knowledge in each
    of its shards, each base is what the session was sent, and knowledge never passes the
    store's; then ``sent`` moves to the chunk's knowledge."""
    c = decode_chunk(chunk, table.dim)
    lane = c.lane
    assert (c.bases == sent[c.shards, lane]).all()
    assert (c.knowledge >= c.bases).all()
    assert (c.knowledge <= np.maximum(table.knowledge[c.shards, lane], c.bases)).all()
    keys, _, versions, _, lanes = table.all_rows()
    row_shards = shard_of(keys, table.num_shards)
    want = []
    for s, base, top, count in zip(c.shards, c.bases, c.knowledge, c.counts, strict=True):
        hit = np.flatnonzero(
            (row_shards == s) & (lanes == lane) & (versions > base) & (versions <= top)
        )
        hit = hit[np.argsort(versions[hit], kind="stable")]
        assert hit.size == count, (int(s), lane, int(base), int(top))
        want.append(hit)
    slots = np.concatenate(want) if want else np.zeros(0, np.int64)
    w_keys, w_values, w_versions, w_wtimes, _ = table.rows_at(slots)
    order = np.arange(slots.size) if codec is None else np.argsort(w_keys, kind="stable")
    np.testing.assert_array_equal(c.keys, w_keys[order])
    np.testing.assert_array_equal(c.versions, w_versions[order])
    np.testing.assert_array_equal(c.wtimes, w_wtimes[order])
    bound = np.zeros(slots.size) if codec is None else max_abs_error(w_values[order], codec)
    assert (np.abs(c.values - w_values[order]) <= bound[:, None]).all()
    sent[c.shards, lane] = c.knowledge


def _same(a: PullResponse, b: PullResponse, dim: int) -> None:
    assert (a.more, len(a.chunks)) == (b.more, len(b.chunks))
    for x, y in zip(a.chunks, b.chunks, strict=True):
        x, y = decode_chunk(x, dim), decode_chunk(y, dim)
        assert x.lane == y.lane
        for f in ("shards", "bases", "knowledge", "counts", "keys", "values", "versions"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


ROWS = st.lists(st.tuples(st.integers(0, 120), LANE), min_size=1, max_size=40)


@st.composite
def sessions(draw: st.DrawFn) -> tuple:
    num_shards = draw(st.integers(1, 8))
    cursor = st.tuples(st.integers(0, num_shards - 1), LANE, st.integers(0, 60))
    step = st.one_of(
        st.tuples(st.just("write"), ROWS),
        st.tuples(st.just("pull"), st.sampled_from([0, 1, 3, 10, 1 << 20])),
        st.tuples(st.just("restate"), st.lists(cursor, min_size=1, max_size=6)),
    )
    return (
        num_shards,
        draw(st.integers(1, 6)),
        draw(CODEC),
        draw(ROWS),
        draw(st.lists(step, max_size=25)),
    )


@settings(max_examples=150, deadline=None)
@given(session=sessions())
def test_every_answer_holds_exactly_the_rows_owed_on_both_paths(session: tuple) -> None:
    """Random writes in every lane, pulls with budgets that cut (in rows of the session's
    codec: none, one, a few, all), and restated knowledge: a responder answering from the
    update cache and one always scanning send the same answers, and each is exactly what a
    brute-force look at the store says is owed."""
    num_shards, cache, codec, first_rows, steps = session
    store = Store(cache_capacity=cache)
    table = store.create_table(TableSpec("emb", DIM, num_shards))
    _write(table, first_rows, 1)
    responders = [Responder(store, ResponderConfig(use_cache=u)) for u in (True, False)]
    sent = np.zeros((num_shards, len(LANES)), np.int64)
    rb = row_bytes(codec, DIM, ROW_OVERHEAD_BYTES)
    new_replica = [Cursor("emb", s, ln, 0) for s in range(num_shards) for ln in LANES]
    _pull(responders, table, sent, PullRequest(1, 1 << 20, 0, new_replica, codec))
    for now, step in enumerate(steps, start=2):
        if step[0] == "write":
            _write(table, step[1], now)
        elif step[0] == "pull":
            _pull(responders, table, sent, PullRequest(now, step[1] * rb, 0, None, codec))
        else:
            cursors = [Cursor("emb", s, ln, k) for s, ln, k in step[1]]
            _pull(responders, table, sent, PullRequest(now, 1 << 20, 0, cursors, codec))


def _pull(responders: list[Responder], table: Table, sent: np.ndarray, req: PullRequest) -> None:
    """``req`` to both responders on session "s": the same answer, and the rows owed."""
    for c in req.cursors or ():
        sent[c.shard, c.lane] = c.knowledge
    answers = []
    for r in responders:
        ((_, resp),) = r.receive("s", req, float(req.req_id)).sends
        assert isinstance(resp, PullResponse), resp
        answers.append(resp)
    _same(*answers, table.dim)
    resp = answers[0]
    rb = row_bytes(req.codec, table.dim, ROW_OVERHEAD_BYTES)
    if req.codec is None:  # plain rows cost exactly their estimate; one row always fits
        assert sum(ch.rows for ch in resp.chunks) <= max(1, req.max_bytes // rb)
    for ch in resp.chunks:
        _check_chunk(table, ch, sent, req.codec)
    if not resp.more:  # a complete answer: the session holds everything the store does
        assert (sent >= table.knowledge).all()


# -- end to end: replicas that catch up by full scan ---------------------------------------------

SPECS = [TableSpec("emb", 8, 8), TableSpec("dense", 5, 1)]


def _store(cache: int) -> Store:
    store = Store(cache_capacity=cache)
    for spec in SPECS:
        store.create_table(spec)
    return store


def _write_net(net: SimNetwork, rng: np.random.Generator, rounds: int, n: int) -> None:
    for _ in range(rounds):
        spec = SPECS[int(rng.integers(len(SPECS)))]
        keys = rng.integers(0, 3000, n).astype(np.int64)
        values = rng.standard_normal((n, spec.dim)).astype(np.float32)
        lanes = np.array(LANES, np.uint8)[rng.integers(0, len(LANES), n)]
        net.write("source", spec.name, keys, values, lanes=lanes)
        net.run_for(float(rng.uniform(0.0, 0.02)))


@pytest.mark.parametrize("codec", [None, *CODECS])
@pytest.mark.parametrize(("cache", "use_cache"), [(2, True), (4096, False)])
def test_replicas_catching_up_by_full_scan_hold_every_row_in_its_lane(codec, cache, use_cache):
    """A leader and its follower join after the source took thousands of writes in every lane
    (more per shard than the update cache holds, or with the cache off), then writes go on
    while they catch up: every row ends with the source's key, version, write time and lane,
    and its value (within one quantisation of a lossy codec)."""
    rng = np.random.default_rng(11)
    net = SimNetwork(
        seed=11,
        faults=Faults(delay=(0.001, 0.01)),
        puller_config=PullerConfig(max_bytes=20_000, wait_ms=100, window=3, codec=codec),
        responder_config=ResponderConfig(use_cache=use_cache),
    )
    net.add_node("source", _store(cache))
    _write_net(net, rng, rounds=40, n=100)  # ~4 000 writes before any replica exists
    net.add_node("leader", _store(cache), upstream="source")
    net.add_node("follower", _store(cache), upstream="leader")
    _write_net(net, rng, rounds=20, n=50)
    net.run_for(30.0)
    source = net.nodes["source"].store
    scans = sum(t.statistics().full_scans for t in source.tables.values())
    assert scans > 0  # the source did answer by full scan
    for name in ("leader", "follower"):
        for spec in SPECS:
            src, rep = source.table(spec.name), net.nodes[name].store.table(spec.name)
            want, got = rows_by_key(src), rows_by_key(rep)
            assert got[0].shape == want[0].shape, (name, spec.name)
            for i in (0, 2, 3, 4):  # keys, versions, wtimes, lanes
                np.testing.assert_array_equal(got[i], want[i], err_msg=f"{name} {spec.name}")
            bound = max_abs_error(want[1], codec) if codec else np.zeros(len(want[1]))
            assert (np.abs(got[1] - want[1]) <= bound[:, None]).all(), (name, spec.name)
            assert (rep.knowledge == src.knowledge).all(), (name, spec.name)
