"""The scatter's flat path: one ``FlatAsk`` per partition, its ``FlatRows`` checked before it
counts as an answer (a holder answering rows of the wrong count or width, or too few values,
is failed over like an unreachable one), every partition's merged in one kernel call."""

from __future__ import annotations

import numpy as np
import pytest
from scatter_fakes import FakeHolders, holders_of, run_virtual

from ekko.schedule import WritePort
from ekko.serve.scatter import PartitionedLookup
from ekko.serve.scatter_fetch import (
    FlatAsk,
    FlatRows,
    HolderFailed,
    LookupRefused,
    PartitionUnavailable,
    checked,
)
from ekko.store import Store
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

P = 4


def _setup() -> tuple[Store, PartitionedLookup, FakeHolders]:
    store = Store()
    port = WritePort(store)
    rng = np.random.default_rng(3)
    for name, dim in (("emb_a", 3), ("emb_b", 5)):
        port.create_table(TableSpec(name, dim, 16))
        keys = np.arange(300, dtype=np.int64)
        port.write(name, keys, rng.standard_normal((300, dim)).astype(np.float32))
    placement = Placement(P)
    fake = FakeHolders(store, placement)
    shards = lambda t: store.table(t).num_shards  # noqa: E731
    return store, PartitionedLookup(placement, holders_of(P), fake, shards), fake


class _Bad:
    """A fetch whose holders named in ``bad`` answer through ``spoil``."""

    def __init__(self, fake: FakeHolders, bad: set[str], spoil) -> None:
        self.fake, self.bad, self.spoil = fake, bad, spoil

    async def lookup(self, holder: str, ask: FlatAsk) -> FlatRows:
        got = await self.fake.lookup(holder, ask)
        return self.spoil(got) if holder in self.bad else got


def _fewer_values(got: FlatRows) -> FlatRows:
    return got._replace(values=got.values[:-1])


def _one_row_short(got: FlatRows) -> FlatRows:
    rows = got.rows.copy()
    rows[0] -= 1
    return got._replace(rows=rows, values=got.values[: -int(got.dims[-1])])


def _wider(got: FlatRows) -> FlatRows:  # every table's rows one float wider, values to fit
    dims = got.dims + 1
    return got._replace(dims=dims, values=np.zeros(int(got.rows @ dims), np.float32))


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (_fewer_values, "values, not the rows'"),
        (_one_row_short, "table 'emb_a': .* rows of values of dim 3, expected"),
    ],
)
def test_a_holder_whose_answer_does_not_fit_is_failed_over_and_named(spoil, why) -> None:
    store, lookup, fake = _setup()
    lookup.fetch = _Bad(fake, {"p2h0"}, spoil)
    keys = np.arange(0, 300, 2, dtype=np.int64)
    got = run_virtual(lambda: lookup.lookup({"emb_a": keys, "emb_b": keys[::-1].copy()}))
    np.testing.assert_array_equal(got["emb_a"].values, store.table("emb_a").lookup(keys)[0])
    assert [h for h, *_ in fake.calls if h.startswith("p2")] == ["p2h0", "p2h1"]
    lookup.fetch = _Bad(fake, {"p2h0", "p2h1"}, spoil)
    with pytest.raises(PartitionUnavailable, match=why) as caught:
        run_virtual(lambda: lookup.lookup({"emb_a": keys, "emb_b": keys}))
    assert caught.value.partition == 2


def test_rows_wider_at_one_partition_than_the_others_are_not_merged() -> None:
    _, lookup, fake = _setup()
    lookup.fetch = _Bad(fake, {"p1h0", "p1h1"}, _wider)
    keys = np.arange(0, 300, dtype=np.int64)
    with pytest.raises(
        Exception, match=r"table 'emb_a': its partitions answer rows of dims \[3, 4\]"
    ):
        run_virtual(lambda: lookup.lookup({"emb_a": keys, "emb_b": keys}))


def test_known_versions_of_some_tables_split_over_partitions_come_back_exact() -> None:
    store, lookup, fake = _setup()
    keys = np.arange(5, 295, 3, dtype=np.int64)
    v = store.table("emb_b").lookup(keys)[1]
    held = np.where(np.arange(keys.shape[0]) % 3 == 0, v, v - 1)  # a third held already
    got = run_virtual(lambda: lookup.lookup({"emb_a": keys, "emb_b": keys}, {"emb_b": held}))
    changed = held != v
    np.testing.assert_array_equal(got["emb_b"].versions, v)
    np.testing.assert_array_equal(
        got["emb_b"].values, store.table("emb_b").lookup(keys[changed])[0]
    )
    np.testing.assert_array_equal(got["emb_a"].values, store.table("emb_a").lookup(keys)[0])
    assert fake.values_sent == keys.shape[0] + int(changed.sum())
    assert all("emb_a" not in known for *_, known in fake.calls)  # none held: none sent


def test_checked_names_arrays_of_the_wrong_shape_or_type() -> None:
    ask = FlatAsk(["t"], np.array([2], np.int64), np.array([1, 2], np.int64), None)
    good = FlatRows(np.array([1], np.int64), np.array([2], np.int64),
                    np.array([1, 0], np.int64), np.zeros(2, np.float32))  # fmt: skip
    assert checked("h", ask, good) is good
    with pytest.raises(HolderFailed, match="do not fit 1 tables of 2 keys"):
        checked("h", ask, good._replace(versions=np.array([1], np.int64)))
    with pytest.raises(HolderFailed, match="do not fit"):
        checked("h", ask, good._replace(values=np.zeros(2, np.float64)))


def test_a_cancelled_scatter_cancels_its_requests_and_asks_nothing_more() -> None:
    import asyncio
    import math

    _, lookup, fake = _setup()
    for p in range(P):
        fake.delay[f"p{p}h0"] = math.inf  # never answers: the hedge would come at 0.05 s
    keys = np.arange(0, 300, dtype=np.int64)

    async def cancelled() -> int:
        task = asyncio.ensure_future(lookup.lookup({"emb_a": keys}))
        await asyncio.sleep(0.001)
        assert lookup.asking == [1] * P
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # past any hedge and the deadline: nothing more is sent
        return len(fake.calls)

    assert run_virtual(cancelled) == P
    assert lookup.asking == [0] * P
    assert all(s.hedges == 0 and s.unavailable == 0 for s in lookup.statistics())


def test_a_refused_partition_ends_the_others_requests() -> None:
    import asyncio
    import math

    _, lookup, fake = _setup()
    fake.fail["p1h0"] = 400
    fake.delay["p1h0"] = 0.01
    fake.delay["p3h0"] = math.inf

    async def refused() -> None:
        with pytest.raises(LookupRefused, match="refused the lookup"):
            await lookup.lookup({"emb_a": np.arange(0, 300, dtype=np.int64)})
        await asyncio.sleep(1.0)  # past the hedge delay and the deadline

    run_virtual(refused)
    assert lookup.asking == [0] * P
    assert "p3h1" not in [h for h, *_ in fake.calls]  # its hedge was never sent
