"""A partitioned cluster serving a model whose rows a client wrote (issue 17's bench and test).

Why the rows are written and not trained: in a partitioned cluster a node's in-process
trainer would publish every table's rows to its own source, which holds one partition and
refuses the rest (421). Here the sources run without ``[[models]]`` (only the model's tables,
from ``[[tables]]``) and a client writes each table's rows to the source of each key's
partition; the serving nodes run with ``[[models]]`` (a second config file, the launcher's
``node_configs``) and predict by scatter-gather. The rows written are kept, so a caller can
compute the predictions a single full copy of the model would give (``reference``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ekko.bench.serve import model_tables
from ekko.client import Client, Credentials
from ekko.node.config import ModelConfig
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.store import Store, shard_of
from ekko.store.placement import Placement


@dataclass
class ModelCluster:
    """The launcher of a partitioned cluster and the model rows written to it."""

    cluster: LocalCluster
    model: ModelConfig
    rows: dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (keys, values) written


def model_dict(model: ModelConfig) -> dict[str, Any]:
    """``[[models]]`` entry of ``model`` (TOML has no tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.model_dump().items()}


def write_configs(
    doc: dict[str, Any], model: ModelConfig, out: Path
) -> tuple[Path, dict[str, Path]]:
    """Write ``doc`` (no ``[[models]]``: what the sources run) and, for its ``serve = true``
    nodes, the same with the model: (cluster path, node -> its config path)."""
    serving = copy.deepcopy(doc)
    serving["models"] = [model_dict(model)]
    path = write_cluster(doc, out / "cluster.toml")
    serving_path = write_cluster(serving, out / "serving.toml")
    return path, {n["name"]: serving_path for n in doc["nodes"] if n.get("serve")}


def partitioned_doc(
    model: ModelConfig, *, partitions: int, dcs: int, replicas: int, shards: int, **kwargs: Any
) -> dict[str, Any]:
    """``cluster_doc`` of ``partitions`` sources and ``replicas`` holders of each partition
    per inference DC, all serving, with ``model``'s tables (``shards`` a table)."""
    return cluster_doc(
        dcs=dcs, replicas=replicas, partitions=partitions, serve=True,
        tables=model_tables(model, shards), **kwargs,
    )  # fmt: skip


def source_of(cluster: LocalCluster, partition: int) -> str:
    return cluster.config.source_of(partition).name


def publish(cluster: LocalCluster, model: ModelConfig, seed: int = 0) -> ModelCluster:
    """Write every row of ``model`` (each embedding row, each dense tensor at key 0, small
    random values) to the source of its partition; the rows written are returned."""
    cfg = cluster.config
    placement = cfg.placement() if cfg.partitioned else Placement(1)
    rng = np.random.default_rng(seed)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    creds = Credentials(secret=cluster.secret)
    by_source: dict[str, Client] = {}
    try:
        for t in cfg.tables:
            n = model.rows_per_table if t.name.startswith("emb_") else 1  # dense: key 0
            keys = np.arange(n, dtype=np.int64)
            values = (rng.standard_normal((keys.size, t.dim)) * 0.1).astype(np.float32)
            rows[t.name] = (keys, values)
            part = placement.partitions_of(t.name, t.shards)[shard_of(keys, t.shards)]
            for p in np.unique(part).tolist():
                name = source_of(cluster, p)
                if name not in by_source:
                    by_source[name] = Client.at(cluster.url(name, ""), creds)
                mask = part == p
                by_source[name].write(t.name, keys[mask], values[mask])
    finally:
        for c in by_source.values():
            c.close()
    return ModelCluster(cluster, model, rows)


def reference(mc: ModelCluster) -> Store:
    """One store holding every row written: what a single-partition replica would hold."""
    store = Store()
    for t in mc.cluster.config.tables:
        store.create_table(t.spec())
        keys, values = mc.rows[t.name]
        store.table(t.name).write(keys, values, now_ns=1)
    return store
