"""The guard's split on a serving node of a partitioned cluster: both variants read by
scatter-gather (online from the holders' stores, baseline from their lagged stores). The
split serves each event from the variant the route picks, as a local replica's split does,
and falls back to online when no holder of a partition keeps a baseline."""

from __future__ import annotations

import copy

import numpy as np
from scatter_fakes import FakeHolders, holders_of, run_virtual
from serve_fixtures import random_events, service, train

from ekko.serve.scatter import PartitionedLookup
from ekko.serve.service import BASELINE, ONLINE
from ekko.store import Store
from ekko.store.placement import Placement

P = 2


def _rows(store: Store) -> tuple[PartitionedLookup, FakeHolders]:
    placement = Placement(P)
    fake = FakeHolders(store, placement)
    rows = PartitionedLookup(placement, holders_of(P), fake, lambda t: store.table(t).num_shards)
    return rows, fake


def test_the_split_over_two_scatters_serves_each_variants_rows_and_falls_back_to_online():
    t = train(steps=2)
    old = copy.deepcopy(t.store)  # the baseline: the holders' lagged stores
    t.trainer.step(t.held_out())
    t.publisher.flush()
    online_rows, _ = _rows(t.store)
    base_rows, base_fake = _rows(old)
    svc = service(t.store, rows=online_rows)
    svc.add_variant(BASELINE, Store(), rows=base_rows)
    everything = [True]
    svc.set_split(lambda seq: np.full(len(seq), everything[0]), 0.0)
    dense, sparse = random_events(32)
    want_base = service(old).predict(dense, sparse, now=0.0).ctr
    want_online = service(t.store).predict(dense, sparse, now=0.0).ctr
    assert not np.array_equal(want_base, want_online)

    got = run_virtual(lambda: svc.apredict(dense, sparse, now=0.0))
    assert got.variant == BASELINE
    np.testing.assert_array_equal(got.ctr, want_base)
    everything[0] = False
    got = run_virtual(lambda: svc.apredict(dense, sparse, now=0.0))
    assert got.variant == ONLINE
    np.testing.assert_array_equal(got.ctr, want_online)

    # no holder of partition 1 keeps a baseline (409): served online, not refused
    everything[0] = True
    base_fake.fail["p1h0"] = base_fake.fail["p1h1"] = 409
    got = run_virtual(lambda: svc.apredict(dense, sparse, now=0.0))
    assert got.variant == ONLINE
    np.testing.assert_array_equal(got.ctr, want_online)
    assert [h for h, *_ in base_fake.calls[-2:]] == ["p1h0", "p1h1"]  # 409 failed over
    stats = svc.statistics().predictions_by_variant
    assert stats[BASELINE] == 32 and stats[ONLINE] == 64
