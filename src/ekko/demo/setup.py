"""What one ``ekko demo`` run is: its options (checked before anything starts) and the
cluster it generates, clean every run."""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ekko.ops.cluster_init import cluster_doc, new_cluster_id, write_cluster

MODEL = "ctr"
DEMO_CLUSTER = "ekko-demo"


@dataclass(frozen=True)
class DemoSpec:
    """Inputs of one demo run; recorded in its JSON."""

    duration_s: float = 60.0
    rate: float = 1024.0  # events/s offered; the stream's simulated clock runs at this rate
    batch: int = 256
    wan_delay_ms: tuple[float, ...] = (25.0, 50.0, 100.0)
    checkpoint_every_s: float | None = None  # None: a quarter of the run, at least 10 s
    rows_per_table: int = 100_000  # hashed tables' rows (row_budget None)
    row_budget: int | None = 5_000  # dynamic tables: raw ids, at most this many rows each
    embedding_dim: int = 8
    interval_s: float = 5.0  # AUC-over-time resolution
    warmup_events: int = 30_000  # trained before the run; then every replica gets a copy
    guard: bool = True
    baseline_lag_s: float = 20.0
    poison_at_s: float | None = None  # train on flipped labels from then ...
    poison_for_s: float = 20.0  # ... for this long
    ready_timeout_s: float = 120.0
    seed: int = 7
    partitions: int = 1  # > 1: the partitioned form (ekko.demo.partitioned)

    @property
    def ranks(self) -> int:
        """Sharded trainer processes of the partitioned form (rank r owns p % ranks == r)."""
        return min(2, self.partitions)

    @property
    def checkpoint_interval_s(self) -> float:
        """The checkpoint replica reloads several times a run, so its AUC sawtooth shows."""
        if self.checkpoint_every_s is not None:
            return self.checkpoint_every_s
        return max(10.0, self.duration_s / 4)

    def validate(self) -> DemoSpec:
        """Refuse absurd options before anything starts; ValueError names the option."""
        positive = {
            "--duration": self.duration_s,
            "--rate": self.rate,
            "--checkpoint-every": self.checkpoint_interval_s,
            "--poison-for": self.poison_for_s,
        }
        for option, value in positive.items():
            if not (0 < value < float("inf")):
                raise ValueError(f"{option} must be a positive number, got {value:g}")
        if not isinstance(self.partitions, int) or not 1 <= self.partitions <= 16:
            raise ValueError(f"--partitions must be an integer in 1..16, got {self.partitions}")
        if self.partitions > 1:
            self._check_partitioned()
        at = self.poison_at_s
        if at is not None and not (0 <= at < self.duration_s):
            raise ValueError(
                f"--poison-at must be within the run (0 to --duration {self.duration_s:g} s), "
                f"got {at:g}"
            )
        return self

    def _check_partitioned(self) -> None:
        """What the partitioned form does not have, refused by name."""
        if self.checkpoint_every_s is not None:
            raise ValueError(
                f"--checkpoint-every: the checkpoint replica copies one source; with "
                f"--partitions {self.partitions} there is a source per partition"
            )


def cluster_config(spec: DemoSpec, workdir: Path) -> Path:
    """Write the demo's cluster config in ``workdir``: a new cluster every run."""
    if spec.partitions > 1:
        return partitioned_config(spec, workdir)
    model = {
        "name": MODEL,
        "rows_per_table": spec.rows_per_table,
        "embedding_dim": spec.embedding_dim,
        "dense_interval_s": 1.0,
        "baseline_lag_s": spec.baseline_lag_s,
    }
    if spec.row_budget is not None:  # bounded memory: admission and LRU eviction
        model |= {
            "row_budget": spec.row_budget,
            "admission": {"kind": "count", "threshold": 2, "sketch_width": 16384},
            "eviction": {"kind": "lru"},
        }
    doc = cluster_doc(
        dcs=len(spec.wan_delay_ms),
        replicas=1,
        wan_delay_ms=list(spec.wan_delay_ms),
        serve=True,
        models=[model],
        checkpoint_every_s=spec.checkpoint_interval_s,
        sync={"snapshot_interval_s": 0},
        name=DEMO_CLUSTER,
        cluster_id=new_cluster_id(),
    )
    if spec.guard:
        doc["guard"] = {"enabled": True}
    doc["http"] = {"refresh_min_interval_s": 1.0}  # the warm-up asks for one copy at once
    return write_cluster(doc, workdir / "cluster.toml")


def previous_run(workdir: Path, console: Console) -> bool:
    """Every demo run starts clean (a run is a new cluster: it once restored the last run's
    model and counted its rows as update latency). The data of a previous demo in
    ``workdir`` is removed; anything else there is set aside by the nodes (``fresh``, True)."""
    data, config = workdir / "data", workdir / "cluster.toml"
    if not data.exists():
        return False
    try:
        previous = tomllib.loads(config.read_text())["cluster"]["name"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        previous = None
    if previous != DEMO_CLUSTER:
        return True
    shutil.rmtree(data)
    console.print(f"removed the previous demo run's data ({data})", highlight=False)
    return False


def partitioned_config(spec: DemoSpec, workdir: Path) -> Path:
    """The partitioned form: ``spec.partitions`` sources in the training DC, a serving holder
    of each partition in every inference DC (it predicts by scatter-gather), no checkpoint
    replica; the model's tables hashed (the sharded trainer's: dynamic tables are not sharded
    yet) and trained with Adagrad (the sharded trainer's optimizer). The guard as in the
    single-partition form: the source of partition 0 coordinates, every source restores and
    quarantines its partitions, the holders keep the baseline (README "Partitioned parameter
    servers")."""
    model = {
        "name": MODEL,
        "rows_per_table": spec.rows_per_table,
        "embedding_dim": spec.embedding_dim,
        "dense_interval_s": 1.0,
        "optimizer": "adagrad",
        "sparse_lr": 0.05,  # Adagrad's steps shrink as they add up: larger than Adam's
        "dense_lr": 0.01,
        "baseline_lag_s": spec.baseline_lag_s,
    }
    doc = cluster_doc(
        dcs=len(spec.wan_delay_ms),
        replicas=1,
        wan_delay_ms=list(spec.wan_delay_ms),
        serve=True,
        models=[model],
        sync={"snapshot_interval_s": 0},
        name=DEMO_CLUSTER,
        cluster_id=new_cluster_id(),
        partitions=spec.partitions,
    )
    if spec.guard:
        doc["guard"] = {"enabled": True}
    return write_cluster(doc, workdir / "cluster.toml")
