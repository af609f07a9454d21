"""Lookups that queue behind a scatter in flight go out merged, and each caller gets exactly
its own answer (``ekko.serve.scatter_batch``), on virtual time with fake holders."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scatter_fakes import FakeHolders, holders_of, run_virtual

from ekko.client.wire import TableRows
from ekko.schedule import WritePort
from ekko.serve import ModelNotReady
from ekko.serve.scatter import PartitionedLookup
from ekko.serve.scatter_fetch import PartitionUnavailable
from ekko.serve.scatter_policy import LatencyWindow, ScatterConfig
from ekko.store import Store
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

P = 4
TABLES = {"emb_a": 16, "emb_b": 5, "dense/w": 1}


def _store(rows: int = 300) -> Store:
    store = Store()
    port = WritePort(store)
    rng = np.random.default_rng(3)
    for name, shards in TABLES.items():
        port.create_table(TableSpec(name, 3, shards))
        keys = np.arange(rows, dtype=np.int64) if name != "dense/w" else np.zeros(1, np.int64)
        port.write(name, keys, rng.standard_normal((len(keys), 3)).astype(np.float32))
        port.write(name, keys[::2], rng.standard_normal((len(keys[::2]), 3)).astype(np.float32))
    return store


def _lookup(store: Store, config: ScatterConfig, partitions: int = P):
    placement = Placement(partitions)
    fake = FakeHolders(store, placement)
    shards = lambda t: store.table(t).num_shards  # noqa: E731
    return PartitionedLookup(placement, holders_of(partitions), fake, shards, config), fake


def _expected(store: Store, tables: dict, known: dict) -> dict:
    out = {}
    for name, keys in tables.items():
        values, versions, found = store.table(name).lookup(keys)
        if name in known:
            values = values[versions != known[name]]
        out[name] = (values, versions, found.view(np.uint8))
    return out


def _assert_answers(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, (values, versions, found) in want.items():
        np.testing.assert_array_equal(got[name].versions, versions)
        np.testing.assert_array_equal(got[name].found, found)
        np.testing.assert_array_equal(got[name].values, values)


def _requests(seed: int, n: int, store: Store) -> list[tuple[dict, dict]]:
    """``n`` lookups of different keys, tables and known versions (some stale, some current,
    some none), dense table included."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tables = {"emb_a": np.unique(rng.integers(0, 400, rng.integers(1, 60)))}
        if i % 2:
            tables["emb_b"] = np.unique(rng.integers(0, 400, rng.integers(1, 30)))
        tables["dense/w"] = np.zeros(1, np.int64)
        known = {}
        if i % 3 == 0:
            _, v, _ = store.table("emb_a").lookup(tables["emb_a"])
            known["emb_a"] = np.where(rng.random(v.shape[0]) < 0.5, v, v - 1)
        if i % 3 != 2:
            known["dense/w"] = store.table("dense/w").lookup(tables["dense/w"])[1]
        out.append((tables, known))
    return out


@given(
    seed=st.integers(0, 2**32 - 1),
    callers=st.integers(1, 12),
    partitions=st.sampled_from([1, 2, P]),
    coalesce=st.sampled_from([0, 1, 3, 16]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_concurrent_lookups_each_get_exactly_their_own_rows(
    seed: int, callers: int, partitions: int, coalesce: int
) -> None:
    store = _store()
    lookup, fake = _lookup(store, ScatterConfig(coalesce=coalesce), partitions)
    fake.delay = {h: 0.002 for hs in lookup.holders.values() for h in hs}
    requests = _requests(seed, callers, store)

    async def all_at_once() -> list:
        return await asyncio.gather(*(lookup.lookup(t, k) for t, k in requests))

    got = run_virtual(all_at_once)
    for answer, (tables, known) in zip(got, requests, strict=True):
        _assert_answers(answer, _expected(store, tables, known))
    scatters, merged, _ = lookup.coalesced()
    if coalesce == 0:
        assert (scatters, merged) == (0, 0)
        touched = [
            {int(p) for t, k in tables.items() for p in lookup.keys.partition_of_keys(t, k)}
            for tables, _ in requests
        ]
        assert len(fake.calls) == sum(len(t) for t in touched)  # one request per partition
    else:  # the first goes alone, the rest queue behind it, coalesce at a time
        queued = callers - 1
        batches = [min(coalesce, queued - i) for i in range(0, queued, coalesce)]
        assert scatters == 1 + len(batches)
        assert merged == sum(b for b in batches if b > 1)
        assert len(fake.calls) <= scatters * partitions


def test_a_lone_lookup_goes_at_once_and_queued_ones_go_together_after_it() -> None:
    store = _store()
    lookup, fake = _lookup(store, ScatterConfig(coalesce=16))
    fake.delay = {h: 0.010 for hs in lookup.holders.values() for h in hs}
    requests = _requests(1, 5, store)

    async def staggered() -> list:
        first = asyncio.ensure_future(lookup.lookup(*requests[0]))
        await asyncio.sleep(0.004)  # the first scatter is in flight
        rest = [asyncio.ensure_future(lookup.lookup(t, k)) for t, k in requests[1:]]
        return [await first, *[await r for r in rest]]

    got = run_virtual(staggered)
    for answer, (tables, known) in zip(got, requests, strict=True):
        _assert_answers(answer, _expected(store, tables, known))
    times = sorted({t for _, t, _, _ in fake.calls})
    assert times == [pytest.approx(0.0), pytest.approx(0.010)]  # two scatters, no waiting
    assert lookup.coalesced() == (2, 4, 0)


def test_a_failed_merged_scatter_fails_every_caller_and_the_next_one_runs() -> None:
    store = _store()
    lookup, fake = _lookup(store, ScatterConfig(coalesce=16, deadline_s=0.05))
    fake.delay = {h: 0.010 for hs in lookup.holders.values() for h in hs}
    requests = _requests(2, 4, store)

    async def scenario() -> tuple[list, dict]:
        first = asyncio.ensure_future(lookup.lookup(*requests[0]))
        await asyncio.sleep(0.001)
        for h in lookup.holders[2]:
            fake.fail[h] = 503  # partition 2 goes away while the others queue
        queued = [asyncio.ensure_future(lookup.lookup(t, k)) for t, k in requests[1:]]
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        fake.fail.clear()
        after = await lookup.lookup(*requests[0])
        return outcomes, after

    outcomes, after = run_virtual(scenario)
    for exc in outcomes:  # the first scatter, and the merged one behind it
        assert isinstance(exc, PartitionUnavailable) and "partition 2" in str(exc)
    assert lookup.coalesced() == (3, 3, 0)
    _assert_answers(after, _expected(store, *requests[0]))


def test_a_caller_that_gives_up_while_queued_leaves_the_others_their_answers() -> None:
    store = _store()
    lookup, fake = _lookup(store, ScatterConfig(coalesce=16))
    fake.delay = {h: 0.010 for hs in lookup.holders.values() for h in hs}
    requests = _requests(3, 3, store)

    async def scenario() -> list:
        first = asyncio.ensure_future(lookup.lookup(*requests[0]))
        await asyncio.sleep(0.001)
        quitter = asyncio.ensure_future(lookup.lookup(*requests[1]))
        stayer = asyncio.ensure_future(lookup.lookup(*requests[2]))
        await asyncio.sleep(0.001)
        quitter.cancel()
        return [await first, await stayer, quitter.cancelled()]

    first, stayer, cancelled = run_virtual(scenario)
    assert cancelled
    _assert_answers(first, _expected(store, *requests[0]))
    _assert_answers(stayer, _expected(store, *requests[2]))
    assert lookup.coalesced() == (2, 0, 0)  # the quitter was dropped: the stayer went alone


@pytest.mark.parametrize("bad", [-1, 1025, 2.5, True, "8"])
def test_coalesce_must_be_a_small_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="coalesce: expected an integer in"):
        ScatterConfig(coalesce=bad)  # type: ignore[arg-type]


@given(
    size=st.integers(1, 300),
    quantile=st.floats(0.01, 1.0),
    samples=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=600),
)
def test_the_latency_window_is_np_quantile_of_its_last_samples(
    size: int, quantile: float, samples: list[float]
) -> None:
    w = LatencyWindow(size, quantile)
    for i, x in enumerate(samples):
        w.add(x)
        if i % 37 == 0 or i == len(samples) - 1:
            want = float(np.quantile(samples[max(0, i + 1 - size) : i + 1], quantile))
            assert w.value() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert len(w) == min(size, len(samples))


def test_an_unexpected_failure_of_a_merged_scatter_is_logged_and_reaches_every_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ekko.serve.scatter_batch import Coalescer

    async def scatter(tables, known, deadline):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.01)
        if len(tables["t"]) > 1:
            raise RuntimeError("bug in a merged scatter")
        return {"t": None}

    coalescer = Coalescer(scatter, expired=lambda tables: ModelNotReady("late"))

    async def three() -> list:
        keys = {"t": np.arange(1, dtype=np.int64)}
        return await asyncio.gather(
            *(coalescer.lookup(keys, {}, 1.0) for _ in range(3)), return_exceptions=True
        )

    got = run_virtual(three)
    assert got[0] == {"t": None}
    assert [type(e) for e in got[1:]] == [RuntimeError, RuntimeError]
    assert "merged scatter of 2 lookups failed" in caplog.text and "bug in a merged" in caplog.text


def _rows_of(tables: dict) -> dict:
    """A fake holder's answer: each key's row is the key itself (versions, one value)."""
    return {
        t: TableRows(t, k.copy(), np.ones(k.shape[0], np.uint8), k[:, None].astype(np.float32))
        for t, k in tables.items()
    }


def test_a_queued_lookup_gives_up_at_its_own_deadline_while_the_scatter_ahead_blocks() -> None:
    from ekko.serve.scatter_batch import Coalescer

    release = asyncio.Event()
    sent: list[dict] = []

    async def scatter(tables, known, deadline):  # type: ignore[no-untyped-def]
        sent.append(dict(tables))
        if len(sent) == 1:
            await release.wait()  # the scatter in flight ignores every deadline
        return _rows_of(tables)

    coalescer = Coalescer(scatter, expired=lambda tables: ModelNotReady(f"late {sorted(tables)}"))
    keys = [np.arange(i * 10, i * 10 + 3, dtype=np.int64) for i in range(3)]

    async def scenario() -> tuple:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(coalescer.lookup({"t": keys[0]}, {}, 100.0))
        await asyncio.sleep(0)  # the first scatter is in flight
        short = asyncio.ensure_future(coalescer.lookup({"t": keys[1]}, {}, loop.time() + 0.05))
        patient = asyncio.ensure_future(coalescer.lookup({"t": keys[2]}, {}, 100.0))
        with pytest.raises(ModelNotReady, match=r"late \['t'\]"):
            await short  # (before the fix: waited on the blocked scatter, forever)
        gave_up = loop.time()
        release.set()
        return gave_up, await first, await patient

    gave_up, first, patient = run_virtual(scenario)
    assert gave_up == pytest.approx(0.05, abs=1e-3)  # its own deadline, not the scatter's end
    np.testing.assert_array_equal(first["t"].values[:, 0], keys[0])
    np.testing.assert_array_equal(patient["t"].values[:, 0], keys[2])
    np.testing.assert_array_equal(patient["t"].versions, keys[2])
    assert [s["t"].tolist() for s in sent] == [keys[0].tolist(), keys[2].tolist()]  # dropped
    assert (coalescer.scatters, coalescer.merged, coalescer.gave_up) == (2, 0, 1)


def test_a_queued_lookup_past_its_deadline_is_the_503_naming_the_partition_in_flight() -> None:
    store = _store()
    lookup, fake = _lookup(store, ScatterConfig(coalesce=16, deadline_s=1.0))
    fake.delay = dict.fromkeys(lookup.holders[1], 0.2)
    requests = _requests(4, 3, store)
    coalescer = lookup.coalescer
    assert coalescer is not None

    async def scenario() -> tuple:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(coalescer.lookup(*requests[0], loop.time() + 1.0))
        await asyncio.sleep(0.01)  # partition 1 keeps the first scatter in flight until 0.2
        queued_at = loop.time()
        short = asyncio.ensure_future(coalescer.lookup(*requests[1], queued_at + 0.05))
        patient = asyncio.ensure_future(coalescer.lookup(*requests[2], queued_at + 1.0))
        try:
            await short
        except PartitionUnavailable as exc:
            short_err: Exception = exc
        gave_up = loop.time() - queued_at
        return gave_up, short_err, await first, await patient

    gave_up, err, first, patient = run_virtual(scenario)
    assert gave_up == pytest.approx(0.05, abs=1e-3)  # (before the fix: 0.19, the first's end)
    assert isinstance(err, ModelNotReady)  # a 503 on predict, as a scatter past its deadline
    assert str(err).startswith("partition 1 has no live holder (tables ")
    why = "p1h0: no answer within the deadline (1 s) to the scatter this lookup waited for"
    assert why in str(err)
    _assert_answers(first, _expected(store, *requests[0]))
    _assert_answers(patient, _expected(store, *requests[2]))  # (before: failed with the short)
    assert lookup.coalesced() == (2, 0, 1)  # the patient one went alone: the short one gave up


def test_a_late_joiner_is_not_held_to_the_deadline_of_an_earlier_caller_in_its_batch() -> None:
    """Through ``PartitionedLookup.lookup`` every caller gets ``now + deadline_s``, so a caller
    queued later has a later deadline. Batched with an earlier one, it must still get its rows
    when they come before its own deadline (as it would without coalescing); the earlier one
    gives up at its own."""
    store = _store()
    lookup, fake = _lookup(store, ScatterConfig(coalesce=16, deadline_s=1.0))
    fake.delay = dict.fromkeys(lookup.holders[1], 0.6)  # every scatter takes 0.6 s
    requests = _requests(5, 3, store)

    async def scenario() -> tuple:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(lookup.lookup(*requests[0]))  # 0 -> 0.6
        await asyncio.sleep(0.01)
        early = asyncio.ensure_future(lookup.lookup(*requests[1]))  # deadline 1.01
        await asyncio.sleep(0.54)
        late = asyncio.ensure_future(lookup.lookup(*requests[2]))  # deadline 1.55
        outcomes = await asyncio.gather(first, early, late, return_exceptions=True)
        return outcomes, loop.time()

    (first, early, late), end = run_virtual(scenario)
    _assert_answers(first, _expected(store, *requests[0]))
    assert isinstance(early, PartitionUnavailable) and "partition 1" in str(early)
    _assert_answers(late, _expected(store, *requests[2]))  # (before: failed at 1.01 with early)
    assert end == pytest.approx(1.2, abs=1e-3)  # the merged scatter's answer: 0.6 + 0.6
    assert lookup.coalesced() == (2, 2, 1)
