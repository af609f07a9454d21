"""Issue 16, the standard inference protocol: ``tritonclient[http]``, unmodified, against a
real serving replica. It finds the server live and ready, reads the model's tensors from
its metadata, and its ``infer`` (binary tensors, the client's default, and JSON ones) gets
the CTRs ``/v1/models/ctr/predict`` gives for the same events; a bad tensor is an
``InferenceServerException`` with status 400 naming the tensor.

No trainer input is posted, so the model's rows do not move between the two calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from cluster_checks import until
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

pytestmark = pytest.mark.integration

MODEL = {"name": "ctr", "rows_per_table": 200, "embedding_dim": 4, "num_sparse": 3}
ND, NS = 13, 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], tables=[])
    config = write_cluster(doc, tmp_path_factory.mktemp("oip") / "cluster.toml")
    with LocalCluster(config) as c:
        c.start(timeout=180)
        yield c


@pytest.fixture(scope="module")
def triton(cluster: LocalCluster) -> Iterator[InferenceServerClient]:
    url = cluster.url("dc1-r0", "").removeprefix("http://").rstrip("/")
    client = InferenceServerClient(url=url)
    until("the replica has the model", lambda: client.is_model_ready("ctr"), 60.0)
    yield client
    client.close()


def _inputs(dense: np.ndarray, sparse: np.ndarray, binary: bool) -> list[InferInput]:
    inputs = [InferInput("dense", list(dense.shape), "FP32"),
              InferInput("sparse", list(sparse.shape), "INT64")]  # fmt: skip
    inputs[0].set_data_from_numpy(dense, binary_data=binary)
    inputs[1].set_data_from_numpy(sparse, binary_data=binary)
    return inputs


def test_tritonclient_infers_what_predict_predicts(
    cluster: LocalCluster, triton: InferenceServerClient
) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_model_metadata("ctr")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("dense", "FP32", [-1, ND]),
        ("sparse", "INT64", [-1, NS]),
    ]
    assert meta["outputs"][0] == {"name": "ctr", "datatype": "FP32", "shape": [-1, 1]}
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    rng = np.random.default_rng(5)
    dense = rng.uniform(0, 5, (16, ND)).astype(np.float32)
    sparse = rng.integers(0, 10**6, (16, NS), dtype=np.int64)
    r = httpx.post(
        cluster.url("dc1-r0", "/v1/models/ctr/predict"),
        json={"dense": dense.tolist(), "sparse": sparse.tolist()},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    want = np.array([p["ctr"] for p in r.json()["predictions"]], dtype=np.float32)
    assert len(set(want.tolist())) > 1  # the events get different CTRs
    got = triton.infer("ctr", _inputs(dense, sparse, binary=True))
    np.testing.assert_array_equal(got.as_numpy("ctr")[:, 0], want)
    as_json = triton.infer(
        "ctr", _inputs(dense, sparse, binary=False), outputs=[InferRequestedOutput("ctr", False)]
    )
    np.testing.assert_array_equal(as_json.as_numpy("ctr")[:, 0], want)
    assert triton.is_model_ready("ctr", model_version="1")  # the version its metadata lists
    versioned = triton.infer("ctr", _inputs(dense, sparse, binary=True), model_version="1")
    np.testing.assert_array_equal(versioned.as_numpy("ctr")[:, 0], want)


@pytest.mark.parametrize(
    ("dense_dtype", "sparse_dtype", "names", "named"),
    [
        (np.float64, np.int64, ("dense", "sparse"), "dense: datatype 'FP64'"),
        (np.float32, np.int32, ("dense", "sparse"), "sparse: datatype 'INT32'"),
        (np.float32, np.int64, ("dense", "ids"), "ids: no such input"),
        (np.float32, np.int64, ("dense", "sparse", "wide"), "dense: shape [2, 14]"),
    ],
)
def test_a_bad_tensor_is_a_400_naming_it(
    triton: InferenceServerClient,
    dense_dtype: type,
    sparse_dtype: type,
    names: tuple[str, ...],
    named: str,
) -> None:
    width = ND + 1 if "wide" in names else ND
    dense = np.zeros((2, width), dtype=dense_dtype)
    sparse = np.ones((2, NS), dtype=sparse_dtype)
    inputs = []
    for name, arr in zip(names[:2], (dense, sparse), strict=True):
        dtype = {np.float64: "FP64", np.float32: "FP32", np.int32: "INT32", np.int64: "INT64"}
        t = InferInput(name, list(arr.shape), dtype[arr.dtype.type])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    with pytest.raises(InferenceServerException) as err:
        triton.infer("ctr", inputs)
    assert err.value.status() == "400"
    assert named in err.value.message()
    assert triton.is_server_ready()  # and it keeps serving
