"""The load and capacity of ``ekko bench scale``: its spec, the writer that spreads row
updates over the partitions' sources, and the capacity check (issue 17).

Apart from ``ekko.bench.scale`` to keep each module small; nothing here runs on its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ekko.client import Client, Credentials
from ekko.node.config import ModelConfig
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LaunchError, LocalCluster
from ekko.store import shard_of
from ekko.store.holding import row_bytes
from ekko.store.placement import Placement

console = Console(stderr=True)

LOAD_TABLE = "emb"


@dataclass(frozen=True)
class ScaleSpec:
    """Inputs of one run; recorded in the JSON."""

    partitions: int = 4
    wan_delay_ms: tuple[float, ...] = (25.0, 50.0)
    rate: float = 100_000.0
    tick_ms: float = 25.0  # a write per source per tick (the latency counts from the source)
    dim: int = 32
    shards: int = 16
    key_space: int = 400_000
    model_rows_per_table: int = 10_000
    warm_s: float = 6.0
    measure_s: float = 12.0
    blocks: int = 2
    failover_s: float = 8.0
    converge_s: float = 90.0
    margin: float = 1.10
    train_events: int = 204_800
    quick: bool = False

    def model(self) -> ModelConfig:
        return ModelConfig(name="ctr", rows_per_table=self.model_rows_per_table)


QUICK = ScaleSpec(warm_s=3.0, measure_s=6.0, blocks=1, failover_s=5.0, key_space=200_000,
                  model_rows_per_table=5_000, train_events=40_960, quick=True)  # fmt: skip


# -- capacity ---------------------------------------------------------------------------------


def _capacity_doc(spec: ScaleSpec, partitions: int, budget_mb: float) -> dict[str, Any]:
    """One holder per partition in one DC, ``emb`` of ``key_space`` initial rows: the whole
    model counted against every node's budget from its creation."""
    doc = cluster_doc(
        dcs=1, replicas=1, partitions=partitions, wan_delay_ms=[spec.wan_delay_ms[0]],
        tables=[(LOAD_TABLE, spec.dim, spec.shards)], max_memory_mb=budget_mb,
        sync={"snapshot_interval_s": 0},
    )  # fmt: skip
    doc["tables"][0]["initial_rows"] = spec.key_space
    return doc


def model_bytes(spec: ScaleSpec) -> tuple[int, list[int]]:
    """The model's bytes (``key_space`` rows of ``emb``, ``row_bytes`` each) and each
    partition's share under the placement (whole shards)."""
    per = [0] * spec.partitions
    for p in Placement(spec.partitions).partitions_of(LOAD_TABLE, spec.shards).tolist():
        per[p] += -(-spec.key_space // spec.shards) * row_bytes(spec.dim)
    return spec.key_space * row_bytes(spec.dim), per


def capacity(spec: ScaleSpec, tmp: Path) -> dict[str, Any]:
    """Every node's budget a little above a quarter of the model: the 1-partition source
    refuses to start by name; the 4-partition cluster takes every row of the model (written
    to the sources over write streams, none refused) and its holders converge."""
    total, shares = model_bytes(spec)
    budget_mb = round(max(shares) * spec.margin / 2**20, 2)
    console.print(f"[scale] capacity: model {total / 2**20:.1f} MB, budget {budget_mb} MB a node")
    out: dict[str, Any] = {"model_mb": total / 2**20, "budget_mb": budget_mb,
                           "partition_mb": [s / 2**20 for s in shares]}  # fmt: skip
    path = write_cluster(_capacity_doc(spec, 1, budget_mb), tmp / "cap1" / "cluster.toml")
    cluster = LocalCluster(path)
    try:
        cluster.start(["source"], timeout=120)
        out["one_partition"] = {"refused": False, "message": "the source started"}
    except LaunchError as exc:
        msg = str(exc).splitlines()[0]
        out["one_partition"] = {"refused": "refuses to start" in msg and "table" in msg,
                                "message": msg}  # fmt: skip
    finally:
        cluster.stop_all()
    console.print(f"[scale] capacity, 1 partition: {out['one_partition']['message']}")
    doc = _capacity_doc(spec, spec.partitions, budget_mb)
    cluster = LocalCluster(write_cluster(doc, tmp / "cap4" / "cluster.toml"))
    try:
        cluster.start(timeout=120)
        writer = Writer(cluster, spec)
        try:
            for pool, stream in zip(writer.pools, writer.streams, strict=True):
                for chunk in np.array_split(pool, max(1, pool.size // 16_384)):
                    stream.send(LOAD_TABLE, chunk, np.ones((chunk.size, spec.dim), np.float32))
                stream.drain()
            written = writer.acked()
        finally:
            writer.close()
        cfg = cluster.config
        pairs = [(f"dc1-p{p}-r0", cfg.source_of(p).name) for p in range(spec.partitions)]
        t0 = time.monotonic()
        while time.monotonic() - t0 < spec.converge_s:
            if all(digests(cluster, a) == digests(cluster, b) for a, b in pairs):
                break
            time.sleep(0.5)  # the holders catch up
        rows = {a: cluster.get(a, "/v1/status")["tables"][LOAD_TABLE]["rows"] for a, _ in pairs}
        out["four_partitions"] = {
            "rows_written": written, "rows_held": rows,
            "runs": written == spec.key_space and sum(rows.values()) == spec.key_space,
        }  # fmt: skip
    finally:
        cluster.stop_all()
    console.print(f"[scale] capacity, {spec.partitions} partitions: {out['four_partitions']}")
    return out


# -- load -------------------------------------------------------------------------------------


class Writer(threading.Thread):
    """``rate`` rows/s of ``emb`` in ticks of ``tick_ms``, each key to its partition's source over a
    write stream of its own; counts what the sources acknowledged."""

    def __init__(self, cluster: LocalCluster, spec: ScaleSpec) -> None:
        super().__init__(daemon=True, name="scale-writer")
        cfg = cluster.config
        keys = np.arange(spec.key_space, dtype=np.int64)
        part = cfg.placement().partitions_of(LOAD_TABLE, spec.shards)[shard_of(keys, spec.shards)]
        shuffle = np.random.default_rng(2).permutation  # cycled: a write's keys are distinct
        self.pools = [shuffle(keys[part == p]) for p in range(spec.partitions)]
        creds = Credentials(secret=cluster.secret)
        self.clients = [Client.at(cluster.url(cfg.source_of(p).name, ""), creds)
                        for p in range(spec.partitions)]  # fmt: skip
        self.streams = [c.write_stream() for c in self.clients]
        self.tick_s = spec.tick_ms / 1e3
        self.per_tick = max(1, round(spec.rate * self.tick_s / spec.partitions))
        self.values = np.random.default_rng(1).standard_normal(
            (self.per_tick, spec.dim)).astype(np.float32)  # fmt: skip
        self.stop_event = threading.Event()
        self.sent = 0
        self.error: str | None = None

    def run(self) -> None:
        tick = time.monotonic()
        at = 0
        try:
            while not self.stop_event.is_set():
                for pool, s in zip(self.pools, self.streams, strict=True):
                    start = at % (pool.size - self.per_tick)
                    s.send(LOAD_TABLE, pool[start : start + self.per_tick], self.values)
                    self.sent += self.per_tick
                at += self.per_tick
                tick += self.tick_s
                delay = tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the load's pace: a tick every tick_ms
                elif delay < -1.0:
                    tick = time.monotonic()  # fell behind by a second: the rate is not reached
            for s in self.streams:
                s.drain()
        except Exception as exc:  # reported in the summary, not swallowed
            self.error = repr(exc)
        finally:
            self.close()

    def close(self) -> None:
        for s in self.streams:
            s.close()
        for c in self.clients:
            c.close()

    def acked(self) -> int:
        return sum(s.acked_rows for s in self.streams)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)


def digests(cluster: LocalCluster, name: str) -> dict[str, str]:
    return {t: v["digest"] for t, v in cluster.get(name, "/v1/status")["tables"].items()}
