"""Predictions are always finite numbers: a replica holding a NaN or infinite row (arrived by
sync, or from an old snapshot) answers 503 naming the table, never ``"ctr": null``; it serves
again once a finite version of the row arrives. Feedback never answers 500."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serve_fixtures import SMALL_MODEL, random_events, service, train

from ekko.net.httpkit import bounded_app
from ekko.node.model_metrics import serve_metrics
from ekko.serve import NonFiniteRows, serve_routes
from ekko.store import Store
from ekko.train.dlrm import dense_table_name, embedding_table_name


def _apply(store: Store, table: str, keys: np.ndarray, values: np.ndarray) -> None:
    """What a replica's sync does with a pulled chunk: last-version-wins apply."""
    t = store.table(table)
    _, versions, _ = t.lookup(keys)
    t.apply(keys, values, versions + 1_000, np.zeros(len(keys), np.int64), 0)


def _samples(svc) -> dict[str, float]:
    return {s.name: s.value for fam in serve_metrics({"ctr": svc})() for s in fam.samples}


def _client(svc) -> httpx.AsyncClient:
    app = bounded_app(serve_routes({"ctr": svc}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_nan_embedding_row_is_refused_by_name_then_served_once_finite() -> None:
    t = train(steps=2)
    svc = service(t.store)
    client = _client(svc)
    dense, sparse = random_events(4, seed=5)
    key = int(sparse[2, 3] % SMALL_MODEL.rows_per_table)
    table = embedding_table_name(3)
    good = t.store.table(table).lookup(np.array([key]))[0].copy()
    _apply(t.store, table, np.array([key]), np.full((1, SMALL_MODEL.embedding_dim), np.nan))
    body = {"dense": dense.tolist(), "sparse": sparse.tolist()}
    r = await client.post("/v1/models/ctr/predict", json=body)
    assert r.status_code == 503, r.text
    assert f"row of key {key} in table '{table}'" in r.json()["error"]
    with pytest.raises(NonFiniteRows):
        svc.predict(dense, sparse, now=0.0)
    others = np.delete(np.arange(4), 2)  # events that do not read the bad row are served
    ok = svc.predict(dense[others], sparse[others], now=0.0)
    assert np.isfinite(ok.ctr).all()
    assert _samples(svc)["ekko_predict_nonfinite_total"] == 2.0
    _apply(t.store, table, np.array([key]), good)  # a finite version arrives
    r = await client.post("/v1/models/ctr/predict", json=body)
    assert r.status_code == 200 and all(p["ctr"] is not None for p in r.json()["predictions"])
    labels = [{"id": p["id"], "label": 1} for p in r.json()["predictions"]]
    fb = await client.post("/v1/models/ctr/feedback", json={"labels": labels})
    assert fb.status_code == 200 and fb.json()["matched"] == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_dense_weights_are_refused_by_name(bad: float) -> None:
    t = train(steps=1)
    svc = service(t.store)
    name = dense_table_name("top.0.weight")
    row = t.store.table(name).lookup(np.zeros(1, np.int64))[0].copy()
    assert np.isfinite(svc.predict(*random_events(3), now=0.0).ctr).all()  # cached weights
    row[0, 7] = bad
    _apply(t.store, name, np.zeros(1, np.int64), row)
    with pytest.raises(NonFiniteRows, match=f"NaN or infinite dense weights in table '{name}'"):
        svc.predict(*random_events(3), now=0.0)


def test_finite_weights_that_overflow_the_forward_pass_are_refused() -> None:
    t = train(steps=1)
    svc = service(t.store)
    name = dense_table_name("bottom.0.weight")
    row = t.store.table(name).lookup(np.zeros(1, np.int64))[0]
    huge = np.full_like(row, 3e38)
    huge[:, ::2] = -3e38  # opposite overflows meet: inf - inf is NaN
    _apply(t.store, name, np.zeros(1, np.int64), huge)
    with pytest.raises(NonFiniteRows, match="forward pass overflowed: finite but huge weights"):
        svc.predict(*random_events(3), now=0.0)


async def test_predictions_at_the_edge_of_the_dense_range_take_feedback() -> None:
    t = train(steps=1)
    client = _client(service(t.store))
    dense, sparse = random_events(16, seed=9)
    dense[:, 0] = 64.0
    dense[:, 1] = -64.0
    body = {"dense": dense.tolist(), "sparse": sparse.tolist()}
    r = await client.post("/v1/models/ctr/predict", json=body)
    assert r.status_code == 200
    ids = [p["id"] for p in r.json()["predictions"]]
    labels = {"labels": [{"id": i, "label": 0} for i in ids]}
    fb = await client.post("/v1/models/ctr/feedback", json=labels)
    assert fb.status_code == 200 and fb.json()["matched"] == 16
