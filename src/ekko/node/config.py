"""Cluster configuration (``cluster.toml``): data centres, nodes, tables, sync settings.

Validated once, here, with errors naming the field; everything else reads the typed result.
WAN links follow a backbone model: each inference DC has a one-way access delay and bandwidth
to the backbone (the training DC's is zero), so the delay between two DCs is the sum of
theirs and the bandwidth the smaller one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ekko.net.tls import TlsFileError, TlsFiles, check_ca, check_node_files
from ekko.net.wan import WanProfile
from ekko.node import config_partitions
from ekko.node.config_models import AdmissionSection, EvictionSection, ModelConfig, check_memory
from ekko.node.config_sections import (
    DurabilitySection,
    GuardSection,
    HttpSection,
    RowCodec,
    SchedulerSection,
    Strict,
    SyncConfig,
)
from ekko.store._validate import DEFAULT_MAX_ABS
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

__all__ = [  # the sections live in config_models / config_sections; read them from here too
    "AdmissionSection",
    "ClusterConfig",
    "ConfigError",
    "DurabilitySection",
    "EvictionSection",
    "GuardSection",
    "HttpSection",
    "ModelConfig",
    "NodeConfig",
    "RowCodec",
    "SchedulerSection",
    "SyncConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A cluster config that cannot run, with the field that is wrong."""


class ClusterTls(Strict):
    """TLS on every port of the cluster (README "TLS"): the CA every node's certificate is
    signed by; each node names its own files (``nodes[].tls``)."""

    ca: str


class NodeTls(Strict):
    """A node's certificate (signed by the cluster CA, issued to the node's name) and key."""

    cert: str
    key: str


class ClusterSection(Strict):
    name: str = "ekko"
    # Which cluster this config describes (``ekko cluster init`` draws one): every node's
    # data dir records it and refuses another's (``node.data_dir``). None: not checked.
    id: str | None = None
    secret_file: str = "cluster.secret"
    data_dir: str = "data"
    tls: ClusterTls | None = None
    # How many partitions the tables' shards are dealt to (``ekko.store.placement``); every
    # DC holds every partition (``config_partitions``). 1: every node holds every shard.
    partitions: int = Field(1, ge=1, le=4096)


class DcConfig(Strict):
    name: str
    training: bool = False
    wan_delay_ms: float = Field(0.0, ge=0)
    wan_mbit: float | None = Field(None, gt=0)
    upstream_dc: str | None = None  # relay tree: pull from this DC's leader instead


class NodeConfig(Strict):
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
    # The partitions this node holds (None: all of them); its store takes rows of their
    # shards only.
    partitions: tuple[int, ...] | None = None
    # The node's store refuses a table or a write that would take it past this (MB of rows
    # and index, ``ekko.store.budget``), naming the table and partition. None: no limit.
    max_memory_mb: float | None = Field(None, gt=0, lt=1e12)


class TableConfig(Strict):
    name: str
    dim: int = Field(gt=0)
    shards: int = Field(16, gt=0, le=4096)
    initial_rows: int = Field(1024, gt=0)
    max_abs: float = Field(DEFAULT_MAX_ABS, gt=0, lt=1e30)  # |value| a source write may hold

    def spec(self) -> TableSpec:
        return TableSpec(self.name, self.dim, self.shards)


Role = Literal["source", "leader", "follower", "checkpoint"]


class ClusterConfig(Strict):
    cluster: ClusterSection = ClusterSection()
    dcs: list[DcConfig]
    nodes: list[NodeConfig]
    tables: list[TableConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
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
        config_partitions.check(self)
        check_memory(self)
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
        """The source (of partition 0, when the cluster is partitioned: ``source_of``)."""
        return self.source_of(0)

    @property
    def partitioned(self) -> bool:
        return self.cluster.partitions > 1

    def placement(self) -> Placement:
        """Which partition holds each (table, shard)."""
        return Placement(self.cluster.partitions)

    def held(self, name: str) -> tuple[int, ...]:
        """The partitions node ``name`` holds, ascending."""
        return config_partitions.held(self, self.node(name))

    def source_of(self, partition: int) -> NodeConfig:
        """The origin of ``partition``'s versions (its training-DC holder listed first)."""
        return config_partitions.source_of(self, partition)

    @property
    def sources(self) -> list[NodeConfig]:
        """Every partition's source, once each, in config order."""
        names = {self.source_of(p).name for p in range(self.cluster.partitions)}
        return [n for n in self.nodes if n.name in names]

    def role(self, name: str) -> Role:
        """``source`` of its partitions, else ``leader`` when it is its DC's first holder
        of any of them (it pulls that one over the WAN), else ``follower``."""
        node = self.node(name)
        if node.refresh == "checkpoint":
            return "checkpoint"
        mine = self.held(name)
        if self.source_of(mine[0]).name == node.name:
            return "source"
        firsts = {config_partitions.holders(self, node.dc, p)[0].name for p in mine}
        return "leader" if node.name in firsts else "follower"

    def upstreams(self, name: str, partition: int | None = None) -> list[NodeConfig]:
        """Where ``name`` pulls ``partition`` from (None: its first), in failover order: DC
        holders of it ahead of ``name``, then the WAN."""
        node = self.node(name)
        if node.refresh == "checkpoint":
            return []
        p = self.held(name)[0] if partition is None else partition
        return config_partitions.upstreams(self, node, p)

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
