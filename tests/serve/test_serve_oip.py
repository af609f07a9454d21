"""Open Inference Protocol (KServe v2) routes over ASGI: tritonclient's own request bodies
(binary tensors, its default) and JSON tensors, flat and nested, predict what ``/v1/.../predict``
predicts; metadata and readiness; every bad tensor a 400 naming it; unknown model 404."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from serve_fixtures import SMALL_MODEL, random_events, train
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

from ekko.net.httpkit import bounded_app
from ekko.serve import build_services, oip_routes, serve_routes
from ekko.store import Store

MAX_BATCH = 8
ND, NS = SMALL_MODEL.num_dense, SMALL_MODEL.num_sparse
INFER = "/v2/models/ctr/infer"
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def trained_store() -> Store:
    return train(steps=2).store


def _client(store: Store, node_ready: Any = lambda: None) -> httpx.AsyncClient:
    services = build_services(store, [SMALL_MODEL.served()])
    routes = [
        *serve_routes(services, max_batch=MAX_BATCH),
        *oip_routes(services, version="9.9", node_ready=node_ready, max_batch=MAX_BATCH),
    ]
    transport = httpx.ASGITransport(app=bounded_app(routes))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
async def client(trained_store: Store) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(trained_store) as c:
        yield c


def triton_body(
    dense: np.ndarray, sparse: np.ndarray, *, binary: bool = True, outputs: list | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body tritonclient sends for these arrays (its own encoder), and its headers."""
    inputs = [InferInput("dense", list(dense.shape), "FP32"),
              InferInput("sparse", list(sparse.shape), "INT64")]  # fmt: skip
    inputs[0].set_data_from_numpy(dense, binary_data=binary)
    inputs[1].set_data_from_numpy(sparse, binary_data=binary)
    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, {} if json_size is None else {HEADER: str(json_size)}


async def v1_ctr(c: httpx.AsyncClient, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    doc = {"dense": dense.tolist(), "sparse": sparse.tolist()}
    r = await c.post("/v1/models/ctr/predict", content=json.dumps(doc))
    assert r.status_code == 200, r.text
    return np.array([p["ctr"] for p in r.json()["predictions"]], dtype=np.float32)


async def test_tritonclient_bodies_predict_what_v1_predicts(client: httpx.AsyncClient) -> None:
    dense, sparse = random_events(5, seed=1)
    want = await v1_ctr(client, dense, sparse)
    for binary in (True, False):
        body, headers = triton_body(dense, sparse, binary=binary)
        r = await client.post(INFER, content=body, headers=headers)
        assert r.status_code == 200, r.text
        length = r.headers[HEADER]  # no outputs named: tritonclient asks for binary ones
        result = InferenceServerClient.parse_response_body(r.content, header_length=int(length))
        ctr = result.as_numpy("ctr")
        assert ctr.dtype == np.float32 and ctr.shape == (5, 1)
        np.testing.assert_array_equal(ctr[:, 0], want)
        ids = result.as_numpy("id")
        assert ids.dtype == np.int64 and len(set(ids[:, 0].tolist())) == 5
        assert result.get_response()["model_name"] == "ctr"
    stats = (await client.get("/v1/models/ctr/metrics")).json()
    assert stats["predictions_served"] == 15  # v1 and both v2 calls: one service counts all


async def test_json_data_flat_or_nested_and_the_outputs_asked_for(
    client: httpx.AsyncClient,
) -> None:
    dense, sparse = random_events(3, seed=2)
    want = await v1_ctr(client, dense, sparse)
    for shape_data in (lambda a: a.tolist(), lambda a: a.ravel().tolist()):
        doc = {
            "id": "req-7",
            "inputs": [
                {"name": "sparse", "datatype": "INT64", "shape": [3, NS],
                 "data": shape_data(sparse)},
                {"name": "dense", "datatype": "FP32", "shape": [3, ND],
                 "data": shape_data(dense)},
            ],
            "outputs": [{"name": "ctr"}],
        }  # fmt: skip
        r = await client.post(INFER, content=json.dumps(doc))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
        answer = r.json()
        assert answer["id"] == "req-7" and [o["name"] for o in answer["outputs"]] == ["ctr"]
        (out,) = answer["outputs"]
        assert out["datatype"] == "FP32" and out["shape"] == [3, 1]
        np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32), want)
    asked = [InferRequestedOutput("ctr", binary_data=False), InferRequestedOutput("id")]
    body, headers = triton_body(dense, sparse, outputs=asked)
    r = await client.post(INFER, content=body, headers=headers)
    result = InferenceServerClient.parse_response_body(
        r.content, header_length=int(r.headers[HEADER])
    )
    np.testing.assert_array_equal(result.as_numpy("ctr")[:, 0], want)  # JSON output
    assert result.as_numpy("id").shape == (3, 1)  # binary output


async def test_metadata_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/models/ctr/ready")).json() == {"name": "ctr", "ready": True}
    server = (await client.get("/v2")).json()
    assert server == {"name": "ekko", "version": "9.9", "extensions": ["binary_tensor_data"]}
    meta = (await client.get("/v2/models/ctr")).json()
    assert meta["name"] == "ctr"
    assert meta["inputs"] == [
        {"name": "dense", "datatype": "FP32", "shape": [-1, ND]},
        {"name": "sparse", "datatype": "INT64", "shape": [-1, NS]},
    ]
    assert meta["outputs"][0] == {"name": "ctr", "datatype": "FP32", "shape": [-1, 1]}
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/infer"):
        r = await (client.post(path, content=b"{}") if path.endswith("infer") else client.get(path))
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"], path


async def test_not_ready_is_a_400_saying_why() -> None:
    async with _client(Store()) as c:  # nothing synced: no dense table
        r = await c.get("/v2/models/ctr/ready")
        assert r.status_code == 400 and "dense table" in r.json()["error"]
        assert (await c.get("/v2/health/ready")).status_code == 400
        body, headers = triton_body(*random_events(2))
        r = await c.post(INFER, content=body, headers=headers)
        assert r.status_code == 503 and "dense table" in r.json()["error"]
    async with _client(train(steps=1).store, node_ready=lambda: "recovering") as c:
        r = await c.get("/v2/health/ready")
        assert r.status_code == 400 and r.json() == {"error": "not ready: recovering"}
        assert (await c.get("/v2/models/ctr/ready")).status_code == 200


def _doc(**change: Any) -> dict[str, Any]:
    dense, sparse = random_events(2, seed=3)
    inputs = {
        "dense": {"name": "dense", "datatype": "FP32", "shape": [2, ND], "data": dense.tolist()},
        "sparse": {"name": "sparse", "datatype": "INT64", "shape": [2, NS],
                   "data": sparse.tolist()},
    }  # fmt: skip
    for key, value in change.items():
        name, _, field = key.partition("__")
        if value is None:
            inputs[name].pop(field)
        else:
            inputs[name][field] = value
    return {"inputs": list(inputs.values())}


BAD: list[tuple[str, Any, dict[str, str], int, str]] = [
    (
        "wrong dtype",
        _doc(dense__datatype="FP64"),
        {},
        400,
        "dense: datatype 'FP64'; the model takes FP32",
    ),
    ("int32 ids", _doc(sparse__datatype="INT32"), {}, 400, "sparse: datatype 'INT32'"),
    (
        "wrong width",
        _doc(dense__shape=[2, ND + 1]),
        {},
        400,
        f"dense: shape [2, {ND + 1}]; the model takes [-1, {ND}]",
    ),
    ("flat shape", _doc(sparse__shape=[2 * NS]), {}, 400, "sparse: shape"),
    (
        "data count",
        _doc(dense__shape=[1, ND], dense__data=[0.0] * (2 * ND)),
        {},
        400,
        f"dense: shape [1, {ND}] holds {ND} elements, data has {2 * ND}",
    ),
    (
        "row mismatch",
        _doc(dense__shape=[1, ND], dense__data=[0.0] * ND),
        {},
        400,
        "sparse: 2 rows, dense has 1",
    ),
    ("unknown input", _doc(dense__name="dence"), {}, 400, "dence: no such input"),
    ("missing input", {"inputs": _doc()["inputs"][:1]}, {}, 400, "sparse: missing input"),
    ("twice", {"inputs": _doc()["inputs"] * 2}, {}, 400, "dense: given twice"),
    (
        "string data",
        _doc(dense__data=["x"] * (2 * ND)),
        {},
        400,
        "dense: data holds 'x'; expected numbers",
    ),
    (
        "float id",
        _doc(sparse__data=[1.5] * (2 * NS)),
        {},
        400,
        "sparse: data holds 1.5; expected integers",
    ),
    ("bool data", _doc(dense__data=[True] * (2 * ND)), {}, 400, "dense: data holds True"),
    (
        "id beyond int64",
        _doc(sparse__data=[2**64] * (2 * NS)),
        {},
        400,
        "sparse: an id is outside int64",
    ),
    (
        "no data",
        _doc(dense__data=None),
        {},
        400,
        "dense: no data and no parameters.binary_data_size",
    ),
    (
        "out of range",
        _doc(dense__data=[1e6] * (2 * ND)),
        {},
        400,
        "dense[0][0]: 1000000.0 is NaN, infinite or outside",
    ),
    ("empty", _doc(dense__shape=[0, ND], dense__data=[]), {}, 400, "dense: empty batch"),
    (
        "too many",
        _doc(dense__shape=[MAX_BATCH + 1, ND]),
        {},
        413,
        f"dense: {MAX_BATCH + 1} in one request",
    ),
    (
        "ragged rows",  # 26 elements in all, but row 0 would take one of row 1's
        _doc(dense__data=[[0.5] * (ND - 1), [0.5] * (ND + 1)]),
        {},
        400,
        f"dense: data[0] holds {ND - 1} items; shape [2, {ND}] nests {ND} there",
    ),
    (
        "mixed nesting",
        _doc(sparse__data=[[1] * NS, [[1] * NS]]),
        {},
        400,
        f"sparse: data[1] holds 1 items; shape [2, {NS}] nests {NS} there",
    ),
    (
        "nested a level too deep",
        _doc(sparse__data=[[[1]] * NS] * 2),
        {},
        400,
        "sparse: data holds [1]; expected integers",
    ),
    (
        "binary_data_output not a bool",
        {**_doc(), "parameters": {"binary_data_output": "yes"}},
        {},
        400,
        "parameters.binary_data_output: expected true or false, got 'yes'",
    ),
    ("unknown output", {**_doc(), "outputs": [{"name": "prob"}]}, {}, 400, "prob: no such output"),
    (
        "binary size",
        _doc(dense__data=None, dense__parameters={"binary_data_size": 3}),
        {},
        400,
        "dense: parameters.binary_data_size 3",
    ),
    ("header length", _doc(), {HEADER: "999999"}, 400, "Inference-Header-Content-Length: '999999'"),
    ("unknown field", {**_doc(), "extra": 1}, {}, 400, "unknown field `extra`"),
    ("gzip", _doc(), {"content-encoding": "gzip"}, 415, "Content-Encoding: 'gzip'"),
]


@pytest.mark.parametrize(
    ("doc", "headers", "status", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
async def test_bad_tensor_is_a_4xx_naming_it(
    client: httpx.AsyncClient, doc: Any, headers: dict, status: int, reason: str
) -> None:
    r = await client.post(INFER, content=json.dumps(doc), headers=headers)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and reason in r.json()["error"], r.text
    good = await client.post(INFER, content=json.dumps(_doc()))  # the server keeps serving
    assert good.status_code == 200


async def test_binary_tensor_bytes_must_match_the_inputs(client: httpx.AsyncClient) -> None:
    dense, sparse = random_events(2, seed=4)
    body, headers = triton_body(dense, sparse)
    short = await client.post(INFER, content=body[:-8], headers=headers)
    assert short.status_code == 400 and "sparse: binary data ends at byte" in short.json()["error"]
    extra = await client.post(INFER, content=body + b"\0" * 4, headers=headers)
    assert extra.status_code == 400 and "4 bytes after the JSON header" in extra.json()["error"]


async def test_refusals_quote_a_long_name_or_value_cut_short(client: httpx.AsyncClient) -> None:
    for doc in (
        _doc(dense__datatype="F" * 100_000),
        _doc(dense__name="d" * 100_000),
        {**_doc(), "parameters": {"binary_data_output": ["x" * 100_000]}},
        {**_doc(), "outputs": [{"name": "c" * 100_000}]},
    ):
        r = await client.post(INFER, content=json.dumps(doc))
        assert r.status_code == 400 and len(r.json()["error"]) < 200, r.text[:300]


async def test_the_versioned_routes_serve_the_one_version_the_metadata_lists(
    client: httpx.AsyncClient,
) -> None:
    """A client given the version the metadata lists (tritonclient's ``model_version="1"``)
    calls ``/v2/models/ctr/versions/1/...``: it was no route (and, not in the access table,
    a 401 asking an open cluster for a credential). Another version is a 404 naming it."""
    from ekko.node.access import AccessPolicy

    dense, sparse = random_events(3, seed=6)
    body, headers = triton_body(dense, sparse)
    plain = await client.post(INFER, content=body, headers=headers)
    meta = (await client.get("/v2/models/ctr")).json()
    assert meta["versions"] == ["1"]
    at = "/v2/models/ctr/versions/1"
    assert (await client.get(at)).json() == meta
    assert (await client.get(at + "/ready")).json() == {"name": "ctr", "ready": True}
    versioned = await client.post(at + "/infer", content=body, headers=headers)
    assert versioned.status_code == 200, versioned.text
    n = int(versioned.headers[HEADER])
    got = InferenceServerClient.parse_response_body(versioned.content, header_length=n)
    want = InferenceServerClient.parse_response_body(plain.content, header_length=n)
    np.testing.assert_array_equal(got.as_numpy("ctr"), want.as_numpy("ctr"))
    for path in ("/v2/models/ctr/versions/2", "/v2/models/ctr/versions/2/ready"):
        r = await client.get(path)
        assert r.status_code == 404 and "has no version '2'" in r.json()["error"], r.text
    r = await client.post("/v2/models/ctr/versions/2/infer", content=body, headers=headers)
    assert r.status_code == 404 and "versions: ['1']" in r.json()["error"], r.text
    for method, path in (("GET", at), ("GET", at + "/ready"), ("POST", at + "/infer")):
        assert AccessPolicy(serve_open=True).required(method, path) is None
        assert "reader" in (AccessPolicy(serve_open=False).required(method, path) or ())
