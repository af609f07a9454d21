"""The trainer's HTTP API: labelled batches in (202), every bad body a 4xx naming the field."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from ekko.net.httpkit import bounded_app
from ekko.node.model_metrics import train_metrics
from ekko.train.routes import train_routes
from ekko.train.service import TrainingService
from ekko.train.sink import MemorySink
from ekko.train.streams import SyntheticStream


@pytest.fixture
async def setup(small_model_config, small_stream_config):
    svc = TrainingService("ctr", small_model_config, MemorySink())
    svc.start()
    app = bounded_app(train_routes({"ctr": svc}))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        yield client, svc, next(SyntheticStream(small_stream_config).batches(32))
    svc.stop()


def body(ev, **over) -> dict:
    doc = {
        "dense": ev.dense.tolist(),
        "sparse": ev.sparse.tolist(),
        "labels": ev.labels.astype(int).tolist(),
    }
    return doc | over


async def test_batch_is_accepted_trained_and_reported(setup) -> None:
    client, svc, ev = setup
    r = await client.post("/v1/models/ctr/train", json=body(ev))
    assert r.status_code == 202 and r.json()["model"] == "ctr"
    svc.stop()
    report = (await client.get("/v1/models/ctr/train")).json()
    assert report["events"] == 32 and report["lifetime"]["count"] == 32
    families = {m.name: m for m in train_metrics({"ctr": svc})()}
    assert families["ekko_train_events"].samples[0].value == 32
    r = await client.post("/v1/models/ctr/train/quality/reset")
    assert r.status_code == 200
    assert (await client.get("/v1/models/ctr/train")).json()["lifetime"]["count"] == 0


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"labels": None}, 400, "labels: missing"),
        ({"labels": [0, 1]}, 400, "labels: expected 32 labels (one per event), got 2"),
        ({"labels": [2] * 32}, 400, "labels[0]: expected 0 or 1, got 2"),
        ({"sparse": [[1.5] * 26] * 32}, 400, "sparse[0][0]"),
        ({"dense": [[0.0] * 3] * 32}, 400, "dense[0]: expected 13 numbers, got 3"),
        ({"extra": 1}, 400, "extra"),
        (
            {"dense": [[0.5] * 13] * 31 + [[0.5] * 12 + [3e38]]},
            400,
            "dense[31][12]: 3e+38 is outside [-64, 64], the model's dense feature range",
        ),
        ({"dense": [[float(-65)] * 13] * 32}, 400, "dense[0][0]: -65.0 is outside [-64, 64]"),
    ],
)
async def test_bad_train_body_is_a_4xx_naming_the_field(setup, change, status, message) -> None:
    client, svc, ev = setup
    doc = {k: v for k, v in body(ev, **change).items() if v is not None}
    r = await client.post("/v1/models/ctr/train", content=json.dumps(doc))
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert svc.statistics().batches == 0 and svc.statistics().queued == 0


async def test_not_json_unknown_model_and_predict_with_labels(setup) -> None:
    client, _svc, ev = setup
    r = await client.post("/v1/models/ctr/train", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = await client.post("/v1/models/other/train", json=body(ev))
    assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]
    from ekko.serve.schema import RequestError, decode_predict

    with pytest.raises(RequestError, match="predict takes no labels"):
        decode_predict(json.dumps(body(ev)).encode(), 13, 26, dense_limit=64.0)
    assert np.isfinite(ev.dense).all()


async def test_a_trainer_not_started_yet_answers_503_with_the_reason(small_stream_config) -> None:
    """A restarting source starts its trainers once recovered (they resume from the store);
    until then the train route says why (503, retry), not that the model is unknown (404)."""
    trainers: dict[str, TrainingService] = {}
    why = "recovering: pulling what the replicas hold beyond its own data"
    pending = {"ctr": (why, 503)}
    app = bounded_app(train_routes(trainers, pending.get))
    ev = next(SyntheticStream(small_stream_config).batches(8))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        r = await client.post("/v1/models/ctr/train", json=body(ev))
        assert r.status_code == 503 and why in r.json()["error"], r.text
        assert (await client.get("/v1/models/ctr/train")).status_code == 503
        r = await client.post("/v1/models/other/train", json=body(ev))
        assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"], r.text


async def test_a_trainer_that_never_runs_in_the_node_answers_409_naming_what_trains() -> None:
    """A partitioned cluster's sources train no model in the node: 409 (retrying will not
    help), naming the sharded trainer, where 503 "starting" had the client retry for ever."""
    note = "train them with the sharded trainer"
    app = bounded_app(train_routes({}, pending={"ctr": (note, 409)}.get))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        r = await client.get("/v1/models/ctr/train")
        assert r.status_code == 409 and note in r.json()["error"]
