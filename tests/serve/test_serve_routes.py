"""HTTP API: good requests, every kind of bad request (4xx naming the field), 404, 503."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from serve_fixtures import SMALL_MODEL, random_events, train
from starlette.applications import Starlette

from ekko.net.httpkit import bounded_app
from ekko.serve import build_services, serve_routes
from ekko.store import Store

MAX_BATCH = 8
ND, NS = SMALL_MODEL.num_dense, SMALL_MODEL.num_sparse


@pytest.fixture(scope="module")
def trained_store() -> Store:
    return train(steps=2).store


def asgi_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(trained_store: Store) -> AsyncIterator[httpx.AsyncClient]:
    services = build_services(trained_store, [SMALL_MODEL.served()])
    async with asgi_client(bounded_app(serve_routes(services, max_batch=MAX_BATCH))) as c:
        yield c


def events(n: int, seed: int = 0) -> list[dict[str, Any]]:
    dense, sparse = random_events(n, seed)
    return [{"dense": d, "sparse": s} for d, s in zip(dense.tolist(), sparse.tolist(), strict=True)]


async def post(c: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await c.post(path, content=raw, headers={"content-type": "application/json"})


PREDICT = "/v1/models/ctr/predict"
FEEDBACK = "/v1/models/ctr/feedback"


async def test_predict_both_body_forms_feedback_and_metrics(client: httpx.AsyncClient) -> None:
    evs = events(5)
    r = await post(client, PREDICT, {"events": evs})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "ctr" and doc["variant"] == "online"
    preds = doc["predictions"]
    assert len(preds) == 5 and all(0.0 < p["ctr"] < 1.0 for p in preds)
    col = (
        await post(
            client,
            PREDICT,
            {"dense": [e["dense"] for e in evs], "sparse": [e["sparse"] for e in evs]},
        )
    ).json()
    np.testing.assert_allclose(
        [p["ctr"] for p in col["predictions"]], [p["ctr"] for p in preds], rtol=0, atol=0
    )
    labels = [{"id": p["id"], "label": i % 2} for i, p in enumerate(preds)]
    fb = await post(client, FEEDBACK, {"labels": [*labels, {"id": 1, "label": 0}]})
    assert fb.status_code == 200 and fb.json() == {"model": "ctr", "matched": 5, "unknown": 1}
    m = (await client.get("/v1/models/ctr/metrics")).json()
    assert m["variants"]["online"]["window"]["count"] == 5
    assert m["predictions_served"] == 10
    assert m["feedback"]["unknown"] == 1
    listing = (await client.get("/v1/models")).json()["models"]
    assert [x["name"] for x in listing] == ["ctr"] and listing[0]["variants"] == ["online"]


def _bad_event(**change: Any) -> dict[str, Any]:
    ev = events(1)[0]
    ev.update(change)
    return ev


BAD_PREDICTS: list[tuple[str, Any, int, str]] = [
    ("not json", b"{x", 400, "body: not valid JSON"),
    ("top-level array", b"[]", 400, "body: Expected `object`"),
    ("unknown field", {"evnts": []}, 400, "unknown field `evnts`"),
    ("events not a list", {"events": 3}, 400, "events: expected `array"),
    (
        "float id",
        {"events": [_bad_event(sparse=[1.5] * NS)]},
        400,
        "events[0].sparse[0]: expected `int`, got `float`",
    ),
    (
        "bool dense",
        {"events": [_bad_event(dense=[True] * ND)]},
        400,
        "events[0].dense[0]: expected `float`, got `bool`",
    ),
    (
        "short sparse",
        {"events": [*events(3), _bad_event(sparse=[1] * (NS - 1))]},
        400,
        f"events[3].sparse: expected {NS} integers, got {NS - 1}",
    ),
    (
        "long dense",
        {"events": [_bad_event(dense=[0.0] * (ND + 1))]},
        400,
        f"events[0].dense: expected {ND} numbers, got {ND + 1}",
    ),
    (
        "beyond float32",
        {"events": [_bad_event(dense=[0.0, 0.0, 1e39] + [0.0] * (ND - 3))]},
        400,
        "events[0].dense[2]: 1e+39 is outside [-64, 64]",
    ),
    (
        "finite float32 far outside the feature range",
        {"events": [_bad_event(dense=[0.0, 3e38] + [0.0] * (ND - 2))]},
        400,
        "events[0].dense[1]: 3e+38 is outside [-64, 64]",
    ),
    (
        "columnar just below the range",
        {"dense": [[0.0] * ND, [0.0] * (ND - 1) + [-64.5]], "sparse": [[1] * NS] * 2},
        400,
        f"dense[1][{ND - 1}]: -64.5 is outside [-64, 64]",
    ),
    (
        "beyond float64",
        b'{"events": [{"dense": [1e400], "sparse": [1]}]}',
        400,
        "events[0].dense[0]: number out of range",
    ),
    (
        "id beyond int64",
        {"events": [_bad_event(sparse=[2**64] * NS)]},
        400,
        "events[0].sparse[0]: expected `int` <= 9223372036854775807",
    ),
    (
        "missing sparse",
        {"events": [{"dense": [0.0] * ND}]},
        400,
        "events[0]: object missing required field `sparse`",
    ),
    ("empty batch", {"events": []}, 400, "events: empty batch"),
    (
        "too many events",
        {"events": events(MAX_BATCH + 1)},
        413,
        f"events: {MAX_BATCH + 1} in one request; the limit is {MAX_BATCH}",
    ),
    ("both forms", {"events": events(1), "dense": [[0.0] * ND]}, 400, "not both"),
    ("columnar without sparse", {"dense": [[0.0] * ND]}, 400, "sparse: missing"),
    (
        "columnar ragged",
        {"dense": [[0.0] * ND] * 2, "sparse": [[1] * NS, [1] * 3]},
        400,
        f"sparse[1]: expected {NS} integers, got 3",
    ),
    (
        "columnar row count",
        {"dense": [[0.0] * ND] * 2, "sparse": [[1] * NS]},
        400,
        "sparse: expected 2 rows",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "reason"), [b[1:] for b in BAD_PREDICTS], ids=[b[0] for b in BAD_PREDICTS]
)
async def test_bad_predict_is_a_4xx_naming_the_field(
    client: httpx.AsyncClient, body: Any, status: int, reason: str
) -> None:
    r = await post(client, PREDICT, body)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]
    good = await post(client, PREDICT, {"events": events(2)})  # the server keeps serving
    assert good.status_code == 200


BAD_FEEDBACK: list[tuple[str, Any, int, str]] = [
    (
        "label 2",
        {"labels": [{"id": 5, "label": 1}, {"id": 6, "label": 2}]},
        400,
        "labels[1].label: expected 0 or 1, got 2",
    ),
    (
        "float label",
        {"labels": [{"id": 5, "label": 1.0}]},
        400,
        "labels[0].label: expected `int`, got `float`",
    ),
    (
        "string id",
        {"labels": [{"id": "5", "label": 1}]},
        400,
        "labels[0].id: expected `int`, got `str`",
    ),
    (
        "missing label",
        {"labels": [{"id": 5}]},
        400,
        "labels[0]: object missing required field `label`",
    ),
    ("empty", {"labels": []}, 400, "labels: empty batch"),
    (
        "too many",
        {"labels": [{"id": i, "label": 0} for i in range(MAX_BATCH + 1)]},
        413,
        "the limit is",
    ),
    ("not json", b"nope", 400, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("body", "status", "reason"), [b[1:] for b in BAD_FEEDBACK], ids=[b[0] for b in BAD_FEEDBACK]
)
async def test_bad_feedback_is_a_4xx_naming_the_field(
    client: httpx.AsyncClient, body: Any, status: int, reason: str
) -> None:
    r = await post(client, FEEDBACK, body)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]
    ok = await post(client, FEEDBACK, {"labels": [{"id": 5, "label": 1}]})
    assert ok.status_code == 200 and ok.json()["unknown"] == 1


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    for r in (
        await post(client, "/v1/models/nope/predict", {"events": events(1)}),
        await post(client, "/v1/models/nope/feedback", {"labels": [{"id": 1, "label": 0}]}),
        await client.get("/v1/models/nope/metrics"),
    ):
        assert r.status_code == 404
        assert "unknown model 'nope'" in r.json()["error"] and "ctr" in r.json()["error"]


async def test_oversized_body_is_413_before_reading(client: httpx.AsyncClient) -> None:
    r = await client.post(PREDICT, content=b"{}", headers={"content-length": str(1 << 30)})
    assert r.status_code == 413 and "limit" in r.json()["error"]


async def test_a_body_without_a_length_is_cut_at_the_routes_limit(trained_store: Store) -> None:
    services = build_services(trained_store, [SMALL_MODEL.served()])
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b" " * 100

    async with asgi_client(bounded_app(serve_routes(services, max_body=1000))) as c:
        for path in (PREDICT, FEEDBACK):
            sent = 0
            r = await c.post(path, content=chunks())
            assert r.status_code == 413, r.text
            assert r.json()["error"] == "body: over 1000 bytes; the limit is 1000"
            assert sent <= 12  # read no further than the limit (and what was in flight)


async def test_replica_without_dense_tables_is_503_with_the_reason() -> None:
    services = build_services(Store(), [SMALL_MODEL.served()])
    async with asgi_client(bounded_app(serve_routes(services))) as c:
        r = await post(c, PREDICT, {"events": events(1)})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert (
            "dense table 'dense/bottom.0.weight' is not in this replica's store"
            in (r.json()["error"])
        )
        m = await c.get("/v1/models/ctr/metrics")  # metrics still answer, with nothing to show
        assert m.status_code == 200
        assert m.json()["variants"]["online"]["window"]["auc"] is None
