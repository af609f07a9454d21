"""The cluster config's tuning sections (``[sync]``, ``[durability]``, ``[scheduler]``,
``[guard]``, ``[http]``) and the strict base every section shares.

Apart from ``ekko.node.config`` (the topology: DCs, nodes, partitions, tables) because each of
these is read by one part of the node and validated on its own; ``ClusterConfig`` composes
them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ekko.codec import CODECS
from ekko.guard.detector import DetectorConfig
from ekko.guard.errors import GuardConfigError
from ekko.schedule import SchedulerConfig, UpdateScheduler

RowCodec = Literal[CODECS]  # type: ignore[valid-type]


class Strict(BaseModel):
    """A config section: unknown fields, inf and NaN refused; frozen once read."""

    # No field takes inf or NaN: an infinite bandwidth, delay, interval or timeout passed
    # and then stalled a link or a task without a word; a disabled feature has its switch.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyncConfig(Strict):
    max_bytes: int = Field(8 << 20, gt=0)
    wait_ms: int = Field(1000, ge=0)
    window: int = Field(32, gt=0)
    poll_interval_ms: int = Field(100, ge=0)
    request_timeout_ms: int = Field(5000, gt=0)
    cache_capacity: int = Field(16384, gt=0)
    use_shard_version: bool = True
    use_cache: bool = True
    use_dc_leader: bool = True
    compress: bool = False
    snapshot_interval_s: float = Field(30.0, ge=0)
    failover_probe_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(1.0, gt=0)
    # Row codec per link kind (None: plain float32 arrays): lossy on the WAN, exact on the LAN.
    wan_codec: RowCodec | None = None
    lan_codec: RowCodec | None = None
    pace_wan: bool = False  # pace each WAN session at its link's bandwidth (mbit)
    # Tombstones every holder has are purged at the source this often (0: never), holders
    # report their floors on pulls every tombstone_report_s, and a holder silent for
    # tombstone_horizon_s stops holding purges back (it reconciles when it is back).
    tombstone_purge_s: float = Field(10.0, ge=0, le=86_400)
    tombstone_report_s: float = Field(5.0, gt=0, le=3_600)
    tombstone_horizon_s: float = Field(600.0, gt=0, le=30 * 86_400)

    @model_validator(mode="after")
    def _horizon_past_a_report(self) -> SyncConfig:
        # A healthy holder reports at most report_s + wait_ms apart (a parked pull waits
        # that long before its answer lets the next one carry the report): a shorter horizon
        # counts it as silent, and it gets key lists it does not need at every purge.
        gap = self.tombstone_report_s + self.wait_ms / 1000
        if self.tombstone_horizon_s <= gap:
            raise ValueError(
                f"tombstone_horizon_s: {self.tombstone_horizon_s} s must exceed "
                f"tombstone_report_s + wait_ms ({gap:g} s), the longest a holder that is "
                "up goes between two reports"
            )
        return self


class DurabilitySection(Strict):
    """The source's write-ahead log and restart recovery (README "Durability")."""

    # Log every source write; an HTTP write is answered once its group commit is fsynced.
    wal: bool = True
    # One fsync per window for every write in it, once a write waits (an HTTP write does)...
    wal_window_ms: float = Field(3.0, ge=0, le=1000)
    # ...while writes nobody waits for (the trainer's) are fsynced at most this late.
    wal_lazy_ms: float = Field(50.0, ge=0, le=10_000)
    # On restart the source pulls what it lacks from the replicas before it accepts writes;
    # it waits this long for each replica that does not answer.
    recovery_timeout_s: float = Field(20.0, gt=0)


class SchedulerSection(SchedulerConfig):
    """The source's update scheduler (DESIGN.md §4): lanes by priority, optional deferral.
    The library's ``SchedulerConfig`` itself (its fields, its checks), off by default."""

    enabled: bool = False

    def build(self) -> SchedulerConfig | None:
        """The scheduler's config, already valid (None when the scheduler is off)."""
        return self if self.enabled else None

    def scheduler(self) -> UpdateScheduler | None:
        config = self.build()
        return None if config is None else UpdateScheduler(config)


class GuardSection(Strict):
    """The guard (DESIGN.md §6): baseline, detection, rollback. Per-model share and lag are
    ``models[].baseline_share`` / ``baseline_lag_s``."""

    enabled: bool = False
    interval_s: float = Field(1.0, gt=0)
    shadow_share: float = Field(0.3, ge=0, le=1)
    # The detector's settings: their rules are DetectorConfig's, checked once when the
    # config is read (``_detector``), with its errors named after these fields.
    min_samples: int = 100
    warmup_intervals: int = 20
    drift_allowance: float = 1.5  # CUSUM k, robust sigmas per interval
    uncertain_threshold: float = 8.0
    corrupted_threshold: float = 12.0
    probation: int = Field(5, ge=1)
    rollback_margin_s: float = Field(10.0, ge=0)
    quarantine_s: float = Field(30.0, ge=0, le=86_400)  # training input dropped after a rollback
    preimage_window_s: float = Field(600.0, gt=0)
    # partitioned: how long the coordinator waits for each other source's restore answer
    restore_timeout_s: float = Field(10.0, gt=0)
    # from the first interval: online AUC this far (and floor_z standard errors) under the
    # baseline's, log loss worse too, two intervals running, is corrupted (no warm-up needed)
    floor_auc_drop: float = 0.05
    floor_z: float = 4.0
    # after a rollback: online AUC this far under its level before the incident keeps the
    # model recovering (traffic stays on the baseline) and says so
    recovery_auc_tolerance: float = Field(0.02, gt=0)

    _detector: DetectorConfig = PrivateAttr()

    @model_validator(mode="after")
    def _build_detector(self) -> GuardSection:
        try:
            self._detector = DetectorConfig(
                uncertain_threshold=self.uncertain_threshold,
                corrupted_threshold=self.corrupted_threshold,
                min_samples=self.min_samples,
                warmup_intervals=self.warmup_intervals,
                k=self.drift_allowance,
                reference_intervals=max(200, self.warmup_intervals),
                floor_auc_drop=self.floor_auc_drop,
                floor_z=self.floor_z,
            )
        except GuardConfigError as exc:
            # Name the config's fields, not the library's (k is drift_allowance here).
            raise ValueError(
                re.sub(r"\bk\b", "drift_allowance", str(exc).replace("DetectorConfig.", "guard."))
            ) from exc
        return self

    def detector(self) -> DetectorConfig:
        """The detector's config, built and checked when the config was read."""
        return self._detector


class HttpSection(Strict):
    """Every node's HTTP port: who may call without a credential, and its limits
    (``ekko.node.access``, ``ekko.node.http_server``)."""

    serve_open: bool = True  # predict, feedback and the model list need no credential
    max_body_bytes: int = Field(16 << 20, gt=0, le=1 << 30)
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive in this
    idle_timeout_s: float = Field(5.0, gt=0)  # keep-alive connections idle longer are closed
    max_connections: int = Field(512, gt=0)  # more open connections are answered 503
    refresh_min_interval_s: float = Field(10.0, ge=0)  # checkpoint refreshes coalesce within
