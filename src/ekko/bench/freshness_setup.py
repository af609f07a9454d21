"""What one ``ekko bench freshness`` stream is run with and what it gives: the setups, the
stream they open, and the results (see ``ekko.bench.freshness`` for the design)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ekko.bench.freshness_replicas import DelayedReplica, SyncedReplica, WanLink
from ekko.protocol.puller import PullerConfig
from ekko.protocol.responder import ResponderConfig
from ekko.store import Store
from ekko.train.dlrm import DLRMConfig
from ekko.train.streams import Events, MovieLensStream, StreamConfig, SyntheticStream
from ekko.train.trainer import TrainerConfig

IN_PROCESS = "in_process"
EKKO = "ekko"
FIXED_DELAYS_S: tuple[tuple[str, float], ...] = (("10s", 10.0), ("1min", 60.0), ("10min", 600.0))
AUC_BAR = 0.002


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FreshnessSetup:
    """Everything that decides one stream's figures; recorded in the JSON.

    Why one frozen record: the bench and the tests run the same code path (``run_stream``) on
    different setups, and a result is only comparable with the inputs that made it.

    ``stream`` is ``"synthetic"`` (``synthetic`` configures it; ``max_batches`` is required)
    or ``"movielens"`` (``max_batches`` None replays all of it). ``fixed_delays_s`` are the
    queue variants by name, in simulated seconds; ``warmup_s`` (simulated seconds from the
    first event) is excluded from the AUC / log loss; ``series_s`` is the plot's interval.
    """

    stream: str
    batch_size: int
    max_batches: int | None
    warmup_s: float
    series_s: float
    model: DLRMConfig
    fixed_delays_s: tuple[tuple[str, float], ...] = FIXED_DELAYS_S
    synthetic: StreamConfig | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wan: WanLink = field(default_factory=WanLink)
    puller: PullerConfig = field(default_factory=lambda: PullerConfig(wait_ms=600_000, window=4))
    responder: ResponderConfig = field(default_factory=lambda: ResponderConfig(max_wait_ms=600_000))
    embedding_shards: int = 16

    def __post_init__(self) -> None:
        if self.stream not in ("synthetic", "movielens"):
            raise ValueError(f"FreshnessSetup.stream must be synthetic or movielens: {self.stream}")
        if self.stream == "synthetic" and self.max_batches is None:
            raise ValueError("FreshnessSetup.max_batches is required for the synthetic stream")
        names = [IN_PROCESS, EKKO, *(n for n, _ in self.fixed_delays_s)]
        if len(set(names)) != len(names):
            raise ValueError(f"FreshnessSetup: duplicate variant names {names}")
        if any(d < 0 for _, d in self.fixed_delays_s):
            raise ValueError(f"FreshnessSetup.fixed_delays_s must be >= 0: {self.fixed_delays_s}")

    @property
    def variants(self) -> list[str]:
        """Variant names in report order."""
        return [IN_PROCESS, EKKO, *(n for n, _ in self.fixed_delays_s)]


def default_setups(quick: bool = False) -> list[FreshnessSetup]:
    """The bench's two setups (synthetic, MovieLens); ``quick`` compresses time by 10x."""
    scale = 0.1 if quick else 1.0
    base = StreamConfig(max_vocab=20_000, initial_items=10_000, events_per_s=1024.0)
    synthetic = replace(
        base,
        new_items_per_s=base.new_items_per_s / scale,
        hot_lifetime_s=base.hot_lifetime_s * scale,
        drift_period_s=(base.drift_period_s[0] * scale, base.drift_period_s[1] * scale),
        dense_period_s=base.dense_period_s * scale,
    )
    delays = tuple((name, d * scale) for name, d in FIXED_DELAYS_S)
    duration_s, warmup_s = 2700.0 * scale, 900.0 * scale
    # Item ids grow by new_items_per_s per item feature; keep them below rows_per_table.
    items = synthetic.initial_items + synthetic.new_items_per_s * duration_s
    syn_model = DLRMConfig(
        num_dense=synthetic.num_dense,
        num_sparse=synthetic.num_sparse,
        embedding_dim=8,
        rows_per_table=int(math.ceil(items * 1.05 / 1000) * 1000),
        bottom_mlp=(32, 8),
        top_mlp=(64, 32, 1),
    )
    batch = 1024
    syn = FreshnessSetup(
        stream="synthetic",
        batch_size=batch,
        max_batches=int(duration_s * synthetic.events_per_s / batch),
        warmup_s=warmup_s,
        series_s=60.0 * scale,
        model=syn_model,
        fixed_delays_s=delays,
        synthetic=synthetic,
    )
    ml_batch = 64
    ml = FreshnessSetup(
        stream="movielens",
        batch_size=ml_batch,
        max_batches=30_000 // ml_batch if quick else None,
        warmup_s=86_400.0 * (5 if quick else 20),
        series_s=86_400.0 * (2 if quick else 7),
        model=DLRMConfig(
            num_dense=MovieLensStream.num_dense,
            num_sparse=MovieLensStream.num_sparse,
            embedding_dim=8,
            rows_per_table=2048,  # user ids <= 943, item ids <= 1682, the rest < 32
            bottom_mlp=(16, 8),
            top_mlp=(32, 16, 1),
        ),
        fixed_delays_s=FIXED_DELAYS_S,  # its timeline is never compressed, even in quick
    )
    return [syn, ml]


def setup_json(s: FreshnessSetup) -> dict[str, Any]:
    """The setup as recorded in the JSON (with its variant names)."""
    d = asdict(s)
    d["variants"] = s.variants
    return d


def open_stream(setup: FreshnessSetup) -> tuple[Iterator[Events], int, dict[str, Any]]:
    """(the setup's batches, how many, what the JSON records of the stream)."""
    if setup.stream == "synthetic":
        stream = SyntheticStream(setup.synthetic)
        total = int(setup.max_batches or 0)
        dt = stream.time_per_batch(setup.batch_size)
        # A batch is over one event spacing after its last event (when the next one starts).
        info = {"time_per_batch_s": dt, "batch_end_after_last_event_s": dt / setup.batch_size}
        return itertools.islice(stream.batches(setup.batch_size), total), total, info
    ml = MovieLensStream()
    total = math.ceil(len(ml) / setup.batch_size)
    if setup.max_batches is not None:
        total = min(total, setup.max_batches)
    gaps = np.diff(ml.ts)
    info = {
        "events_total": len(ml),
        "span_days": float((ml.ts[-1] - ml.ts[0]) / 86_400),
        "median_gap_s": float(np.median(gaps)),
        "mean_gap_s": float(np.mean(gaps)),
        "share_of_gaps_le_10s": float(np.mean(gaps <= 10)),
        "batch_end_after_last_event_s": 0.0,  # a batch is over at its last rating
    }
    return itertools.islice(ml.batches(setup.batch_size), total), total, info


# -- results ---------------------------------------------------------------------------------


@dataclass
class VariantResult:
    """One variant's quality on one stream: after the warm-up, and per series interval."""

    name: str
    auc: float
    log_loss: float
    events: int
    series: list[dict[str, float | None]]


@dataclass
class FreshnessRun:
    """What ``run_stream`` measured, plus the stores (tests look inside them).

    ``predictions[name]`` float32 [n] and ``labels`` [n] cover the events after the warm-up,
    in stream order; ``times`` [n] are their simulated seconds from the first event.
    """

    setup: FreshnessSetup
    variants: dict[str, VariantResult]
    predictions: dict[str, np.ndarray]
    labels: np.ndarray
    times: np.ndarray
    source: Store
    replicas: dict[str, Store]
    delayed: dict[str, DelayedReplica]
    synced: SyncedReplica
    ekko_latency: dict[str, Any]
    ekko_messages: int
    batches: int
    events: int
    stream_seconds: float
    wall_s: float
    stream_info: dict[str, Any] = field(default_factory=dict)
