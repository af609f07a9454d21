"""PartitionedLookup on virtual time with fake holders: grouping by partition, hedging after
the p95, retry on error, the deadline, and the 503 naming the partition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scatter_fakes import FakeHolders, holders_of, run_virtual

from ekko.client.wire import TableRows
from ekko.schedule import WritePort
from ekko.serve import ModelNotReady
from ekko.serve.scatter import PartitionedLookup
from ekko.serve.scatter_fetch import LookupRefused, PartitionUnavailable, PerTable
from ekko.serve.scatter_policy import ScatterConfig
from ekko.store import Store
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

P = 4
TABLES = {"emb_a": 16, "emb_b": 5, "dense/w": 1}  # name -> shards


def _store(rows: int = 500) -> Store:
    store = Store()
    port = WritePort(store)
    rng = np.random.default_rng(7)
    for name, shards in TABLES.items():
        port.create_table(TableSpec(name, 3, shards))
        keys = np.arange(rows, dtype=np.int64) if name != "dense/w" else np.zeros(1, np.int64)
        port.write(name, keys, rng.standard_normal((len(keys), 3)).astype(np.float32))
    return store


def _scatter(store: Store, config: ScatterConfig | None = None, partitions: int = P):
    placement = Placement(partitions)
    fake = FakeHolders(store, placement)
    shards = lambda t: store.table(t).num_shards  # noqa: E731
    return PartitionedLookup(placement, holders_of(partitions), fake, shards, config), fake


def _ask(keys: np.ndarray) -> dict[str, np.ndarray]:
    return {"emb_a": keys, "emb_b": keys[::-1].copy(), "dense/w": np.zeros(1, np.int64)}


@pytest.mark.parametrize("partitions", [1, P])
def test_rows_equal_the_store_in_key_order_one_request_per_partition(partitions: int) -> None:
    store = _store()
    lookup, fake = _scatter(store, partitions=partitions)
    keys = np.random.default_rng(1).integers(0, 700, 300)  # some keys the store lacks
    got = run_virtual(lambda: lookup.lookup(_ask(keys)))
    for name, k in _ask(keys).items():
        values, versions, found = store.table(name).lookup(k)
        np.testing.assert_array_equal(got[name].values, values)
        np.testing.assert_array_equal(got[name].versions, versions)
        np.testing.assert_array_equal(got[name].found, found)
    asked = [h for h, _, _, _ in fake.calls]
    assert sorted(asked) == [f"p{p}h0" for p in range(partitions)]  # one per partition


def test_known_versions_leave_unchanged_rows_out() -> None:
    store = _store()
    lookup, fake = _scatter(store)
    keys = np.arange(0, 400, 3, dtype=np.int64)
    _, versions, _ = store.table("emb_a").lookup(keys)
    known = versions.copy()
    changed = np.array([1, 50, 101])
    known[changed] -= 1  # the caller holds an older version of these three
    got = run_virtual(lambda: lookup.lookup({"emb_a": keys}, {"emb_a": known}))
    np.testing.assert_array_equal(got["emb_a"].versions, versions)
    np.testing.assert_array_equal(
        got["emb_a"].values, store.table("emb_a").lookup(keys[changed])[0]
    )
    assert fake.values_sent == 3


def _prime(lookup: PartitionedLookup, fake: FakeHolders, answer_s: float, n: int) -> None:
    """``n`` batches each answered after ``answer_s``: the p95 becomes ``answer_s``."""
    for h in {h for hs in lookup.holders.values() for h in hs}:
        fake.delay[h] = answer_s
    keys = np.arange(40, dtype=np.int64)

    async def batches() -> None:
        for _ in range(n):
            await lookup.lookup(_ask(keys))

    run_virtual(batches)
    fake.calls.clear()


def test_a_slow_holder_is_hedged_after_the_partitions_p95_first_answer_wins() -> None:
    store = _store()
    cfg = ScatterConfig(deadline_s=5.0, min_samples=10, hedge_initial_s=0.5)
    lookup, fake = _scatter(store, cfg)
    _prime(lookup, fake, 0.010, 20)
    assert lookup.policy.hedge_after(0) == pytest.approx(0.010)
    fake.delay = {h: 0.005 for h in fake.delay}  # faster than the p95 now...
    fake.delay["p0h0"] = 3.0  # ...but this one stalls
    keys = np.arange(40, dtype=np.int64)
    before = [s.hedges for s in lookup.statistics()]

    async def one() -> tuple[dict, float]:
        import asyncio

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await lookup.lookup(_ask(keys))
        return got, loop.time() - t0

    got, took = run_virtual(one)
    assert fake.asked("p0h1") == [pytest.approx(fake.asked("p0h0")[0] + 0.010)]
    assert took == pytest.approx(0.015)  # hedge sent at the p95, answered 5 ms later
    assert [h for h, *_ in fake.calls if h.startswith("p1")] == ["p1h0"]  # fast: no hedge
    np.testing.assert_array_equal(got["emb_a"].values, store.table("emb_a").lookup(keys)[0])
    after = [s.hedges for s in lookup.statistics()]
    assert after[0] == before[0] + 1 and sum(after) == sum(before) + 1


def test_before_enough_samples_the_hedge_waits_hedge_initial_s() -> None:
    store = _store()
    lookup, fake = _scatter(store, ScatterConfig(hedge_initial_s=0.2, deadline_s=5.0))
    fake.delay["p2h0"] = math.inf
    run_virtual(lambda: lookup.lookup(_ask(np.arange(40, dtype=np.int64))))
    assert fake.asked("p2h1") == [pytest.approx(0.2)]


def test_an_error_is_retried_on_the_next_holder_at_once_which_then_goes_first() -> None:
    store = _store()
    lookup, fake = _scatter(store, ScatterConfig(hedge_initial_s=0.5, suspect_s=10.0))
    fake.fail["p1h0"] = None  # unreachable
    fake.delay["p1h0"] = 0.003
    keys = np.arange(60, dtype=np.int64)
    got = run_virtual(lambda: lookup.lookup(_ask(keys)))
    assert fake.asked("p1h1") == [pytest.approx(0.003)]
    np.testing.assert_array_equal(got["emb_b"].values, store.table("emb_b").lookup(keys[::-1])[0])
    assert lookup.statistics()[1].retries == 1
    fake.calls.clear()
    run_virtual(lambda: lookup.lookup(_ask(keys)))  # p1h0 is suspect: p1h1 first
    assert [h for h, *_ in fake.calls if h.startswith("p1")] == ["p1h1"]


@pytest.mark.parametrize("status", [None, 503, 404])
def test_a_partition_whose_holders_all_fail_is_a_503_naming_it(status: int | None) -> None:
    store = _store()
    lookup, fake = _scatter(store)
    fake.fail["p3h0"] = fake.fail["p3h1"] = status
    with pytest.raises(PartitionUnavailable) as caught:
        run_virtual(lambda: lookup.lookup(_ask(np.arange(80, dtype=np.int64))))
    exc = caught.value
    assert isinstance(exc, ModelNotReady)  # the routes' 503
    assert exc.partition == 3 and [h for h, _ in exc.tried] == ["p3h0", "p3h1"]
    assert "partition 3 has no live holder" in str(exc) and "p3h1: fake failure" in str(exc)
    assert set(exc.tables) <= set(TABLES) and exc.tables
    assert lookup.statistics()[3].unavailable == 1


def test_the_deadline_ends_a_partition_that_never_answers() -> None:
    store = _store()
    lookup, fake = _scatter(store, ScatterConfig(deadline_s=0.3, hedge_initial_s=0.1))
    fake.delay["p0h0"] = fake.delay["p0h1"] = math.inf

    async def one() -> float:
        import asyncio

        loop = asyncio.get_running_loop()
        with pytest.raises(PartitionUnavailable, match="within the deadline") as caught:
            await lookup.lookup(_ask(np.arange(80, dtype=np.int64)))
        assert [h for h, _ in caught.value.tried] == ["p0h0", "p0h1"]
        return loop.time()

    assert run_virtual(one) == pytest.approx(0.3)
    assert fake.asked("p0h1") == [pytest.approx(0.1)]


def test_a_refused_request_is_not_retried_on_another_holder() -> None:
    store = _store()
    lookup, fake = _scatter(store)
    fake.fail["p0h0"] = 413
    with pytest.raises(LookupRefused, match="partition 0: holder p0h0 refused") as caught:
        run_virtual(lambda: lookup.lookup(_ask(np.arange(80, dtype=np.int64))))
    assert caught.value.status == 502
    assert fake.asked("p0h1") == []


def test_every_partition_needs_a_holder_and_the_config_is_checked() -> None:
    store = _store()
    fake = FakeHolders(store, Placement(2))
    with pytest.raises(ValueError, match=r"partitions \[1\] have no holder"):
        PartitionedLookup(Placement(2), {0: ["a"], 1: []}, fake, lambda t: 1)
    with pytest.raises(ValueError, match=r"partitions \[2\] are not in"):
        PartitionedLookup(Placement(2), {0: ["a"], 1: ["b"], 2: ["c"]}, fake, lambda t: 1)
    with pytest.raises(ValueError, match="deadline_s"):
        ScatterConfig(deadline_s=0)
    with pytest.raises(ValueError, match="min_samples"):
        ScatterConfig(window=5, min_samples=10)


def test_local_first_reads_the_nodes_own_store_and_fails_over_for_a_table_it_lacks() -> None:
    from ekko.serve.scatter_http import LOCAL, LocalFirst

    store = _store()
    own = Store()  # the serving node's store: emb_a only (the others still syncing)
    own_port = WritePort(own)
    own_port.create_table(TableSpec("emb_a", 3, 16))
    keys = np.arange(300, dtype=np.int64)
    own_port.write("emb_a", keys, store.table("emb_a").lookup(keys)[0])
    placement = Placement(2)
    fake = FakeHolders(store, placement)
    holders = {0: [LOCAL, "p0h1"], 1: ["p1h0"]}
    shards = lambda t: store.table(t).num_shards  # noqa: E731
    lookup = PartitionedLookup(placement, holders, LocalFirst(own, fake), shards)
    got = run_virtual(lambda: lookup.lookup({"emb_a": keys}))
    np.testing.assert_array_equal(got["emb_a"].values, store.table("emb_a").lookup(keys)[0])
    assert [h for h, *_ in fake.calls] == ["p1h0"]  # partition 0 read locally
    got = run_virtual(lambda: lookup.lookup({"emb_b": keys}))
    np.testing.assert_array_equal(got["emb_b"].values, store.table("emb_b").lookup(keys)[0])
    assert sorted(h for h, *_ in fake.calls) == ["p0h1", "p1h0", "p1h0"]  # emb_b: not local


def test_a_stalled_holder_goes_last_and_does_not_push_the_hedge_delay_to_the_deadline() -> None:
    """A holder that takes requests but never answers (SIGSTOP) never fails: without going
    last, every batch waited the hedge delay first, each answer took that delay plus the
    other holder's time, and the p95 of those answers, the next hedge delay, climbed batch
    after batch to the deadline — then the partition was a 503 with a healthy holder up."""
    store = _store()
    cfg = ScatterConfig(deadline_s=0.2, hedge_initial_s=0.02, window=20, min_samples=10)
    lookup, fake = _scatter(store, cfg)
    for h in {h for hs in lookup.holders.values() for h in hs}:
        fake.delay[h] = 0.005
    fake.delay["p0h0"] = math.inf
    keys = np.arange(40, dtype=np.int64)

    async def batches() -> tuple[float, int]:
        import asyncio

        first_to_stalled = 0
        for _ in range(400):
            fake.calls.clear()
            await lookup.lookup(_ask(keys))
            first_to_stalled += next(h for h, *_ in fake.calls if h.startswith("p0")) == "p0h0"
        return asyncio.get_running_loop().time(), first_to_stalled

    took, first_to_stalled = run_virtual(batches)
    stats = lookup.statistics()[0]
    assert stats.unavailable == 0 and stats.answered == 400
    assert lookup.policy.hedge_after(0) < 0.02  # the healthy holder's time, not a climbing delay
    # the stalled holder is asked first again once per suspect_s, not by every batch
    assert first_to_stalled <= took / cfg.suspect_s + 1


@pytest.mark.parametrize("partitions", [1, 2, P])
def test_splitting_every_table_at_once_equals_splitting_each_alone(partitions: int) -> None:
    store = _store()
    lookup, _ = _scatter(store, partitions=partitions)
    rng = np.random.default_rng(partitions)
    tables = {
        "emb_a": rng.integers(-50, 900, 37),
        "emb_b": np.array([7], np.int64),  # one key: one partition holds it all
        "dense/w": np.zeros(1, np.int64),
    }
    split = lookup.keys.split(tables)
    for name, keys in tables.items():
        of = lookup.keys.partition_of_keys(name, keys)
        held = sorted(set(of.tolist()))
        assert [p for p, ask in split.asks.items() if name in ask.names] == held
        for p in held:  # each partition is asked its keys of the table, in their order
            ask = split.asks[p]
            t = ask.names.index(name)
            a = int(ask.counts[:t].sum())
            np.testing.assert_array_equal(ask.keys[a : a + ask.counts[t]], keys[of == p])
    # and where each key asked came from: the keys' own order, or a permutation of it
    flat = np.concatenate(list(tables.values()))
    asked = np.concatenate([ask.keys for ask in split.asks.values()])
    if split.order.shape[0]:
        np.testing.assert_array_equal(flat[split.order], asked)
    else:
        np.testing.assert_array_equal(flat, asked)
    assert lookup.keys.held_by({}) == {}


def test_tables_of_several_row_lengths_merge_each_in_key_order() -> None:
    store = _store()
    WritePort(store).create_table(TableSpec("emb_c", 5, 8))
    keys = np.arange(0, 600, 7, dtype=np.int64)
    WritePort(store).write("emb_c", keys, np.ones((keys.shape[0], 5), np.float32))
    lookup, _ = _scatter(store)
    asked = {"emb_a": keys[::-1].copy(), "emb_c": keys, "emb_b": keys}
    got = run_virtual(lambda: lookup.lookup(asked))
    assert list(got) == list(asked)
    for name, k in asked.items():
        values, versions, found = store.table(name).lookup(k)
        np.testing.assert_array_equal(got[name].values, values)
        np.testing.assert_array_equal(got[name].versions, versions)
        np.testing.assert_array_equal(got[name].found, found)


def test_partitions_answering_a_table_in_rows_of_different_lengths_is_not_ready() -> None:
    store = _store()
    lookup, fake = _scatter(store)

    async def wider_at_p1(holder, tables, known):
        out = await fake(holder, tables, known)
        if holder.startswith("p1"):
            rows = out["emb_a"]
            wide = np.zeros((rows.values.shape[0], 4), np.float32)
            out["emb_a"] = TableRows("emb_a", rows.versions, rows.found, wide)
        return out

    lookup.fetch = PerTable(wider_at_p1)
    keys = np.arange(0, 300, dtype=np.int64)
    with pytest.raises(ModelNotReady, match=r"table 'emb_a': its partitions answer rows of dims"):
        run_virtual(lambda: lookup.lookup({"emb_b": keys, "emb_a": keys}))
