"""Hostile bodies for predict, feedback and train: every one answers 2xx or a 4xx naming what
is wrong, never a 500 (hypothesis over JSON shapes: deep nesting, huge ints, NaN strings and
literals, wrong types, values beyond the dense range)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fixtures import SMALL_MODEL, random_events, service, train
from starlette.applications import Starlette

from ekko.net.httpkit import bounded_app
from ekko.serve import serve_routes
from ekko.train.routes import train_routes
from ekko.train.service import TrainingService
from ekko.train.sink import MemorySink

ND, NS = SMALL_MODEL.num_dense, SMALL_MODEL.num_sparse
PATHS = ("/v1/models/ctr/predict", "/v1/models/ctr/feedback", "/v1/models/ctr/train")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: far beyond int64 too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([3e38, -3e38, 1e39, 64.0, -64.0, 64.0001, 2**63, -(2**63) - 1, 2**64])
    | st.sampled_from(["NaN", "nan", "Infinity", "-inf", "1e400", "", "0"])
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["events", "dense", "sparse", "labels", "id", "label", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=24,
)


def _row(width: int, item: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(item, min_size=width - 1, max_size=width + 1)


dense_item = (
    st.floats(width=32, allow_nan=False, allow_infinity=False)  # finite float32, up to 3.4e38
    | st.floats(-100, 100)
    | scalars
)
sparse_item = st.integers(-(2**63), 2**63 - 1) | scalars
event = st.fixed_dictionaries({"dense": _row(ND, dense_item), "sparse": _row(NS, sparse_item)})
label = st.fixed_dictionaries({"id": sparse_item, "label": sparse_item})
shaped = st.one_of(
    st.fixed_dictionaries({"events": st.lists(event, max_size=3)}),
    st.fixed_dictionaries(
        {
            "dense": st.lists(_row(ND, dense_item), min_size=1, max_size=3),
            "sparse": st.lists(_row(NS, sparse_item), min_size=1, max_size=3),
        },
        optional={"labels": st.lists(sparse_item, max_size=4)},
    ),
    st.fixed_dictionaries({"labels": st.lists(label, max_size=4)}),
)


def _matrix(width: int, item: st.SearchStrategy, n: int) -> st.SearchStrategy:
    return st.lists(st.lists(item, min_size=width, max_size=width), min_size=n, max_size=n)


dense_value = st.floats(-64, 64) | st.floats(width=32, allow_nan=False, allow_infinity=False)
near_valid = st.integers(1, 3).flatmap(  # right shapes; dense values anywhere in float32
    lambda n: st.fixed_dictionaries(
        {
            "dense": _matrix(ND, dense_value, n),
            "sparse": _matrix(NS, st.integers(-(2**63), 2**63 - 1), n),
        },
        optional={"labels": st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)},
    )
)
raw_bodies = st.one_of(
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 200_000).map(lambda n: b'{"events":' * n + b"1" + b"}" * n),
    st.integers(1, 20_000).map(lambda n: b'{"labels":[{"id":' + b"9" * n + b',"label":1}]}'),
    st.sampled_from(
        [
            b'{"dense": [[NaN]], "sparse": [[1]]}',
            b'{"dense": [[Infinity]], "sparse": [[1]], "labels": [1]}',
            b'{"labels": [{"id": 1, "label": NaN}]}',
            b"\xff\xfe{}",
            b"",
            b"null",
        ]
    ),
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def app() -> Iterator[Starlette]:
    trained = train(steps=1)
    trainer = TrainingService("ctr", SMALL_MODEL.dlrm(), MemorySink(), max_queue=10_000)
    trainer.start()
    yield bounded_app(
        [*serve_routes({"ctr": service(trained.store)}), *train_routes({"ctr": trainer})]
    )
    trainer.stop()
    assert trainer.statistics().failed is None


def _send(app: Starlette, path: str, body: bytes) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, content=body)

    return asyncio.run(go())


def _check(app: Starlette, body: bytes) -> None:
    for path in PATHS:
        r = _send(app, path, body)
        assert r.status_code < 500, (path, body[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"], (path, r.text)
        elif path == PATHS[0]:  # served: finite numbers, and their feedback is taken
            preds = r.json()["predictions"]
            assert all(isinstance(p["ctr"], float) and 0 <= p["ctr"] <= 1 for p in preds), preds
            labels = [{"id": p["id"], "label": 1} for p in preds]
            fb = _send(app, PATHS[1], json.dumps({"labels": labels}).encode())
            assert fb.status_code == 200, fb.text


HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYPOTHESIS
@given(doc=json_values | shaped | near_valid)
def test_any_json_document_is_answered_without_a_500(app: Starlette, doc: Any) -> None:
    _check(app, json.dumps(doc).encode())


@HYPOTHESIS
@given(doc=near_valid)
def test_dense_values_beyond_the_model_range_are_refused(app: Starlette, doc: Any) -> None:
    limit = SMALL_MODEL.dense_limit
    outside = any(abs(x) > limit for row in doc["dense"] for x in row)
    path = PATHS[2] if "labels" in doc else PATHS[0]
    r = _send(app, path, json.dumps(doc).encode())
    if outside:
        assert r.status_code == 400, r.text
        assert f"is outside [-{limit:g}, {limit:g}]" in r.json()["error"]
    else:
        assert r.status_code in (200, 202), r.text


@HYPOTHESIS
@given(body=raw_bodies)
def test_any_byte_body_is_answered_without_a_500(app: Starlette, body: bytes) -> None:
    _check(app, body)


def test_a_valid_body_still_passes(app: Starlette) -> None:
    dense, sparse = random_events(3)
    doc = {"dense": dense.tolist(), "sparse": sparse.tolist()}
    assert _send(app, PATHS[0], json.dumps(doc).encode()).status_code == 200
    doc["labels"] = [0, 1, 1]
    assert _send(app, PATHS[2], json.dumps(doc).encode()).status_code == 202
