"""The models a node hosts: inference services on ``serve = true`` nodes, trainers at the source.

``ModelHost`` builds both from the cluster's ``[[models]]`` and hands the runner their HTTP
routes, Prometheus collectors and status. Trainers run in worker threads; their writes reach
the store through ``LoopSink``, which replays them on the node's event loop, the one thread
that touches the store.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ekko.node.core import NodeCore
from ekko.protocol.messages import TableSpec
from ekko.store import Store
from ekko.train.sink import Sink

log = logging.getLogger(__name__)


class LoopSink:
    """A ``Sink`` callable from any thread that performs the writes on an event loop.

    Why: ``Table`` allows no write concurrent with a lookup or an apply, and the node's loop
    does both; handing the writes over keeps the store single-threaded and in the trainer's
    order. Writes queue under a lock and one loop callback drains them all, so a publish of
    26 tables costs one wake-up of the loop, not 26.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: Sink,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.sink = sink
        self.on_drained = on_drained
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., None], tuple]] = []

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._pending.append((fn, args))
            if len(self._pending) > 1:
                return  # a drain is scheduled already
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the node is gone
            log.warning("event loop closed; trainer writes to the store were dropped")

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn, args in pending:
            fn(*args)
        if self.on_drained is not None:
            self.on_drained()

    def create_table(self, spec: TableSpec) -> None:
        self._call(self.sink.create_table, spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self._call(self.sink.write, table, keys, values)


class ModelHost:
    """Inference services and online trainers of one node, by model name.

    Why one object: the runner needs one place to get routes, metrics and status from, and
    to swap the served store when a checkpoint-refreshed replica loads a new copy.
    """

    def __init__(self, core: NodeCore, on_write: Callable[[], None]) -> None:
        self.core = core
        models = core.config.models
        self.services: dict = {}
        self.trainers: dict = {}
        if models and core.node.serve:
            from ekko.serve import build_services

            self.services = build_services(core.store, list(models))
        self._on_write = on_write

    def start_training(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the source: one trainer per model, tables created and dense tensors published
        before the node reports ready."""
        if not self.core.is_source or not self.core.config.models:
            return
        from ekko.serve import StoreSink
        from ekko.train.service import TrainingService
        from ekko.train.trainer import TrainerConfig

        # The trainer thread holds the GIL between torch calls; a short switch interval keeps
        # the event loop (sync answers, HTTP) from waiting the default 5 ms behind it.
        sys.setswitchinterval(0.0005)
        store_sink = StoreSink(self.core.store)
        for m in self.core.config.models:
            svc = TrainingService(
                m.name,
                m.dlrm(),
                store_sink,
                trainer=TrainerConfig(m.optimizer, m.sparse_lr, m.dense_lr),
                embedding_shards=m.embedding_shards,
                dense_interval_s=m.dense_interval_s,
            )
            svc.bootstrap()  # on the loop thread, straight into the store
            self._on_write()
            svc.publisher.sink = LoopSink(loop, store_sink, self._on_write)
            svc.start()
            self.trainers[m.name] = svc
            log.info("trainer of model %s started", m.name)

    def stop(self) -> None:
        for svc in self.trainers.values():
            svc.stop()

    def routes(self) -> list:
        routes: list = []
        if self.services:
            from ekko.serve import serve_routes

            routes += serve_routes(self.services)
        if self.trainers or (self.core.is_source and self.core.config.models):
            from ekko.train.routes import train_routes

            routes += train_routes(self.trainers)
        return routes

    def collectors(self) -> list:
        out: list = []
        if self.services:
            from ekko.serve import serve_metrics

            out.append(serve_metrics(self.services))
        if self.core.is_source and self.core.config.models:
            from ekko.train.routes import train_metrics

            out.append(train_metrics(self.trainers))
        return out

    def status(self) -> dict:
        doc: dict = {}
        if self.services:
            doc["serving"] = sorted(self.services)
        if self.trainers:
            doc["training"] = {n: t.statistics().events for n, t in self.trainers.items()}
        return doc

    def replace_store(self, store: Store) -> None:
        """Serve from ``store`` from now on (a checkpoint replica loaded a new full copy)."""
        for svc in self.services.values():
            svc.replace_store(store)
