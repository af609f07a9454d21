"""A DLRM's state dict and a store's tables, one for the other: what ``ekko export`` and
``ekko load`` convert, with no network here.

Each state-dict key of ``ekko.train.dlrm.DLRM`` is one store table: the embedding bag
``sparse.embedding_bags.emb_{i}.weight`` [rows_per_table, embedding_dim] is table
``emb_{i}``, one row per row index (the ids a model hashes to); a dense tensor
(``bottom.0.weight`` ...) is table ``dense/{key}``, its elements flattened into the row of
key 0 (``DLRMServingModel`` reads it so). A row the store never got reads as zeros, as it
does when a replica serves. Everything a file holds is checked against the model's specs
before a row is written: a wrong key, shape, dtype, a NaN or a value beyond the model's
``max_abs`` is a ``CheckpointError`` naming the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ekko.serve.replica import dense_shapes
from ekko.store import Store
from ekko.train.dlrm import DLRMConfig, dense_table_name, embedding_table_name

FORMAT = "ekko-dlrm-v1"
"""``format`` in an exported file's metadata."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported or loaded as asked; the message names the tensor
    or table at fault. Nothing was written."""


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict tensor of the model and the store table that holds it."""

    key: str
    table: str
    shape: tuple[int, ...]
    embedding: bool  # rows by index (else one flattened row at key 0)

    @property
    def dim(self) -> int:
        """The table's row width."""
        return self.shape[1] if self.embedding else int(np.prod(self.shape))


def model_tensors(config: DLRMConfig) -> dict[str, TensorSpec]:
    """Every state-dict key of ``DLRM(config)`` -> its spec, embedding tables first;
    ``CheckpointError`` for a model with dynamic tables (rows keyed by raw ids, which no
    ``[rows_per_table, dim]`` tensor holds)."""
    if config.dynamic is not None:
        raise CheckpointError(
            "the model's embedding tables are dynamic ([[models]] row_budget): their rows "
            "are keyed by raw ids, which a state dict of [rows_per_table, dim] tensors cannot "
            "hold; ekko export and ekko load take models with hashed tables only"
        )
    ns = config.table_namespace
    specs: dict[str, TensorSpec] = {}
    for i in range(config.num_sparse):
        key = f"sparse.embedding_bags.emb_{i}.weight"
        shape = (config.rows_per_table, config.embedding_dim)
        specs[key] = TensorSpec(key, embedding_table_name(i, ns), shape, True)
    for key, shape in dense_shapes(config).items():
        specs[key] = TensorSpec(key, dense_table_name(key, ns), tuple(shape), False)
    return specs


# -- export: a store's tables as tensors ------------------------------------------------------


def tensors_from_store(
    store: Store, config: DLRMConfig, model: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The model's state dict as float32 arrays from ``store`` (one snapshot: one cut across
    its tables), and the metadata saying which cut: the store's lineage and catalog version,
    each table's knowledge per shard and lane and its highest row version."""
    tensors: dict[str, np.ndarray] = {}
    versions: dict[str, Any] = {}
    for key, spec in model_tensors(config).items():
        table = store.tables.get(spec.table)
        if table is None:
            raise CheckpointError(
                f"{key}: table {spec.table!r} is not in the source's store (model {model} "
                f"never published it)"
            )
        if table.dim != spec.dim:
            raise CheckpointError(
                f"{key}: table {spec.table!r} has dim {table.dim}, the model's {spec.shape} "
                f"needs {spec.dim}"
            )
        keys, values, row_versions, _, _ = table.all_rows()
        out = np.zeros(spec.shape, dtype=np.float32)
        inside = (keys >= 0) & (keys < spec.shape[0])
        if spec.embedding:
            out[keys[inside]] = values[inside]
        else:
            at = np.flatnonzero(keys == 0)
            if at.size == 0:
                raise CheckpointError(f"{key}: table {spec.table!r} holds no row yet")
            out[...] = values[at[0]].reshape(spec.shape)
        tensors[key] = out
        versions[spec.table] = {
            "rows": int(keys.shape[0]),
            # rows whose key no id hashes to (written by hand): never served, not exported
            "outside": int(keys.shape[0] - inside.sum()) if spec.embedding else 0,
            "max_version": int(row_versions.max()) if row_versions.size else 0,
            "knowledge": table.knowledge.tolist(),
        }
    metadata = {
        "format": FORMAT,
        "model": model,
        "config": json.dumps(_config_doc(config)),
        "lineage": f"{store.lineage:x}",
        "catalog_version": str(store.catalog_version),
        "versions": json.dumps(versions, separators=(",", ":")),
    }
    return tensors, metadata


def _config_doc(config: DLRMConfig) -> dict[str, Any]:
    return {
        "num_dense": config.num_dense,
        "num_sparse": config.num_sparse,
        "embedding_dim": config.embedding_dim,
        "rows_per_table": config.rows_per_table,
        "bottom_mlp": list(config.bottom_mlp),
        "top_mlp": list(config.top_mlp),
        "table_namespace": config.table_namespace,
    }


# -- load: a file's tensors as table rows ------------------------------------------------------


def read_state(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file or a torch ``.pt`` state dict, by key, as numpy
    arrays in their own dtype (checked later); ``CheckpointError`` naming the file."""
    import pickle

    import torch
    from safetensors import SafetensorError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file") from exc
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            SafetensorError) as exc:  # fmt: skip
        why = f"not a state dict torch or safetensors can read: {exc}"
        raise CheckpointError(f"{path}: {why}") from exc
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        kind = type(raw).__name__
        raise CheckpointError(f"{path}: expected a state dict (names to tensors), got a {kind}")
    state: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key}: expected a tensor, got a {type(value).__name__}")
        if value.dtype != torch.float32:
            raise CheckpointError(f"{key}: dtype {value.dtype}; the model holds torch.float32")
        if value.layout != torch.strided:
            layout = str(value.layout).removeprefix("torch.")
            raise CheckpointError(f"{key}: a {layout} tensor; the model holds dense ones")
        if value.device.type != "cpu":  # map_location moves real devices; meta has no data
            raise CheckpointError(f"{key}: on device {value.device.type}, no data to load")
        state[key] = value.detach().contiguous().numpy()
    return state


@dataclass(frozen=True)
class TableRows:
    """The rows one tensor becomes: ``keys`` int64 [n], ``values`` float32 [n, dim]."""

    key: str
    table: str
    keys: np.ndarray
    values: np.ndarray


def rows_of_state(
    state: Mapping[str, np.ndarray], config: DLRMConfig, max_abs: float
) -> list[TableRows]:
    """``state`` checked against the model in full, then as the rows each table gets (every
    row of an embedding table, so a load replaces what the cluster held). ``CheckpointError``
    naming the tensor: a key the model lacks or lacks in the file, a wrong shape or dtype,
    a NaN or infinity, a value beyond ``max_abs`` (the source would refuse it)."""
    specs = model_tensors(config)
    unknown = sorted(set(state) - set(specs))
    if unknown:
        raise CheckpointError(
            f"{unknown[0]}: not a tensor of the model ({len(unknown)} unknown keys; the model "
            f"has e.g. {next(iter(specs))!r}, {list(specs)[-1]!r})"
        )
    missing = [k for k in specs if k not in state]
    if missing:
        raise CheckpointError(f"{missing[0]}: missing from the file ({len(missing)} missing)")
    out: list[TableRows] = []
    for key, spec in specs.items():
        arr = np.asarray(state[key])
        if arr.dtype != np.float32:
            raise CheckpointError(f"{key}: dtype {arr.dtype}; the model holds float32")
        if tuple(arr.shape) != spec.shape:
            raise CheckpointError(
                f"{key}: shape {list(arr.shape)}; the model's is {list(spec.shape)}"
            )
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(arr) <= max_abs)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise CheckpointError(
                f"{key}{list(at)}: {float(arr[at])!r} is NaN, infinite or beyond max_abs "
                f"{max_abs:g}"
            )
        if spec.embedding:
            keys = np.arange(spec.shape[0], dtype=np.int64)
            values = np.ascontiguousarray(arr)
        else:
            keys = np.zeros(1, dtype=np.int64)
            values = np.ascontiguousarray(arr.reshape(1, -1))
        out.append(TableRows(key, spec.table, keys, values))
    return out
