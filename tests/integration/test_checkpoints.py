"""Issue 16, checkpoints against real node processes: ``ekko load`` writes a torch state dict
into the cluster's source, the replica serves it, and ``ekko export`` gives back a safetensors
file equal to the state dict loaded; that file, in ``DLRM.load_state_dict``, predicts what
the serving replica predicts. A bad file is named and writes nothing.

No trainer input is posted, so nothing moves the model's rows but the load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cluster_checks import until, wait_converged
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ekko.cli import app
from ekko.node.config import load_config
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.train.dlrm import DLRM

pytestmark = pytest.mark.integration

MODEL = {"name": "ctr", "rows_per_table": 300, "embedding_dim": 4, "num_sparse": 3}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], tables=[])
    config = write_cluster(doc, tmp_path_factory.mktemp("ckpt") / "cluster.toml")
    with LocalCluster(config) as c:
        c.start(timeout=180)
        yield c, config


def _digests(c: LocalCluster) -> dict[str, str]:
    return {t: v["digest"] for t, v in c.get("source", "/v1/status")["tables"].items()}


def test_load_then_export_equals_the_file_and_predicts_what_the_replica_serves(
    cluster: tuple[LocalCluster, Path], tmp_path: Path
) -> None:
    c, config = cluster
    dlrm = load_config(config).models[0].dlrm()
    source_model = DLRM(type(dlrm)(**{**dlrm.__dict__, "seed": 11}))  # not the cluster's init
    with torch.no_grad():
        for bag in source_model.sparse.embedding_bags.values():
            bag.weight.normal_(0, 0.5)  # rows large enough to move the CTRs
    state = source_model.state_dict()
    torch.save(state, tmp_path / "in.pt")
    run = CliRunner().invoke(
        app, ["load", "--config", str(config), "--model", "ctr", "--from", str(tmp_path / "in.pt")]
    )
    assert run.exit_code == 0, run.output
    assert f"loaded {len(state)} tensors, 910 rows" in run.output
    assert "loading: 910/910 rows (100 %)" in run.output  # progress shown
    wait_converged(c)
    out = tmp_path / "out.safetensors"
    run = CliRunner().invoke(
        app, ["export", "--config", str(config), "--model", "ctr", "--out", str(out)]
    )
    assert run.exit_code == 0, run.output
    exported = load_file(out)
    assert set(exported) == set(state)
    for key, tensor in state.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0, msg=key)
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["model"] == "ctr" and meta["lineage"] == c.get("source", "/v1/status")["lineage"]
    assert '"emb_0":{"rows":300' in meta["versions"]

    model = DLRM(dlrm)
    model.load_state_dict(exported)
    rng = np.random.default_rng(2)
    dense = rng.uniform(0, 3, (32, 13)).astype(np.float32)
    sparse = rng.integers(0, 10**6, (32, 3), dtype=np.int64)
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()

    def served() -> bool:
        r = httpx.post(
            c.url("dc1-r0", "/v1/models/ctr/predict"),
            json={"dense": dense.tolist(), "sparse": sparse.tolist()},
            timeout=10,
        )
        got = np.array([p["ctr"] for p in r.json()["predictions"]], dtype=np.float32)
        return bool(np.allclose(got, want, rtol=1e-6, atol=1e-7))

    until("the replica predicts as the exported model", served, 30.0)
    assert np.ptp(want) > 0.01  # the loaded rows matter
    # a dense table (its name has a slash) reads through the rows route, signed as a reader
    row = c.get("dc1-r0", "/v1/tables/dense/top.0.bias/rows?keys=0")["rows"][0]
    assert row["found"] and np.allclose(row["value"], state["top.0.bias"].numpy().ravel())


def test_a_bad_file_is_named_and_nothing_is_written(
    cluster: tuple[LocalCluster, Path], tmp_path: Path
) -> None:
    c, config = cluster
    dlrm = load_config(config).models[0].dlrm()
    state = {k: v.contiguous() for k, v in DLRM(dlrm).state_dict().items()}
    state["top.0.weight"] = state["top.0.weight"][:, :-1].contiguous()
    save_file(state, tmp_path / "bad.safetensors")
    before = _digests(c)
    run = CliRunner().invoke(
        app,
        ["load", "--config", str(config), "--from", str(tmp_path / "bad.safetensors")],
    )
    assert run.exit_code == 1
    assert "top.0.weight: shape" in run.output and "the model's is" in run.output
    assert _digests(c) == before


def test_a_source_that_does_not_answer_is_named(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], tables=[])
    config = write_cluster(doc, tmp_path / "cluster.toml")  # never started
    torch.save(DLRM(load_config(config).models[0].dlrm()).state_dict(), tmp_path / "x.pt")
    for args in (["export", "--out", str(tmp_path / "x.safetensors")],
                 ["load", "--from", str(tmp_path / "x.pt")]):  # fmt: skip
        run = CliRunner().invoke(app, [*args, "--config", str(config)])
        assert run.exit_code == 1 and isinstance(run.exception, SystemExit), run.exception
        assert "source source" in run.output and "ConnectError" in run.output, run.output
    assert not (tmp_path / "x.safetensors").exists()
