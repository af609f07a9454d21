"""A service reading its rows by scatter-gather predicts bit for bit as the local replica,
loads changed dense weights and only those, and answers 503 naming a dead partition."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from scatter_fakes import FakeHolders, holders_of, run_virtual
from serve_fixtures import SMALL_MODEL, random_events, service, train

from ekko.net.httpkit import bounded_app
from ekko.serve import InferenceService, build_services, serve_routes
from ekko.serve.scatter import PartitionedLookup
from ekko.store import Store
from ekko.store.placement import Placement
from ekko.train.dlrm import dense_table_name

P = 3


def _scattered(store: Store, partitions: int = P) -> tuple[InferenceService, FakeHolders]:
    placement = Placement(partitions)
    fake = FakeHolders(store, placement)
    rows = PartitionedLookup(
        placement, holders_of(partitions), fake, lambda t: store.table(t).num_shards
    )
    return service(store, rows=rows), fake


def test_scatter_predict_equals_local_predict_bit_for_bit_as_training_goes_on() -> None:
    t = train(steps=3)
    local = service(t.store)
    remote, _ = _scattered(t.store)
    assert remote.scattered and not local.scattered
    for round_ in range(3):
        dense, sparse = random_events(64, seed=round_)
        sparse[:5] = sparse[0]  # repeated ids: asked once, served to each
        want = local.predict(dense, sparse, now=0.0).ctr
        got = run_virtual(lambda d=dense, s=sparse: remote.apredict(d, s, now=0.0)).ctr
        np.testing.assert_array_equal(got, want)
        t.trainer.step(t.held_out())  # train on: embedding rows and dense weights move
        t.publisher.flush()
    assert remote.statistics().dense_loads == 3


def test_unchanged_dense_weights_cost_their_versions_only() -> None:
    t = train(steps=2)
    remote, fake = _scattered(t.store)
    dense, sparse = random_events(8)
    run_virtual(lambda: remote.apredict(dense, sparse, now=0.0))
    fake.calls.clear()
    fake.values_sent = 0
    run_virtual(lambda: remote.apredict(dense, sparse, now=0.0))
    dense_names = {dense_table_name(k) for k in remote._variant("online").replica.shapes}
    asked_dense = {n for _, _, tables, known in fake.calls for n in tables if n in dense_names}
    known_dense = {n for _, _, _, known in fake.calls for n in known}
    assert asked_dense == known_dense == dense_names
    distinct = sum(len(np.unique(sparse[:, i] % SMALL_MODEL.rows_per_table)) for i in range(26))
    assert fake.values_sent == distinct  # the embedding rows, no dense values
    assert remote.statistics().dense_loads == 1


def test_sync_predict_on_a_scattered_service_says_to_await() -> None:
    t = train(steps=1)
    remote, _ = _scattered(t.store, partitions=1)
    dense, sparse = random_events(2)
    with pytest.raises(TypeError, match="await apredict"):
        remote.predict(dense, sparse, now=0.0)
    assert remote.not_ready() is not None and "first predict" in remote.not_ready()
    with pytest.raises(ValueError, match="split needs a 'baseline' variant"):
        remote.set_split(lambda seq: np.zeros(len(seq), bool), 0.1)


async def test_predict_route_answers_503_naming_the_partition_without_a_live_holder() -> None:
    t = train(steps=1)
    placement = Placement(P)
    fake = FakeHolders(t.store, placement)
    rows = PartitionedLookup(placement, holders_of(P), fake, lambda n: t.store.table(n).num_shards)
    services = build_services(t.store, [SMALL_MODEL.served()], rows=rows)
    app = bounded_app(serve_routes(services))
    dense, sparse = random_events(16)
    body = json.dumps(
        {
            "events": [
                {"dense": d, "sparse": s}
                for d, s in zip(dense.tolist(), sparse.tolist(), strict=True)
            ]
        }
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        ok = await c.post("/v1/models/ctr/predict", content=body)
        assert ok.status_code == 200, ok.text
        want = service(t.store).predict(dense, sparse, now=0.0).ctr
        got = np.array([p["ctr"] for p in ok.json()["predictions"]], dtype=np.float32)
        np.testing.assert_array_equal(got, want)
        fake.fail["p1h0"] = fake.fail["p1h1"] = None
        r = await c.post("/v1/models/ctr/predict", content=body)
    assert r.status_code == 503
    assert "partition 1 has no live holder" in r.json()["error"]
    assert "p1h0" in r.json()["error"] and "p1h1" in r.json()["error"]
    assert services["ctr"].statistics().not_ready == 1
