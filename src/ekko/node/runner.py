"""One node process: a ``NodeCore`` composed with its drivers, the sync port and HTTP.

The runner builds the node's parts, each handed its collaborators and the clock by its
constructor: the responder host answering pullers on the sync port, the admin/metrics HTTP
server, the models (``ModelHost``), the apply port (``ApplyFanout``) and the drivers, each a
supervised loop in a module of its own (``Upstream``, ``CheckpointRefresher``,
``Snapshotter``, ``ReleaseTimer``, ``GuardTicker``; guard messages through ``GuardLink``),
plus extra drivers an operator composes in (``run_node(..., drivers=...)``). It stops
cleanly on SIGINT/SIGTERM and prints one ``EKKO-READY`` line when it serves, so launchers
and tests await readiness instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from ekko.net.transport import Listener
from ekko.node.apply_port import ApplyFanout
from ekko.node.checkpoint import CheckpointRefresher
from ekko.node.config import ClusterConfig
from ekko.node.core import NodeCore
from ekko.node.dashboard import SeriesRecorder
from ekko.node.driver import Driver, DriverFactory
from ekko.node.guard_link import GuardLink
from ekko.node.guard_ticker import GuardTicker
from ekko.node.http_client import ClusterHttp
from ekko.node.http_server import EmbeddedServer, tcp_listener
from ekko.node.metrics import sync_port_metrics
from ekko.node.models import ModelHost, sharded_training_note
from ekko.node.parent_watch import ParentWatch, parent_pid
from ekko.node.recover import recover_source
from ekko.node.release_timer import ReleaseTimer
from ekko.node.replica_lag import LagProbe
from ekko.node.snapshotter import Snapshotter
from ekko.node.supervisor import Supervisor
from ekko.node.sync_host import ResponderHost, pace_rate
from ekko.node.sync_port import SyncPort
from ekko.node.tombstone_purge import TombstonePurge
from ekko.node.upstream import Upstream, upstream_groups
from ekko.node.web import NodeWeb
from ekko.protocol.recovery import RecoveryResult
from ekko.store import Store
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)

READY_MARK = "EKKO-READY"


class PortUnavailable(RuntimeError):
    """This node cannot listen on a port its config names (another process holds it, or the
    host is not this machine's): an operator's mistake to name in one line, not a crash."""

    def __init__(self, node: str, kind: str, host: str, port: int, exc: OSError) -> None:
        super().__init__(
            f"node {node}: cannot listen on its {kind} port {port} ({host}): "
            f"{exc.strerror or exc}; another process holds it, or change {kind}_port in the "
            "config"
        )


class NodeRunner:
    """Runs one node of ``config`` until stopped: composes its parts, starts its drivers
    under one ``Supervisor`` and serves."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        base_dir: Path,
        *,
        drivers: Sequence[DriverFactory] = (),
        rebuild: bool = False,
        fresh: bool = False,
        supervisor: Supervisor | None = None,
        clock: LoopClock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        served = lambda: self.models.predictions()  # noqa: E731 (the models come next)
        self.core = core = NodeCore(
            config, name, base_dir, rebuild=rebuild, fresh=fresh, on_written=self.notify_written,
            clock=clock, served=served,
        )  # fmt: skip
        self.secret = config.path(config.cluster.secret_file, base_dir).read_bytes().strip()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self.sync = ResponderHost(core.responder, self._pace_for, core.report_traffic, clock)
        self.tls = config.tls_files(base_dir, name)
        self.port = SyncPort(config, name, self.secret, self.tls)
        self.http = ClusterHttp(config, base_dir)
        self.guard_link: GuardLink | None = None
        if config.guard.enabled and config.models:
            self.guard_link = GuardLink(self.http, self.secret, self.supervisor, clock=clock)
        send = self.guard_link.send if self.guard_link is not None else None
        self.models = ModelHost(
            core, send, clock, http=self.http, secret=self.secret, link=self.guard_link
        )
        self.apply = ApplyFanout(core.latency, [self.models.follow], self.notify_written)
        self.upstream_ready = asyncio.Event()
        self._links_up: list[asyncio.Event] = []  # partitioned: one per upstream link
        self.refresher: CheckpointRefresher | None = None
        self.lag_probe: LagProbe | None = None
        self.drivers = self._drivers()
        self._extra_factories = list(drivers)
        self.extra: list[Driver] = []  # built once the source holds its store (recovered)
        self._listener: Listener | None = None
        self.recovery: RecoveryResult | None = None

    def _drivers(self) -> list[Driver]:
        """The node's own background loops, by its role and config."""
        core, cfg, clock = self.core, self.config, self.clock
        out: list[Driver] = []
        if self.guard_link is not None:
            out.append(GuardTicker(self.models, cfg.guard.interval_s, clock))
        if core.is_source:
            if cfg.sync.snapshot_interval_s > 0:
                out.append(Snapshotter(core, cfg.sync.snapshot_interval_s, clock))
            if cfg.scheduler.enabled and cfg.scheduler.defer:
                out.append(ReleaseTimer(core.port, clock))
            if cfg.sync.tombstone_purge_s > 0:
                out.append(
                    TombstonePurge(core, cfg.sync.tombstone_purge_s, self.notify_written, clock)
                )
        elif core.role == "checkpoint":
            wan = self.port.wan(cfg.source.name)
            self.refresher = CheckpointRefresher(
                core, self.http, self.secret, wan, self._loaded, clock
            )
            out.append(self.refresher)
        elif not cfg.partitioned:
            up = Upstream(core, self.port, self.apply, self._rebuilt, self.upstream_ready, clock)
            out.append(up)
        else:  # a link per group of partitions sharing upstreams; ready once all are up
            for parts in upstream_groups(cfg, core.name):
                connected = asyncio.Event()
                self._links_up.append(connected)
                out.append(Upstream(core, self.port, self.apply, self._rebuilt, connected,
                                    clock, partitions=parts))  # fmt: skip
        if not core.is_source:
            self.lag_probe = LagProbe(core, self.http, self.secret, clock=clock)
            out.append(self.lag_probe)
        parent = parent_pid(os.environ)
        if parent is not None:
            out.append(ParentWatch(parent, self.stop, clock))
        probe = self.lag_probe
        lag = (lambda: {n: vars(x) for n, x in probe.lag().items()}) if probe else None
        self.series = SeriesRecorder(core, self.http, self.secret, self.models.guard_view, lag,
                                     clock=clock)  # fmt: skip
        out.append(self.series)
        return out

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        core, node, sup = self.core, self.core.node, self.supervisor
        listener = lambda: self._listener and self._listener.stats  # noqa: E731
        server = NodeWeb(
            core, self.models, sup, self.secret,
            routes=[
                *(self.refresher.routes() if self.refresher is not None else []),
                *self.series.routes(),
            ],
            collectors=[
                sync_port_metrics(core.name, listener),
                *([self.lag_probe.metrics] if self.lag_probe is not None else []),
            ],
            status=self._status_extra,
            started=self.ready.is_set, stopping=self._stop.is_set,
            tls=self.tls.server_context(client_certs=False) if self.tls else None,
        ).server()  # fmt: skip
        # Bound before serving: the port accepts (into the backlog) from the first moment.
        try:
            admin_sock = tcp_listener(node.host, node.admin_port)
        except OSError as exc:
            raise PortUnavailable(core.name, "admin", node.host, node.admin_port, exc) from exc
        sup.start("admin_server", lambda: server.serve(sockets=[admin_sock]))
        if core.is_source:
            # Writes answer 503 until the source holds everything it acknowledged.
            self.recovery = await recover_source(core, self.port.dial)
        try:
            self._listener = await self.port.listen(self.sync.serve_session)
        except OSError as exc:
            raise PortUnavailable(core.name, "sync", node.host, node.sync_port, exc) from exc
        if core.is_source and self.trains_in_node():
            self.models.start_training(loop)
        elif core.is_source and self.config.models:
            log.warning("node %s: %s", core.name, self.sharded_training_note())
        if core.role in ("source", "checkpoint"):
            self.upstream_ready.set()
        for factory in self._extra_factories:
            driver = factory(core)
            if driver is not None:
                self.extra.append(driver)
        for driver in [*self.drivers, *self.extra]:
            sup.start(driver.name, driver.run)
        if self._links_up:
            sup.start("links_up", self._all_links_up)
        await self._wait_either(self.upstream_ready)
        if not self._stop.is_set():
            self.ready.set()
            print(f"{READY_MARK} {json.dumps(self._ready_doc())}", flush=True)
            log.info("node %s ready (%s in %s)", core.name, core.role, core.dc)
        await self._stop.wait()
        await self._shutdown(server)

    def trains_in_node(self) -> bool:
        """Whether this source trains the cluster's ``[[models]]`` itself. Not on a
        partitioned cluster: one in-node trainer per source would learn from its share of
        the stream and write every partition's rows to its own source, which refuses the
        other partitions' (421). There the models are served as configured and trained by
        the sharded trainer (``sharded_training_note`` says what to run)."""
        return not self.config.partitioned

    def sharded_training_note(self) -> str:
        """Why this partitioned source runs no trainer, and what trains its models."""
        return sharded_training_note(self.config)

    def _ready_doc(self) -> dict:
        n = self.core.node
        return {
            "node": n.name,
            "role": self.core.role,
            "dc": n.dc,
            "sync_port": self._listener.port if self._listener else n.sync_port,
            "admin_port": n.admin_port,
        }

    async def _all_links_up(self) -> None:
        """Ready once every partition's link has connected."""
        for connected in self._links_up:
            await connected.wait()
        self.upstream_ready.set()
        await asyncio.Event().wait()  # a supervised task runs until the node stops

    async def _wait_either(self, event: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())]
        _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()

    async def _shutdown(self, server: EmbeddedServer) -> None:
        log.info("node %s stopping", self.core.name)
        for driver in self.extra:  # an operator's writer stops before the last snapshot
            await driver.stop()
            await self.supervisor.cancel(driver.name)
        if self.models.trainers:
            await asyncio.to_thread(self.models.stop)
            await asyncio.sleep(0.05)  # let the trainers' last writes land on this loop
        core = self.core
        if core.is_source:
            held = core.port.flush(self.clock.ns())
            if held:
                log.info("wrote %d held (deferred) rows before stopping", held)
            core.save_snapshot()
            core.close()
            log.info("source snapshot saved to %s", core.snapshot_path)
        if self._listener is not None:
            self._listener.close()
        await self.sync.close()
        server.should_exit = True
        if self.guard_link is not None:
            await self.guard_link.close()
        await self.supervisor.stop(keep=("admin_server",))
        await self.models.close()

    def _status_extra(self) -> dict:
        """``/v1/status``'s keys from the runner (``ready`` and ``down``: ``NodeWeb``'s)."""
        doc: dict = {"tasks": self.supervisor.status()}
        if self.core.role not in ("source", "checkpoint"):
            doc["catch_up"] = self.apply.status()
        if self.core.is_source and self.config.models and not self.trains_in_node():
            doc["in_node_training"] = self.sharded_training_note()
        for driver in [*self.drivers, *self.extra]:
            doc.update(driver.status())
        doc.update(self.models.status())
        return doc

    # -- what the drivers report ----------------------------------------------------------

    def notify_written(self) -> None:
        """The store moved (a local write or applied rows): wake parked pulls."""
        self.sync.notify_written()

    def _pace_for(self, peer: str) -> float | None:
        """A WAN peer's session is paced at the link's bandwidth when the config says so.
        Never the source's: it pulls from a replica only to recover, and waits for that."""
        if not self.config.sync.pace_wan or peer in {n.name for n in self.config.sources}:
            return None
        return pace_rate(self.port.wan(peer))

    def _rebuilt(self) -> None:
        """The puller replaced the store's tables with the upstream lineage's: serve them."""
        self.models.replace_store(self.core.store)
        self.notify_written()

    def _loaded(self, store: Store) -> None:
        """A checkpoint replica loaded a full copy: answer and serve from it."""
        self.sync.use(self.core.responder)
        self.models.replace_store(store)
        self.notify_written()
