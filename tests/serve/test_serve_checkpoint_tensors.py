"""``ekko.ops.checkpoint_tensors`` (beside the serve fixtures it trains with): the tensors
exported from a store load into ``DLRM`` and predict what the store's replica serves; a file's
rows written back export equal to the file; every bad tensor is refused by name before
anything is written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_fixtures import SMALL_MODEL, random_events, service, train

from ekko.ops.checkpoint_tensors import (
    CheckpointError,
    model_tensors,
    read_state,
    rows_of_state,
    tensors_from_store,
)
from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.spec import TableSpec
from ekko.train.dlrm import DLRM
from ekko.train.dynamic_embedding import DynamicEmbeddingConfig

CFG = SMALL_MODEL.dlrm()
MAX_ABS = SMALL_MODEL.max_abs


def _predict(model: DLRM, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()


def test_the_specs_are_the_torch_models_state_dict() -> None:
    state = DLRM(CFG).state_dict()
    specs = model_tensors(CFG)
    assert list(specs) == [k for k in specs if k in state] and set(specs) == set(state)
    assert {k: s.shape for k, s in specs.items()} == {k: tuple(t.shape) for k, t in state.items()}


def test_exported_tensors_load_into_the_model_and_predict_what_the_store_serves(
    tmp_path: Path,
) -> None:
    trained = train(steps=3)
    path = tmp_path / "s.snapshot"
    trained.store.save(path)  # the snapshot the source's /v1/snapshot sends
    store = Store.load(path)
    tensors, meta = tensors_from_store(store, CFG, "ctr")
    model = DLRM(CFG)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    dense, sparse = random_events(64, seed=9)
    served = service(store).predict(dense, sparse, 0.0).ctr
    np.testing.assert_allclose(_predict(model, dense, sparse), served, rtol=1e-6, atol=1e-7)
    assert meta["format"] == "ekko-dlrm-v1" and meta["lineage"] == f"{store.lineage:x}"
    emb = '"emb_0":{"rows":'
    assert emb in meta["versions"] and '"knowledge":[[' in meta["versions"]
    # rows the trainer never published read as zeros, as on a replica
    emb0 = tensors["sparse.embedding_bags.emb_0.weight"]
    held = store.table("emb_0").all_rows()[0]
    assert not emb0[np.setdiff1d(np.arange(CFG.rows_per_table), held)].any()


def test_rows_of_a_state_written_back_export_equal_to_it(tmp_path: Path) -> None:
    state = {k: v.numpy() for k, v in DLRM(CFG).state_dict().items()}
    store = Store()
    port = WritePort(store)
    plan = rows_of_state(state, CFG, MAX_ABS)
    for rows in plan:
        port.create_table(TableSpec(rows.table, rows.values.shape[1], 4))
        port.write_rows(rows.table, rows.keys, rows.values, now=0.0, now_ns=0)
    emb = plan[0]
    port.write_rows(emb.table, np.array([-1, CFG.rows_per_table]), emb.values[:2], now=0, now_ns=0)
    tensors, meta = tensors_from_store(store, CFG, "ctr")
    assert f'"{emb.table}":{{"rows":{CFG.rows_per_table + 2},"outside":2,' in meta["versions"]
    assert set(tensors) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def _state() -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in DLRM(CFG).state_dict().items()}


def _bad(change: str) -> dict[str, np.ndarray]:
    s = _state()
    emb, w = "sparse.embedding_bags.emb_1.weight", "bottom.0.weight"
    if change == "unknown":
        s["head.weight"] = np.zeros(3, dtype=np.float32)
    elif change == "missing":
        del s[w]
    elif change == "shape":
        s[emb] = s[emb][:-1]
    elif change == "dtype":
        s[w] = s[w].astype(np.float64)
    elif change == "nan":
        s[emb][7, 2] = np.nan
    elif change == "huge":
        s[w][0, 1] = 2 * MAX_ABS
    return s


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("unknown", "head.weight: not a tensor of the model"),
        ("missing", "bottom.0.weight: missing from the file"),
        ("shape", "sparse.embedding_bags.emb_1.weight: shape [1999, 8]; the model's is [2000, 8]"),
        ("dtype", "bottom.0.weight: dtype float64; the model holds float32"),
        ("nan", "sparse.embedding_bags.emb_1.weight[7, 2]: nan is NaN, infinite or beyond"),
        ("huge", "bottom.0.weight[0, 1]: "),
    ],
)
def test_a_bad_tensor_is_named_before_any_row(change: str, named: str) -> None:
    with pytest.raises(CheckpointError) as err:
        rows_of_state(_bad(change), CFG, MAX_ABS)
    assert named in str(err.value)


def test_files_torch_and_safetensors_and_what_is_not_one(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = DLRM(CFG).state_dict()
    torch.save(state, tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "m.safetensors")
    for name in ("m.pt", "m.safetensors"):
        got = read_state(tmp_path / name)
        assert set(got) == set(state)
        np.testing.assert_array_equal(got["top.0.bias"], state["top.0.bias"].numpy())
    save_file({"top.0.bias": state["top.0.bias"].half()}, tmp_path / "h.safetensors")
    torch.save({"top.0.bias": [1.0]}, tmp_path / "list.pt")
    torch.save([state["top.0.bias"]], tmp_path / "seq.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases = {
        "h.safetensors": "top.0.bias: dtype torch.float16; the model holds torch.float32",
        "list.pt": "top.0.bias: expected a tensor, got a list",
        "seq.pt": "expected a state dict (names to tensors), got a list",
        "junk.pt": "not a state dict torch or safetensors can read",
        "none.pt": "no such file",
    }
    for name, named in cases.items():
        with pytest.raises(CheckpointError) as err:
            read_state(tmp_path / name)
        assert named in str(err.value), name


def test_a_tensor_with_no_dense_cpu_data_is_named(tmp_path: Path) -> None:
    """A .pt state dict may hold float32 tensors that are sparse (COO, CSR) or on the meta
    device (no data at all, as ``torch.device("meta")`` models save): each is a
    ``CheckpointError`` naming it, not a RuntimeError out of ``ekko load``."""
    state = DLRM(CFG).state_dict()
    bias = state["top.0.bias"]
    cases = {
        "coo": (bias.to_sparse(), "top.0.bias: a sparse_coo tensor; the model holds dense"),
        "csr": (state["top.0.weight"].to_sparse_csr(), "top.0.weight: a sparse_csr tensor"),
        "meta": (torch.empty(bias.shape, device="meta"), "top.0.bias: on device meta"),
    }
    for name, (tensor, named) in cases.items():
        key = named.partition(":")[0]
        torch.save({**state, key: tensor}, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError) as err:
            read_state(tmp_path / f"{name}.pt")
        assert named in str(err.value), name


def test_a_model_with_dynamic_tables_is_refused_by_export_and_load_naming_why() -> None:
    dynamic = dataclasses.replace(CFG, dynamic=DynamicEmbeddingConfig(row_budget=64))
    with pytest.raises(CheckpointError, match="dynamic"):
        tensors_from_store(Store(), dynamic, "ctr")
    state = {k: v.numpy() for k, v in DLRM(CFG).state_dict().items()}
    with pytest.raises(CheckpointError, match="keyed by raw ids"):
        rows_of_state(state, dynamic, MAX_ABS)
