"""The baseline follows the rows the replica applied, whatever the link's codec (issue 13 §3).

A real ``Responder`` answers a real ``Puller`` (sans-IO, messages handed over directly); the
rows the puller reports in ``Ready.applied`` (the one apply port) reach the ``LaggedStore``
through the node's ``ApplyFanout``, as in a node. Before the fix the node
queued the raw wire chunks: with a codec their rows sit in a block (empty ``keys``), and
``advance`` raised, killing the guard task, while ``drop_written_after`` dropped nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from ekko.codec import CODECS
from ekko.guard.baseline import LaggedStore
from ekko.node.apply_port import ApplyFanout
from ekko.protocol.chunk_codec import encode_chunk
from ekko.protocol.messages import Chunk, PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.ready import Applied, Ready
from ekko.protocol.responder import Responder
from ekko.quality.latency import LatencyHistogram
from ekko.store import Store
from ekko.store.spec import LANES, TableSpec

SPECS = (TableSpec("emb", 8, 4), TableSpec("dense", 5, 1))


def _source(rng: np.random.Generator) -> tuple[Store, int]:
    """A source store with rows in every lane and deletes (tombstones) among them; returns it
    and a write time between the two halves of its writes."""
    store = Store(cache_capacity=64)
    for spec in SPECS:
        store.create_table(spec)
    middle = 0
    for i in range(40):
        spec = SPECS[i % len(SPECS)]
        n = int(rng.integers(1, 20))
        keys = rng.integers(0, 200, n).astype(np.int64)
        values = (rng.standard_normal((n, spec.dim)) * 2).astype(np.float32)
        lanes = rng.choice(np.array(LANES, np.uint8), n)
        now_ns = 1_000_000 * (i + 1)
        store.table(spec.name).write(keys, values, now_ns=now_ns, lanes=lanes)
        if i % 5 == 4:
            store.table(spec.name).delete(keys[: n // 2 + 1], now_ns=now_ns + 1)
        if i == 19:
            middle = now_ns
    return store, middle


def _port(lagged: LaggedStore) -> ApplyFanout:
    """The node's apply port with the baseline as its follower (arrivals at time 0)."""
    return ApplyFanout(LatencyHistogram(), [lambda a: lagged.offer(a, now=0.0)], lambda: None)


def _sync(source: Store, puller: Puller, port: ApplyFanout) -> None:
    """Pull ``source`` to the end; every step's ``Ready.applied`` goes through ``port``."""
    responder = Responder(source)
    now = 0.0

    def step(ready: Ready) -> list:
        if ready.applied is not None:
            port(ready.applied)
        return list(ready.sends)

    outbox = step(puller.start(now))
    for _ in range(500):
        if not outbox:
            break
        _, req = outbox.pop(0)
        for _, resp in responder.receive("s", req, now).sends:
            outbox.extend(step(puller.receive(resp, now)))
        now += 0.01
        # with wait_ms 0 the puller polls; stop once it holds everything
        if all(
            (puller.store.tables.get(s.name) is not None)
            and (puller.store.table(s.name).knowledge >= source.table(s.name).knowledge).all()
            for s in SPECS
        ):
            break
        if not outbox:
            outbox = step(puller.tick(now + 1.0))


@pytest.mark.parametrize("codec", [None, *CODECS])
def test_baseline_applies_exactly_what_the_replica_applied_for_every_codec(codec):
    rng = np.random.default_rng(11)
    source, _ = _source(rng)
    lagged = LaggedStore(lag_s=5.0)
    replica = Store(cache_capacity=64)
    puller = Puller(
        replica, PullerConfig(wait_ms=0, poll_interval_ms=0, max_bytes=4_000, codec=codec)
    )
    _sync(source, puller, _port(lagged))
    for spec in SPECS:
        assert (replica.table(spec.name).knowledge >= source.table(spec.name).knowledge).all()
    assert lagged.rows_queued > 0
    assert lagged.advance(4.0) == 0  # not lag_s old yet
    lagged.advance(5.0)
    assert lagged.rows_queued == 0 and lagged.pending == 0
    for spec in SPECS:
        keys = np.arange(200, dtype=np.int64)
        want, want_v, want_found = replica.table(spec.name).lookup(keys)
        got, got_v, got_found = lagged.store.table(spec.name).lookup(keys)
        np.testing.assert_array_equal(got_found, want_found)
        np.testing.assert_array_equal(got_v, want_v)
        np.testing.assert_array_equal(got, want)  # the same decoded values, bit for bit
        assert lagged.store.table(spec.name).tombstones == replica.table(spec.name).tombstones
    assert sum(source.table(s.name).tombstones for s in SPECS) > 0


@pytest.mark.parametrize("codec", [None, *CODECS])
def test_rows_written_after_the_healthy_point_are_dropped_for_every_codec(codec):
    rng = np.random.default_rng(5)
    source, middle = _source(rng)
    lagged = LaggedStore(lag_s=5.0)
    puller = Puller(
        Store(cache_capacity=64),
        PullerConfig(wait_ms=0, poll_interval_ms=0, max_bytes=4_000, codec=codec),
    )
    _sync(source, puller, _port(lagged))
    queued = lagged.rows_queued
    # every row version the source holds was queued once; those written after ``middle``
    # (their write time travels with the row, through the codec block) must all go
    later = sum(int((source.table(s.name).all_slots()[3] > middle).sum()) for s in SPECS)
    assert later > 0
    dropped = lagged.drop_written_after(middle)
    assert dropped == later
    assert lagged.rows_queued == queued - dropped
    lagged.advance(5.0)
    for spec in SPECS:
        _, wtimes = _wtimes(lagged.store, spec.name)
        assert (wtimes <= middle).all()


def _wtimes(store: Store, table: str) -> tuple[np.ndarray, np.ndarray]:
    t = store.tables.get(table)
    if t is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = t.all_slots()  # tombstones too: a delete after the healthy point must go as well
    return rows[0], rows[3]


def test_a_chunk_still_in_its_codec_block_is_refused_at_offer():
    keys = np.arange(4, dtype=np.int64)
    plain = Chunk(
        "emb", 0, np.array([0]), np.array([0]), np.array([4]), np.array([4]), keys,
        np.ones((4, 8), np.float32), keys + 1, np.full(4, 7, np.int64),
    )  # fmt: skip
    wire = encode_chunk(plain, CODECS[-1])
    lagged = LaggedStore(lag_s=0.0)
    with pytest.raises(ValueError, match="codec-encoded"):
        lagged.offer(Applied(SPECS, (wire,), 0.0), now=0.0)
    assert lagged.rows_queued == 0


def test_a_response_is_reported_once_decoded_in_ready_applied():
    store = Store()
    store.create_table(SPECS[0])
    puller = Puller(store)
    puller.start(0.0)
    keys = np.arange(3, dtype=np.int64)
    plain = Chunk(
        "emb", 0, np.array([0]), np.array([0]), np.array([3]), np.array([3]), keys,
        np.ones((3, 8), np.float32), keys + 1, np.full(3, 9, np.int64),
    )  # fmt: skip
    ready = puller.receive(PullResponse(1, 0, [encode_chunk(plain, "int4")]), 2.5)
    assert ready.applied is not None and ready.applied.at == 2.5
    (chunk,) = ready.applied.chunks
    assert chunk.block is None and chunk.keys.tolist() == [0, 1, 2]
    assert chunk.wtimes.tolist() == [9, 9, 9]
    # an empty long-poll answer applies nothing and reports nothing
    assert puller.receive(PullResponse(2, 0, []), 3.0).applied is None


def _baseline_rows(codec: str | None) -> dict[str, tuple[np.ndarray, ...]]:
    source, _ = _source(np.random.default_rng(23))
    lagged = LaggedStore(lag_s=0.0)
    puller = Puller(
        Store(cache_capacity=64),
        PullerConfig(wait_ms=0, poll_interval_ms=0, max_bytes=4_000, codec=codec),
        latency=None,
    )
    port = _port(lagged)
    _sync(source, puller, port)
    lagged.advance(0.0)
    assert port.latency.count == lagged.rows_applied > 0  # one measure per applied row
    out = {}
    for spec in SPECS:
        keys, values, versions, wtimes, _lanes = lagged.store.table(spec.name).all_rows()
        order = np.argsort(keys)
        out[spec.name] = (keys[order], versions[order], wtimes[order], values[order])
    return out


STEP = {"fp32": 0.0, "fp16": 1e-3, "int8": 1 / 127, "int4": 1 / 7}


@pytest.mark.parametrize("codec", CODECS)
def test_a_codec_link_and_a_plain_link_give_the_baseline_the_same_rows(codec):
    plain, coded = _baseline_rows(None), _baseline_rows(codec)
    for name, (keys, versions, wtimes, values) in plain.items():
        c_keys, c_versions, c_wtimes, c_values = coded[name]
        np.testing.assert_array_equal(c_keys, keys)
        np.testing.assert_array_equal(c_versions, versions)
        np.testing.assert_array_equal(c_wtimes, wtimes)
        # the values as the codec carries them: within one quantisation step of each row
        step = np.abs(values).max(axis=1, keepdims=True) * STEP[codec]
        assert (np.abs(c_values - values) <= step + 1e-6).all()
