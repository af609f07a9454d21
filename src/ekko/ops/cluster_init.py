"""``ekko cluster init``: a runnable local cluster config with free loopback ports."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import tomli_w

from ekko.node.config import ClusterConfig
from ekko.ops.cluster_tls import tls_entries, write_tls_files

DEFAULT_DELAYS_MS = (25.0, 50.0, 100.0)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the kernel just handed out (free at the time of asking)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    return ports


def new_cluster_id() -> str:
    """A fresh ``[cluster] id``: each written config is a cluster of its own."""
    return secrets.token_hex(8)


def wan_delays(given: list[float] | None, dcs: int) -> tuple[list[float], str]:
    """The one-way WAN delay of each of ``dcs`` inference DCs from ``--wan-delay-ms``, and a
    sentence saying how they were chosen: one value applies to every DC, a list gives one
    per DC (its length must be ``dcs``), none takes the defaults (25/50/100 ms, repeated).

    Raises ValueError naming the option when the list does not fit."""
    if not given:
        delays = [DEFAULT_DELAYS_MS[i % len(DEFAULT_DELAYS_MS)] for i in range(dcs)]
        shown = "/".join(f"{d:g}" for d in delays)
        return delays, f"{shown} ms, the defaults (25/50/100, repeated past three DCs)"
    if any(not (0 <= d < float("inf")) for d in given):
        raise ValueError(f"--wan-delay-ms: delays are finite and >= 0 ms, got {given}")
    if len(given) == 1:
        return given * dcs, f"--wan-delay-ms {given[0]:g} applied to all {dcs} DCs"
    if len(given) != dcs:
        raise ValueError(
            f"--wan-delay-ms: {len(given)} delays for {dcs} DCs; give one per DC or a single "
            "value for all"
        )
    return list(given), "--wan-delay-ms one per DC"


def describe(doc: dict[str, Any], path: Path, delays_note: str) -> list[str]:
    """What ``ekko cluster init`` tells the operator: every node with its DC, WAN delay and
    admin port, where the data and logs go, and the command that starts it."""
    delay = {dc["name"]: dc.get("wan_delay_ms") for dc in doc["dcs"]}
    data = path.parent / doc["cluster"]["data_dir"]
    lines = [f"{'node':<10} {'dc':<6} {'WAN ms':>6}  admin port  (sync port)"]
    for n in doc["nodes"]:
        d = delay.get(n["dc"])
        lines.append(
            f"{n['name']:<10} {n['dc']:<6} {'-' if d is None else f'{d:g}':>6}  "
            f"{n['admin_port']:<10}  ({n['sync_port']})"
        )
    lines.append(f"WAN delays: {delays_note}")
    if doc.get("guard", {}).get("enabled"):
        lines.append("guard on: it watches every model's online quality and rolls back")
    lines.append(f"data and node logs: {data}/ (one <node>.log per node)")
    config = "" if path.name == "cluster.toml" and path.parent == Path() else f" --config {path}"
    lines.append(f"next: ekko up{config}   (Ctrl-C stops every node)")
    return lines


def cluster_doc(
    *,
    dcs: int,
    replicas: int,
    wan_delay_ms: list[float] | None = None,
    wan_mbit: float | None = None,
    tables: list[tuple[str, int, int]] | None = None,
    serve: bool = False,
    sync: dict[str, Any] | None = None,
    name: str = "ekko-local",
    models: list[dict[str, Any]] | None = None,
    checkpoint_every_s: float | None = None,
    tls: bool = False,
    cluster_id: str | None = None,
    partitions: int = 1,
    max_memory_mb: float | None = None,
) -> dict[str, Any]:
    """The TOML document of a training DC (one source) and ``dcs`` inference DCs.

    ``models``: ``[[models]]`` entries (served by replicas when ``serve``, trained at the
    source). ``checkpoint_every_s``: add DC ``ckpt`` (WAN like the first DC) with one serving
    replica refreshed only by a full copy of the source that often, the no-Ekko comparison.
    ``tls``: every port over TLS, with the files under ``tls/`` (``write_cluster`` makes
    them). ``cluster_id``: ``[cluster] id``, which the nodes' data dirs record and check
    (``new_cluster_id()``; None: unchecked).

    ``partitions`` > 1 (issue 17): the training DC has one source per partition
    (``source-p{p}``) and each inference DC ``replicas`` holders of each partition
    (``dc{i}-p{p}-r{r}``, the first its leader); ``max_memory_mb`` is every node's budget."""
    if dcs < 1 or replicas < 1 or partitions < 1:
        raise ValueError(
            f"need dcs, replicas and partitions >= 1, got dcs={dcs} replicas={replicas} "
            f"partitions={partitions}"
        )
    if partitions > 1 and checkpoint_every_s is not None:
        raise ValueError(
            "--checkpoint-every: a checkpoint replica copies one source; "
            f"not with --partitions {partitions}"
        )
    delays = list(wan_delay_ms or DEFAULT_DELAYS_MS)
    if len(delays) < dcs:
        delays = [delays[i % len(delays)] for i in range(dcs)]
    ports = free_ports(2 * (1 + partitions * (1 + dcs * replicas)))
    budget = {} if max_memory_mb is None else {"max_memory_mb": float(max_memory_mb)}
    sources = (
        [{"name": "source"} | budget]
        if partitions == 1
        else [{"name": f"source-p{p}", "partitions": [p]} | budget for p in range(partitions)]
    )
    doc: dict[str, Any] = {
        "cluster": {"name": name, "secret_file": "cluster.secret", "data_dir": "data"}
        | ({"id": cluster_id} if cluster_id is not None else {})
        | ({"partitions": partitions} if partitions > 1 else {}),
        "dcs": [{"name": "train", "training": True}],
        "nodes": [
            s | {"dc": "train", "sync_port": ports.pop(), "admin_port": ports.pop()}
            for s in sources
        ],
        "tables": [
            {"name": n, "dim": d, "shards": s}
            for n, d, s in (tables if tables is not None else [] if models else [("emb", 32, 16)])
        ],
        "sync": sync or {},
    }
    if models:
        doc["models"] = models
    for i in range(dcs):
        dc: dict[str, Any] = {"name": f"dc{i + 1}", "wan_delay_ms": float(delays[i])}
        if wan_mbit is not None:
            dc["wan_mbit"] = float(wan_mbit)
        doc["dcs"].append(dc)
        for p in range(partitions):
            for r in range(replicas):
                name_ = f"dc{i + 1}-r{r}" if partitions == 1 else f"dc{i + 1}-p{p}-r{r}"
                held = {} if partitions == 1 else {"partitions": [p]}
                doc["nodes"].append(
                    {
                        "name": name_,
                        "dc": f"dc{i + 1}",
                        "sync_port": ports.pop(),
                        "admin_port": ports.pop(),
                        "serve": serve,
                    }
                    | held
                    | budget
                )
    if checkpoint_every_s is not None:
        dc = {"name": "ckpt", "wan_delay_ms": float(delays[0])}
        if wan_mbit is not None:
            dc["wan_mbit"] = float(wan_mbit)
        doc["dcs"].append(dc)
        doc["nodes"].append(
            {
                "name": "ckpt-r0",
                "dc": "ckpt",
                "sync_port": ports.pop(),
                "admin_port": ports.pop(),
                "serve": serve,
                "refresh": "checkpoint",
                "checkpoint_interval_s": float(checkpoint_every_s),
            }
        )
    if tls:
        tls_entries(doc)
    ClusterConfig.model_validate(doc)
    return doc


def write_cluster(doc: dict[str, Any], out: Path) -> Path:
    """Write the config and, beside it, a fresh cluster secret readable only by its owner
    and, when the config names TLS files, the cluster CA and every node's key pair."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    secret = out.parent / doc["cluster"]["secret_file"]
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if doc["cluster"].get("tls"):
        write_tls_files(doc, out.parent)
    out.write_text(tomli_w.dumps(_without_none(doc)))
    return out


def _without_none(x: Any) -> Any:
    """TOML has no null: an unset optional field is simply left out."""
    if isinstance(x, dict):
        return {k: _without_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_without_none(v) for v in x]
    return x
