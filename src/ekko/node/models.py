"""The models a node hosts: inference services on ``serve = true`` nodes, trainers at the source.

``ModelHost`` builds both from the cluster's ``[[models]]`` and hands the runner their HTTP
routes, Prometheus collectors and status. Trainers run in worker threads; their writes reach
the source's write port through ``LoopSink``, which replays them on the node's event loop, the
one thread that touches the store.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.node.core import NodeCore
from ekko.node.http_client import ClusterHttp
from ekko.node.scatter_rows import scatter_rows
from ekko.protocol.ready import Applied
from ekko.schedule.write_port import WritePort
from ekko.store import Store
from ekko.store.clock import SYSTEM_CLOCK, Clock
from ekko.store.spec import TableSpec

if TYPE_CHECKING:
    from ekko.node.config import ClusterConfig
    from ekko.serve.scatter import PartitionedLookup

log = logging.getLogger(__name__)


class LoopSink:
    """A ``Sink`` callable from any thread that performs the writes on an event loop.

    Why: ``Table`` allows no write concurrent with a lookup or an apply, and the node's loop
    does both; handing the writes over keeps the store single-threaded and in the trainer's
    order. Writes queue under a lock and one loop callback drains them all as one batch of
    the port, so a publish of 26 tables costs one wake-up of the loop and of parked pulls,
    not 26. Called on the loop's own thread (a trainer's bootstrap), it writes at once,
    after whatever was queued, so the trainer holds one sink from its construction on.

    Construct it on the loop's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, port: WritePort) -> None:
        self.loop = loop
        self.port = port
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., None], tuple]] = []

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            with self.port.batch():
                self._drain()
                fn(*args)
            return
        with self._lock:
            self._pending.append((fn, args))
            if len(self._pending) > 1:
                return  # a drain is scheduled already
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the node is gone
            log.warning("event loop closed; trainer writes to the store were dropped")

    def drain(self) -> None:
        """Perform the queued writes now (on the loop's thread: the caller's)."""
        self._drain()

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        with self.port.batch():
            for fn, args in pending:
                fn(*args)

    def create_table(self, spec: TableSpec) -> None:
        self._call(self.port.create_table, spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self._call(self.port.write, table, keys, values)

    def delete(self, table: str, keys: np.ndarray) -> None:
        """A dynamic table's evictions: deletes through the port, in order with the writes."""
        self._call(self.port.delete, table, keys)


class ModelHost:
    """Inference services and online trainers of one node, by model name.

    Why one object: the runner needs one place to get routes, metrics and status from, and
    to swap the served store when a checkpoint-refreshed replica loads a new copy.
    """

    def __init__(
        self,
        core: NodeCore,
        send: Callable[[str, str, dict], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        http: ClusterHttp | None = None,
        secret: bytes | None = None,
        link: Any = None,
    ) -> None:
        """``send(target, path, body)`` posts to another node's admin API (the node's
        ``GuardLink``); ``clock`` is the guards' and the baseline's. ``http`` and
        ``secret``: how a serving node of a partitioned cluster reaches the holders of the
        partitions it lacks (required then). ``link``: the node's ``GuardLink`` (a
        partitioned cluster's sources command each other's restores through it)."""
        self.core = core
        self.clock = clock
        self.link = link
        models = core.config.models
        self.services: dict = {}
        self.trainers: dict = {}
        self.replica_guards: dict = {}
        self.source_guards: dict = {}
        self.lagged = None
        self._send = send or (lambda target, path, body: None)
        self.guard_log = None
        self.rows: PartitionedLookup | None = None
        self.holders = None  # the partitioned guard's parts here (ekko.node.guard_holders)
        guard = core.config.guard
        self.guard_sources = None  # a partitioned cluster's sources: node/guard_sources.py
        if guard.enabled and models and core.is_source and core.config.partitioned:
            from ekko.node.guard_sources import GuardSources

            self.guard_sources = GuardSources(core, link, clock, self._open_log)
            self.source_guards.update(self.guard_sources.guards)
        if models and core.node.serve:
            import torch

            from ekko.serve import build_services

            # One intra-op thread: a node shares the machine with other nodes, and a
            # predict batch is too small to gain from more; oversubscribed cores stall the
            # event loop (and with it the sync) far more than they speed up the forward.
            torch.set_num_threads(1)

            if core.config.partitioned:
                if http is None or secret is None:
                    raise ValueError(
                        f"node {core.name} serves a partitioned cluster's models: ModelHost "
                        "needs http and secret to reach the partitions' holders"
                    )
                self.rows = scatter_rows(core, http, secret)
            served = [m.served() for m in models]
            self.services = build_services(core.store, served, rows=self.rows)
            if guard.enabled and core.role != "checkpoint" and self.rows is None:
                self._build_replica_guards()
        if core.config.partitioned:
            from ekko.node.guard_holders import GuardHolders

            self.holders = GuardHolders.build(self, http, secret)

    def predictions(self) -> dict[str, int]:
        """Predictions served so far per model (cumulative), for the traffic report."""
        return {name: svc.statistics().rows_predicted for name, svc in self.services.items()}

    def _open_log(self):
        from ekko.guard.log import TransitionLog

        if self.guard_log is None:
            self.core.data_dir.mkdir(parents=True, exist_ok=True)
            self.guard_log = TransitionLog(self.core.data_dir / "guard.log")
        return self.guard_log

    def _build_replica_guards(self) -> None:
        from ekko.guard.baseline import LaggedStore
        from ekko.guard.replica_guard import ReplicaGuard

        cfg = self.core.config
        g = cfg.guard
        self.lagged = LaggedStore(max(m.baseline_lag_s for m in cfg.models))
        source = cfg.source.name
        for name, svc in self.services.items():

            def send(path: str, body: dict, _m: str = name) -> None:
                self._send(source, f"/v1/models/{_m}/{path}", body)

            self.replica_guards[name] = ReplicaGuard.build(
                self.core.name, svc, self.lagged, g.detector(), g.probation,
                self._open_log(), send, g.shadow_share, g.recovery_auc_tolerance, self.clock,
            )  # fmt: skip

    def follow(self, applied: Applied) -> None:
        """A pulled response was applied to the online store (the apply port): queue its
        rows for the baseline."""
        if self.lagged is not None:
            self.lagged.offer(applied, self.clock.mono())
        for guard in self.replica_guards.values():
            guard.poll()
        if self.holders is not None:
            self.holders.poll()

    def baseline_store(self) -> Store | None:
        """The store baseline lookups read here (the guard's lagged store), or None."""
        return self.lagged.store if self.lagged is not None else None

    def advance_baseline(self, now_mono: float) -> None:
        """Apply the baseline's queued rows that came of age."""
        if self.lagged is not None:
            self.lagged.advance(now_mono)

    def guard_tick(self, now_mono: float, now_wall: float) -> None:
        for guard in self.replica_guards.values():
            guard.tick(now_mono)
        for guard in self.source_guards.values():
            guard.tick(now_wall)
        if self.holders is not None:
            self.holders.tick()

    def start_training(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the source, once it holds everything it acknowledged (after recovery): one
        trainer per model, resumed from the model's rows in the store, or with its tables
        created and seed dense tensors published when the store holds none, before the node
        reports ready."""
        if not self.core.is_source or not self.core.config.models:
            return
        if self.core.not_ready is not None:
            raise RuntimeError(
                f"trainers start once the source is ready, not while {self.core.not_ready}: "
                f"they resume from the store"
            )
        from ekko.train.service import TrainingService
        from ekko.train.trainer import TrainerConfig

        # The trainer thread holds the GIL between torch calls; a short switch interval keeps
        # the event loop (sync answers, HTTP) from waiting the default 5 ms behind it.
        sys.setswitchinterval(0.0005)
        port = self.core.port
        cfg = self.core.config
        for m in cfg.models:
            loop_sink = LoopSink(loop, port)
            svc = TrainingService(
                m.name,
                m.dlrm(),
                loop_sink,
                trainer=TrainerConfig(m.optimizer, m.sparse_lr, m.dense_lr),
                embedding_shards=m.embedding_shards,
                dense_interval_s=m.dense_interval_s,
            )
            with port.batch():  # on the loop thread: through loop_sink straight to the store
                svc.bootstrap(port.stored)
            pub = svc.publisher
            names = [*pub.table_names, *pub.dense_table_names]
            for name in names:
                self.core.store.table(name).max_abs = m.max_abs
            self.core.register_model_tables(m.name, names)
            if cfg.guard.enabled:
                self._source_guard(m.name, names, svc, loop_sink.drain)
            svc.start()
            self.trainers[m.name] = svc
            log.info("trainer of model %s started", m.name)

    def _source_guard(
        self, model: str, tables: list[str], trainer, flush_writes: Callable[[], None]
    ) -> None:
        from ekko.guard.source_guard import SourceGuard

        cfg = self.core.config
        g = cfg.guard
        serving = [n.name for n in cfg.nodes if n.serve and n.refresh == "sync"]

        def broadcast(path: str, body: dict) -> None:
            for node in serving:
                self._send(node, f"/v1/models/{model}/{path}", body)

        self.source_guards[model] = SourceGuard(
            model, self.core.port, tables, trainer, serving, broadcast, self._open_log(),
            margin_s=g.rollback_margin_s, window_s=g.preimage_window_s,
            probation=g.probation, quarantine_s=g.quarantine_s,
            report_max_age_s=max(3.0, 5 * g.interval_s), clock=self.clock,
            flush_writes=flush_writes,
        )  # fmt: skip

    def stop(self) -> None:
        for svc in self.trainers.values():
            svc.stop()

    async def close(self) -> None:
        """Close the scatter's lookup streams to other partitions' holders (a serving node
        of a partitioned cluster): left open, their reader tasks and sockets outlived the
        node on its loop."""
        if self.rows is not None:
            await self.rows.close()
        if self.holders is not None:
            await self.holders.close()

    def down(self) -> dict[str, str]:
        """Trainers whose worker thread died, as ``trainer/{model}`` -> the exception: what
        ``/ready`` names beside the node's supervised tasks."""
        return {
            f"trainer/{name}": svc.failed
            for name, svc in self.trainers.items()
            if svc.failed is not None
        }

    def routes(
        self,
        max_body: int,
        *,
        version: str = "0+unknown",
        node_ready: Callable[[], str | None] = lambda: None,
    ) -> list:
        """The models' routes; predict, infer, feedback and train bodies up to ``max_body``
        bytes. ``version`` and ``node_ready()`` (why the node is not ready, or None) are
        what the Open Inference Protocol's server metadata and readiness report."""
        routes: list = []
        if self.services:
            from ekko.serve import oip_routes, serve_routes

            routes += serve_routes(self.services, max_body=max_body)
            routes += oip_routes(
                self.services, version=version, node_ready=node_ready, max_body=max_body
            )
        if self.trainers or (self.core.is_source and self.core.config.models):
            from ekko.train.routes import train_routes

            routes += train_routes(self.trainers, self._trainer_pending, max_body)
        if self.core.config.guard.enabled and self.core.config.models:
            from ekko.guard.routes import replica_guard_routes, source_guard_routes

            if self.guard_sources is not None:
                routes += self.guard_sources.routes()
            elif self.core.is_source:
                routes += source_guard_routes(self.source_guards)
            elif self.holders is not None:
                routes += self.holders.routes(self.replica_guards)
            elif self.replica_guards:
                routes += replica_guard_routes(self.replica_guards)
        return routes

    def _trainer_pending(self, model: str) -> tuple[str, int] | None:
        """Why a configured model's trainer is not running, with the status the train route
        answers (rather than 404): 503 while the source recovers, 409 on a partitioned
        cluster, whose sources never train in the node; None: it runs."""
        if model in self.trainers or model not in {m.name for m in self.core.config.models}:
            return None
        if self.core.config.partitioned:
            return sharded_training_note(self.core.config), 409
        return self.core.not_ready or "starting", 503

    def collectors(self) -> list:
        out: list = []
        if self.services:
            from ekko.node.model_metrics import serve_metrics

            out.append(serve_metrics(self.services))
        if self.rows is not None:
            from ekko.node.metrics import scatter_metrics

            out.append(scatter_metrics(self.core.name, self.rows.statistics, self.rows.coalesced))
        if self.core.is_source and self.core.config.models:
            from ekko.node.model_metrics import train_metrics

            out.append(train_metrics(self.trainers))
        if self.core.config.guard.enabled and self.core.config.models:
            from ekko.node.model_metrics import guard_metrics

            out.append(guard_metrics(self.replica_guards, self.source_guards))
        if self.holders is not None:
            out.append(self.holders.collector())
        return out

    def status(self) -> dict:
        doc: dict = {}
        if self.services:
            doc["serving"] = sorted(self.services)
        if self.trainers:
            doc["training"] = {n: t.statistics().events for n, t in self.trainers.items()}
        guard = self.guard_view()
        if guard:
            doc["guard"] = guard
        return doc

    def guard_view(self) -> dict[str, dict]:
        """Each guarded model's health state here and, at the source, its last incidents
        (when, why, automatic or not); the details are ``/v1/models/{m}/health``'s."""
        out: dict[str, dict] = self.holders.view() if self.holders is not None else {}
        for m, g in {**self.replica_guards, **self.source_guards}.items():
            incidents = [
                {k: i.get(k) for k in ("at", "why", "automatic", "epoch")}
                for i in getattr(g, "incidents", [])[-5:]
            ]
            out[m] = {"state": str(g.health.state), "incidents": incidents}
        return out

    def replace_store(self, store: Store) -> None:
        """Serve from ``store`` from now on (a checkpoint replica loaded a new full copy)."""
        for svc in self.services.values():
            svc.replace_store(store)


def sharded_training_note(config: ClusterConfig) -> str:
    """Why a partitioned cluster's sources run no trainer, and what trains its models."""
    parts = config.cluster.partitions
    models = ", ".join(m.name for m in config.models)
    return (
        f"models {models} are not trained in-node: the cluster has {parts} partitions and "
        "an in-node trainer writes every partition's rows to its own source; train them "
        "with the sharded trainer (ekko.train.sharded.ShardedRunSpec(placement="
        "config.placement(), partition_sink=ekko.train.sharded_publish.PartitionSources("
        "config path, {p: config.source_of(p).name}))), rank r publishing partitions "
        "p % W == r to their sources; ekko demo --partitions 2 runs one)"
    )
