"""``ekko export`` and ``ekko load``: a cluster's model as a checkpoint file, and back.

Export reuses the checkpoint replicas' full copy: the source's ``GET /v1/snapshot`` (signed;
the store saved in one step on the source's event loop, so one cut across every table) is
loaded and checked as a ``Store`` and its model tables become the DLRM's state dict, saved
as safetensors (``ekko.ops.checkpoint_tensors``). Load checks the whole file against the
model first, then writes every tensor's rows with the client SDK (``ekko.client``: binary
row bodies, signed, through the source's one ``WritePort``, each batch acknowledged once
durable), in batches that fit the route's body limit, and replicas pull them as they pull
any write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from ekko.client import Client, ClientError
from ekko.client import ConfigError as ClientConfigError
from ekko.node.access import ClusterAuth
from ekko.node.config import ClusterConfig, ModelConfig
from ekko.node.http_client import ClusterHttp
from ekko.ops.checkpoint_tensors import (
    CheckpointError,
    TableRows,
    read_state,
    rows_of_state,
    tensors_from_store,
)
from ekko.store import SnapshotError, Store

Progress = Callable[[int, int, str], None]
"""``progress(rows_done, rows_total, table)`` after each acknowledged batch."""


@dataclass(frozen=True)
class Exported:
    """What ``export_model`` wrote: tensors, bytes, and the metadata saved with them."""

    path: Path
    tensors: int
    size: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class Loaded:
    """What ``load_model`` wrote: tensors, rows, and the highest version the source issued."""

    tensors: int
    rows: int
    max_version: int


def model_config(config: ClusterConfig, model: str) -> ModelConfig:
    """The ``[[models]]`` entry named ``model``; ``CheckpointError`` naming the known ones."""
    for m in config.models:
        if m.name == model:
            return m
    known = [m.name for m in config.models]
    raise CheckpointError(f"model {model!r} is not in the cluster config (models: {known})")


def _refused(r: httpx.Response, what: str) -> CheckpointError:
    try:
        why = r.json().get("error", r.text)
    except ValueError:
        why = r.text
    return CheckpointError(f"{what}: HTTP {r.status_code}: {str(why)[:300]}")


def export_model(
    config: ClusterConfig, base_dir: Path, secret: bytes, model: str, out: Path
) -> Exported:
    """Write ``model`` as the source holds it now to ``out`` (safetensors, replaced whole:
    written beside it, then renamed)."""
    from safetensors.numpy import save_file

    m = model_config(config, model)
    http = ClusterHttp(config, base_dir)
    source = config.source.name
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ekko-export-") as tmp:
        snap = Path(tmp) / "source.snapshot"
        url = http.url(source, "/v1/snapshot")
        try:
            with (
                http.client(auth=ClusterAuth(secret), timeout=300.0) as client,
                client.stream("GET", url) as r,
            ):
                if r.status_code != 200:
                    r.read()
                    raise _refused(r, f"source {source} GET /v1/snapshot")
                with open(snap, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        except httpx.HTTPError as exc:
            raise CheckpointError(f"source {source} GET {url}: {exc!r}") from exc
        try:
            store = Store.load(snap)
        except SnapshotError as exc:
            raise CheckpointError(f"source {source}: its snapshot did not load: {exc}") from exc
        tensors, metadata = tensors_from_store(store, m.dlrm(), model)
        part = Path(tmp) / "out.safetensors"
        save_file(tensors, str(part), metadata=metadata)
        os.replace(part, out)
    size = out.stat().st_size
    return Exported(out, len(tensors), size, metadata)


def _check_source_tables(status: dict, plan: list[TableRows]) -> None:
    if status.get("accepting_writes") is False:
        raise CheckpointError("the source is not accepting writes yet (recovering); retry")
    tables = status.get("tables", {})
    for rows in plan:
        held = tables.get(rows.table)
        if held is None:
            raise CheckpointError(
                f"{rows.key}: table {rows.table!r} is not at the source (its trainer creates "
                f"the model's tables when it starts)"
            )
        if held["dim"] != rows.values.shape[1]:
            raise CheckpointError(
                f"{rows.key}: table {rows.table!r} has dim {held['dim']} at the source, the "
                f"file's tensor {rows.values.shape[1]}"
            )


def load_model(
    config: ClusterConfig,
    config_path: Path,
    model: str,
    path: Path,
    progress: Progress | None = None,
) -> Loaded:
    """Write the tensors of ``path`` (``.safetensors`` or a torch ``.pt`` state dict) into
    ``model``'s tables at the source of ``config`` (read from ``config_path``), through the
    client SDK's binary row writes. The file is checked in full against the model and the
    source's tables first: a bad tensor is a ``CheckpointError`` naming it, nothing written."""
    m = model_config(config, model)
    plan = rows_of_state(read_state(Path(path)), m.dlrm(), m.max_abs)
    budget = config.http.max_body_bytes // 2
    total = sum(int(t.keys.shape[0]) for t in plan)
    done = 0
    top = 0
    try:
        with Client.from_config(config_path, config.source.name, timeout=120.0) as client:
            _check_source_tables(client.status(at="writes"), plan)
            for rows in plan:
                step = max(1, budget // (rows.values.shape[1] * 4 + 8))
                for start in range(0, rows.keys.shape[0], step):
                    keys = rows.keys[start : start + step]
                    try:
                        versions = client.write(rows.table, keys, rows.values[start : start + step])
                    except ClientError as exc:
                        raise CheckpointError(
                            f"{rows.key}: writing table {rows.table!r} ({done} of {total} rows "
                            f"written before): {exc}"
                        ) from exc
                    top = max(top, int(np.max(versions, initial=0)))
                    done += int(keys.shape[0])
                    if progress is not None:
                        progress(done, total, rows.table)
    except (ClientError, ClientConfigError) as exc:
        raise CheckpointError(f"source {config.source.name}: {exc}") from exc
    return Loaded(len(plan), done, top)
