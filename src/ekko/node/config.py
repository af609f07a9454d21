"""Cluster configuration (``cluster.toml``): data centres, nodes, tables, sync settings.

Validated once, here, with errors naming the field; everything else reads the typed result.
WAN links follow a backbone model: each inference DC has a one-way access delay and bandwidth
to the backbone (the training DC's is zero), so the delay between two DCs is the sum of
theirs and the bandwidth the smaller one.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from ekko.codec import CODECS
from ekko.guard.detector import DetectorConfig
from ekko.guard.errors import GuardConfigError
from ekko.net.tls import TlsFileError, TlsFiles, check_ca, check_node_files
from ekko.net.wan import WanProfile
from ekko.schedule import SchedulerConfig, UpdateScheduler
from ekko.store._validate import DEFAULT_MAX_ABS
from ekko.store.spec import TableSpec

RowCodec = Literal[CODECS]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A cluster config that cannot run, with the field that is wrong."""


class _Strict(BaseModel):
    # No field takes inf or NaN: an infinite bandwidth, delay, interval or timeout passed
    # and then stalled a link or a task without a word; a disabled feature has its switch.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClusterTls(_Strict):
    """TLS on every port of the cluster (README "TLS"): the CA every node's certificate is
    signed by; each node names its own files (``nodes[].tls``)."""

    ca: str


class NodeTls(_Strict):
    """A node's certificate (signed by the cluster CA, issued to the node's name) and key."""

    cert: str
    key: str


class ClusterSection(_Strict):
    name: str = "ekko"
    # Which cluster this config describes (``ekko cluster init`` draws one): every node's
    # data dir records it and refuses another's (``node.data_dir``). None: not checked.
    id: str | None = None
    secret_file: str = "cluster.secret"
    data_dir: str = "data"
    tls: ClusterTls | None = None


class DcConfig(_Strict):
    name: str
    training: bool = False
    wan_delay_ms: float = Field(0.0, ge=0)
    wan_mbit: float | None = Field(None, gt=0)
    upstream_dc: str | None = None  # relay tree: pull from this DC's leader instead


class NodeConfig(_Strict):
    name: str
    dc: str
    host: str = "127.0.0.1"
    sync_port: int = Field(ge=0, le=65535)
    admin_port: int = Field(ge=0, le=65535)
    serve: bool = False
    # "sync": pull every change (Ekko). "checkpoint": no sync; load a full copy of the source
    # every checkpoint_interval_s, as deployments without Ekko do (the demo's comparison).
    refresh: Literal["sync", "checkpoint"] = "sync"
    checkpoint_interval_s: float = Field(60.0, gt=0)
    tls: NodeTls | None = None  # required when [cluster] tls is set


class TableConfig(_Strict):
    name: str
    dim: int = Field(gt=0)
    shards: int = Field(16, gt=0, le=4096)
    initial_rows: int = Field(1024, gt=0)
    max_abs: float = Field(DEFAULT_MAX_ABS, gt=0, lt=1e30)  # |value| a source write may hold

    def spec(self) -> TableSpec:
        return TableSpec(self.name, self.dim, self.shards)


class AdmissionSection(_Strict):
    """``models[].admission``: which new ids of a dynamic table get a row
    (``ekko.train.admission.AdmissionConfig``)."""

    kind: Literal["all", "count", "probability"] = "all"
    threshold: int = Field(2, ge=1)
    sketch_width: int = Field(1 << 16, ge=1, le=1 << 26)
    sketch_depth: int = Field(4, ge=1, le=16)
    probability: float = Field(0.5, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=1 << 64)  # the sketch's salts and the coin are uint64


class EvictionSection(_Strict):
    """``models[].eviction``: which rows of a dynamic table leave
    (``ekko.train.eviction.EvictionConfig``); ``ttl_s`` in seconds since the last update."""

    kind: Literal["none", "lru", "lfu", "ttl"] = "lru"
    ttl_s: float | None = Field(None, gt=0, lt=1e18)  # EvictionConfig's bound

    @model_validator(mode="after")
    def _check_ttl(self) -> EvictionSection:
        if self.kind == "ttl" and self.ttl_s is None:
            raise ValueError('ttl_s is required with kind = "ttl"')
        return self


class ModelConfig(_Strict):
    """A served DLRM: its tables are ``emb_{i}`` and ``dense/{tensor}`` in the store, after
    ``table_namespace`` — unset: none for a cluster's only model, ``{name}/`` for each of
    several (so two models never write the same tables).

    ``row_budget`` makes every embedding table dynamic (``ekko.train.DynamicEmbedding``):
    keyed by raw ids, at most ``row_budget`` rows each, with ``admission`` and ``eviction``
    (which need it); unset, ids are hashed into ``rows_per_table`` rows."""

    name: str = "ctr"
    num_dense: int = Field(13, gt=0)
    num_sparse: int = Field(26, gt=0)
    embedding_dim: int = Field(16, gt=0)
    rows_per_table: int = Field(100_000, gt=0)
    bottom_mlp: tuple[PositiveInt, ...] | None = None  # default (64, embedding_dim)
    top_mlp: tuple[PositiveInt, ...] = (64, 32, 1)
    baseline_share: float = Field(0.005, ge=0, lt=1)
    baseline_lag_s: float = Field(120.0, ge=0)
    optimizer: Literal["adam", "adagrad"] = "adam"
    sparse_lr: float = Field(0.01, gt=0)
    dense_lr: float = Field(0.001, gt=0)
    embedding_shards: int = Field(16, gt=0, le=4096)
    dense_interval_s: float = Field(1.0, ge=0)
    table_namespace: str | None = Field(None, pattern=r"^([^/]+/)*$")
    dense_limit: float = Field(64.0, gt=0, lt=1e30)  # |dense feature| accepted (DLRMConfig)
    # |value| a write to any of the model's tables (embedding rows, dense tensors) may hold.
    max_abs: float = Field(DEFAULT_MAX_ABS, gt=0, lt=1e30)
    row_budget: int | None = Field(None, gt=0, le=1 << 31)
    admission: AdmissionSection | None = None
    eviction: EvictionSection | None = None

    def dlrm(self):  # -> ekko.train.dlrm.DLRMConfig; imported lazily (torch is heavy)
        from ekko.train.dlrm import DLRMConfig

        return DLRMConfig(
            dynamic=self._dynamic(),
            num_dense=self.num_dense,
            num_sparse=self.num_sparse,
            embedding_dim=self.embedding_dim,
            rows_per_table=self.rows_per_table,
            bottom_mlp=self.bottom_mlp or (64, self.embedding_dim),
            top_mlp=self.top_mlp,
            table_namespace=self.table_namespace or "",
            dense_limit=self.dense_limit,
        )

    def _dynamic(self):  # -> ekko.train.DynamicEmbeddingConfig | None
        if self.row_budget is None:
            return None
        from ekko.train.admission import AdmissionConfig
        from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
        from ekko.train.eviction import EvictionConfig

        return DynamicEmbeddingConfig(
            row_budget=self.row_budget,
            admission=AdmissionConfig(**(self.admission or AdmissionSection()).model_dump()),
            eviction=EvictionConfig(**(self.eviction or EvictionSection()).model_dump()),
        )

    def served(self):  # -> ekko.serve.ServedModel; imported lazily (torch is heavy)
        """What a serving node needs of this model."""
        from ekko.serve import ServedModel

        return ServedModel(self.name, self.dlrm(), self.baseline_share, self.model_dump())

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.bottom_mlp is not None and (
            not self.bottom_mlp or self.bottom_mlp[-1] != self.embedding_dim
        ):
            raise ValueError(
                f"models[{self.name}].bottom_mlp must end with embedding_dim="
                f"{self.embedding_dim}, got {list(self.bottom_mlp)}"
            )
        if not self.top_mlp or self.top_mlp[-1] != 1:
            raise ValueError(f"models[{self.name}].top_mlp must end with 1 (one logit)")
        for field in ("admission", "eviction"):
            if getattr(self, field) is not None and self.row_budget is None:
                raise ValueError(
                    f"models[{self.name}].{field} needs models[{self.name}].row_budget "
                    f"(the rows each dynamic table may hold)"
                )
        return self


class SyncConfig(_Strict):
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


class DurabilitySection(_Strict):
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


class GuardSection(_Strict):
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
    quarantine_s: float = Field(30.0, ge=0)  # training input dropped after a rollback
    preimage_window_s: float = Field(600.0, gt=0)
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


class HttpSection(_Strict):
    """Every node's HTTP port: who may call without a credential, and its limits
    (``ekko.node.access``, ``ekko.node.http_server``)."""

    serve_open: bool = True  # predict, feedback and the model list need no credential
    max_body_bytes: int = Field(16 << 20, gt=0, le=1 << 30)
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive in this
    idle_timeout_s: float = Field(5.0, gt=0)  # keep-alive connections idle longer are closed
    max_connections: int = Field(512, gt=0)  # more open connections are answered 503
    refresh_min_interval_s: float = Field(10.0, ge=0)  # checkpoint refreshes coalesce within


Role = Literal["source", "leader", "follower", "checkpoint"]


class ClusterConfig(_Strict):
    cluster: ClusterSection = ClusterSection()
    dcs: list[DcConfig]
    nodes: list[NodeConfig]
    tables: list[TableConfig] = []
    models: list[ModelConfig] = []
    sync: SyncConfig = SyncConfig()
    durability: DurabilitySection = DurabilitySection()
    scheduler: SchedulerSection = SchedulerSection()
    guard: GuardSection = GuardSection()
    http: HttpSection = HttpSection()

    @model_validator(mode="before")
    @classmethod
    def _namespace_models(cls, data: Any) -> Any:
        """Several models share one store: give each unnamespaced one its own tables."""
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list) or len(models) < 2:
            return data
        named = []
        for m in models:
            if isinstance(m, dict) and m.get("table_namespace") is None and "name" in m:
                m = {**m, "table_namespace": f"{m['name']}/"}
            elif isinstance(m, ModelConfig) and m.table_namespace is None:
                m = m.model_copy(update={"table_namespace": f"{m.name}/"})
            named.append(m)
        return {**data, "models": named}

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        dc_names = [d.name for d in self.dcs]
        _unique("dcs[].name", dc_names)
        _unique("nodes[].name", [n.name for n in self.nodes])
        _unique("tables[].name", [t.name for t in self.tables])
        _unique("models[].name", [m.name for m in self.models])
        spaces = [m.table_namespace or "" for m in self.models]
        for ns in sorted({ns for ns in spaces if spaces.count(ns) > 1}):
            clash = [m.name for m, x in zip(self.models, spaces, strict=True) if x == ns]
            raise ValueError(
                f"models[].table_namespace: models {clash} would write the same store tables "
                f"(namespace {ns!r}); give each its own"
            )
        training = [d.name for d in self.dcs if d.training]
        if len(training) != 1:
            raise ValueError(f"dcs: exactly one DC must have training = true, got {training}")
        for n in self.nodes:
            if n.dc not in dc_names:
                raise ValueError(f"nodes[{n.name}].dc: unknown DC {n.dc!r} (known: {dc_names})")
            if self.cluster.tls is not None and n.tls is None:
                raise ValueError(
                    f"nodes[{n.name}].tls: required when cluster.tls is set (its cert and key)"
                )
            if self.cluster.tls is None and n.tls is not None:
                raise ValueError(f"nodes[{n.name}].tls: set, but cluster.tls (the CA) is not")
        for d in self.dcs:
            if d.upstream_dc is not None and d.upstream_dc not in dc_names:
                raise ValueError(f"dcs[{d.name}].upstream_dc: unknown DC {d.upstream_dc!r}")
            if not self.dc_nodes(d.name) and (
                d.training
                or d.upstream_dc is not None
                or any(x.upstream_dc == d.name for x in self.dcs)
            ):
                raise ValueError(f"dcs[{d.name}]: has no syncing nodes")
            if not any(n.dc == d.name for n in self.nodes):
                raise ValueError(f"dcs[{d.name}]: has no nodes")
        self._check_relay_tree()
        return self

    def _check_relay_tree(self) -> None:
        for d in self.dcs:
            seen, cur = {d.name}, d
            while cur.upstream_dc is not None:
                if cur.upstream_dc in seen:
                    raise ValueError(f"dcs[{d.name}].upstream_dc: relay cycle through {seen}")
                seen.add(cur.upstream_dc)
                cur = self.dc(cur.upstream_dc)

    # -- topology -----------------------------------------------------------------------

    def dc(self, name: str) -> DcConfig:
        for d in self.dcs:
            if d.name == name:
                return d
        raise ConfigError(f"unknown DC {name!r}")

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"unknown node {name!r} (known: {[n.name for n in self.nodes]})")

    def dc_nodes(self, dc: str) -> list[NodeConfig]:
        """The syncing nodes of ``dc`` in config order (checkpoint-refreshed ones excluded)."""
        return [n for n in self.nodes if n.dc == dc and n.refresh == "sync"]

    @property
    def training_dc(self) -> DcConfig:
        return next(d for d in self.dcs if d.training)

    @property
    def source(self) -> NodeConfig:
        return self.dc_nodes(self.training_dc.name)[0]

    def role(self, name: str) -> Role:
        node = self.node(name)
        if node.refresh == "checkpoint":
            return "checkpoint"
        if node.name == self.source.name:
            return "source"
        first = self.dc_nodes(node.dc)[0]
        return "leader" if first.name == node.name else "follower"

    def upstreams(self, name: str) -> list[NodeConfig]:
        """Where ``name`` pulls from, in failover order: DC peers ahead of it, then the WAN."""
        node = self.node(name)
        if self.role(name) in ("source", "checkpoint"):
            return []
        peers = self.dc_nodes(node.dc)
        ahead = peers[: peers.index(node)] if self.sync.use_dc_leader else []
        if node.dc == self.training_dc.name:
            return [*ahead[1:], self.source] if ahead else [self.source]
        up_dc = self.dc(node.dc).upstream_dc
        wan = [*self.dc_nodes(up_dc), self.source] if up_dc else [self.source]
        return [*ahead, *wan]

    def wan(self, a: str, b: str) -> WanProfile | None:
        """The emulated link between nodes ``a`` and ``b`` (None inside one DC)."""
        da, db = self.dc(self.node(a).dc), self.dc(self.node(b).dc)
        if da.name == db.name:
            return None
        mbits = [m for m in (da.wan_mbit, db.wan_mbit) if m is not None]
        return WanProfile(
            delay_ms=da.wan_delay_ms + db.wan_delay_ms, mbit=min(mbits) if mbits else None
        )

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"unknown model {name!r} (known: {[m.name for m in self.models]})")

    def specs(self) -> list[TableSpec]:
        return [t.spec() for t in self.tables]

    def path(self, relative: str, base: Path) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else base / p

    def tls_files(self, base: Path, name: str | None = None) -> TlsFiles | None:
        """The TLS files of node ``name`` (CA, its cert and key), or the CA alone for a
        process that is no node (the CLI, the launcher); None when TLS is off."""
        if self.cluster.tls is None:
            return None
        ca = self.path(self.cluster.tls.ca, base)
        if name is None:
            return TlsFiles(ca)
        own = self.node(name).tls
        assert own is not None  # checked by _check
        return TlsFiles(ca, self.path(own.cert, base), self.path(own.key, base))

    def check_tls_files(self, base: Path, name: str | None = None) -> None:
        """Read the CA and, for node ``name``, its certificate and key: each must exist,
        parse, and fit (key of that certificate, signed by the CA, issued to the node).
        Raises ConfigError naming the field. Nothing to do when TLS is off."""
        files = self.tls_files(base, name)
        if files is None:
            return
        try:
            ca = check_ca(files.ca)
        except TlsFileError as exc:
            raise ConfigError(f"cluster.tls.ca: {exc}") from exc
        if name is not None:
            try:
                check_node_files(ca, files, name)
            except TlsFileError as exc:
                raise ConfigError(f"nodes[{name}].tls.{exc.field}: {exc}") from exc


def _unique(field: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{field}: duplicate names {dupes}")


def load_config(path: Path, node: str | None = None) -> ClusterConfig:
    """Read and validate ``path``; any problem is a ConfigError naming file and field.

    With TLS on, the CA file is read and checked too, and with ``node`` (the process that
    runs it) that node's certificate and key: a node refuses to start on files that would
    fail every handshake, rather than failing each one."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        config = ClusterConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
    try:
        if node is not None:
            config.node(node)
        config.check_tls_files(Path(path).resolve().parent, node)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config
