"""One node process: a ``NodeCore`` driven by asyncio sockets, timers, signals and HTTP.

The runner owns every piece of I/O: the sync listener (answering pullers through the
responder), the upstream link (a puller with failover along the configured candidates),
the admin/metrics HTTP server, periodic snapshots at the source, and a clean stop on
SIGINT/SIGTERM. It prints one ``EKKO-READY`` line when it serves, so launchers and tests
await readiness instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.net.errors import TransportError
from ekko.net.transport import Connection, Listener, connect, serve
from ekko.net.wan import WanLine
from ekko.node.access import AccessPolicy
from ekko.node.admin import admin_app, admin_routes
from ekko.node.apply_port import ApplyFanout
from ekko.node.config import ClusterConfig, NodeConfig
from ekko.node.core import NodeCore
from ekko.node.http_server import EmbeddedServer, http_server, tcp_listener
from ekko.node.metrics import node_registry, sync_port_metrics, task_metrics
from ekko.node.models import ModelHost
from ekko.node.recover import recover_source
from ekko.node.signed_requests import auth_headers, host_of, needs_resign, signed_json
from ekko.node.supervisor import Supervisor
from ekko.node.sync_host import SYNC_SCHEMA, ResponderHost, pace_rate, run_pull_link
from ekko.node.synthetic import SyntheticWriter, SyntheticWriterConfig
from ekko.protocol.messages import PullResponse
from ekko.protocol.puller import Puller
from ekko.protocol.recovery import RecoveryResult
from ekko.store import SnapshotError, WalError

log = logging.getLogger(__name__)

READY_MARK = "EKKO-READY"


class NodeRunner:
    """Runs one node of ``config`` until stopped."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        base_dir: Path,
        *,
        writer: SyntheticWriterConfig | None = None,
        rebuild: bool = False,
    ) -> None:
        self.config = config
        self.core = NodeCore(
            config, name, base_dir, rebuild=rebuild, on_written=self.notify_written
        )
        secret_path = config.path(config.cluster.secret_file, base_dir)
        self.secret = secret_path.read_bytes().strip()
        self.writer_config = writer
        self.writer: SyntheticWriter | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.sync = ResponderHost(self.core.responder, self._pace_for, self.core.report_traffic)
        self.supervisor = Supervisor()
        self._listener: Listener | None = None
        self.extra_metrics: list = []
        self.extra_status: Callable[[], dict] | None = None
        self.extra_routes: list = []
        self.models = ModelHost(self.core, self._post)
        self.apply = ApplyFanout(self.core.latency, [self.models.follow], self.notify_written)
        self._http: httpx.AsyncClient | None = None
        self._copy_now = asyncio.Event()
        self.recovery: RecoveryResult | None = None
        self._lineage = self.core.store.lineage
        self._copy_started = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        node = self.core.node
        listener = lambda: self._listener and self._listener.stats  # noqa: E731
        collectors = [*self.extra_metrics, *self.models.collectors(), task_metrics(self.supervisor)]
        collectors.append(sync_port_metrics(self.core.name, listener))
        registry = node_registry(self.core, collectors)
        web = self.config.http
        routes = admin_routes(self.core, registry, self._status_extra, web.max_body_bytes)
        routes.append(Route("/ready", self._ready_route))
        if self.core.role == "checkpoint":
            routes.append(Route("/v1/checkpoint/refresh", self._refresh_now, methods=["POST"]))
        policy = AccessPolicy(serve_open=web.serve_open)
        advertised = frozenset({f"{node.host}:{node.admin_port}"})
        all_routes = [*self.extra_routes, *self.models.routes(web.max_body_bytes), *routes]
        app = admin_app(all_routes, self.secret, policy, names=advertised)
        server = http_server(
            app,
            header_timeout_s=web.header_timeout_s,
            idle_timeout_s=web.idle_timeout_s,
            max_connections=web.max_connections,
        )
        # Bound before serving: the port accepts (into the backlog) from the first moment.
        admin_sock = tcp_listener(node.host, node.admin_port)
        sup = self.supervisor
        sup.start("admin_server", lambda: server.serve(sockets=[admin_sock]))
        if self.core.is_source:
            # Writes answer 503 until the source holds everything it acknowledged.
            await self._recover()
        self._listener = await serve(
            node.host,
            node.sync_port,
            node=self.core.name,
            secret=self.secret,
            schema=SYNC_SCHEMA,
            on_connection=self.sync.serve_session,
            wan_for=lambda peer: self._wan(peer),
            compress=self.config.sync.compress,
        )
        upstream_ready = asyncio.Event()
        if self.config.guard.enabled and self.config.models:
            self._http = httpx.AsyncClient(timeout=5.0)
            sup.start("guard", self._guard_loop)
        if self.core.is_source:
            upstream_ready.set()
            self.models.start_training(loop)
            if self.config.sync.snapshot_interval_s > 0:
                sup.start("snapshots", self._snapshots)
            if self.config.scheduler.enabled and self.config.scheduler.defer:
                sup.start("release_held", self._release_held)
        elif self.core.role == "checkpoint":
            upstream_ready.set()
            sup.start("checkpoint_copies", self._checkpoint_copies)
        else:
            sup.start("upstream", lambda: self._upstream(upstream_ready))
        if self.writer_config is not None and self.core.is_source:
            dims = {n: t.dim for n, t in self.core.store.tables.items()}
            self.writer = SyntheticWriter(
                self.writer_config, self.core.write, dims, self.notify_written
            )
            self.writer.start()
        await self._wait_either(upstream_ready)
        if not self._stop.is_set():
            self.ready.set()
            print(f"{READY_MARK} {json.dumps(self._ready_doc())}", flush=True)
            log.info("node %s ready (%s in %s)", self.core.name, self.core.role, self.core.dc)
        await self._stop.wait()
        await self._shutdown(server)

    def _ready_doc(self) -> dict:
        n = self.core.node
        return {
            "node": n.name,
            "role": self.core.role,
            "dc": n.dc,
            "sync_port": self._listener.port if self._listener else n.sync_port,
            "admin_port": n.admin_port,
        }

    async def _wait_either(self, event: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())]
        _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()

    async def _shutdown(self, server: EmbeddedServer) -> None:
        log.info("node %s stopping", self.core.name)
        if self.writer is not None:
            await self.writer.stop()
        if self.models.trainers:
            await asyncio.to_thread(self.models.stop)
            await asyncio.sleep(0.05)  # let the trainers' last writes land on this loop
        if self.core.is_source:
            held = self.core.port.flush(time.time_ns())
            if held:
                log.info("wrote %d held (deferred) rows before stopping", held)
            self.core.save_snapshot()
            self.core.close()
            log.info("source snapshot saved to %s", self.core.snapshot_path)
        if self._listener is not None:
            self._listener.close()
        await self.sync.close()
        server.should_exit = True
        if self._http is not None:
            await self._http.aclose()
        await self.supervisor.stop(keep=("admin_server",))

    def _status_extra(self) -> dict:
        doc: dict = {"ready": self.ready.is_set(), "tasks": self.supervisor.status()}
        if self.writer is not None:
            doc["writer_rows"] = self.writer.rows_written
        doc.update(self.models.status())
        if self.extra_status is not None:
            doc.update(self.extra_status())
        return doc

    async def _ready_route(self, request: Request) -> Response:
        """200 once the node serves and every background task runs; 503 naming what is not
        (a supervised task, or a model's trainer thread: ``trainer/{model}``)."""
        down = {**self.supervisor.down(), **self.models.down(), **self.core.down()}
        ok = self.ready.is_set() and not down and not self._stop.is_set()
        doc = {"ready": ok, "node": self.core.name, "down": down}
        if not self.ready.is_set():
            doc["why"] = self.core.not_ready or "starting"
        return JSONResponse(doc, status_code=200 if ok else 503)

    def _wan(self, peer: str):
        try:
            return self.config.wan(self.core.name, peer)
        except ValueError:
            return None

    # -- answering pullers ----------------------------------------------------------------

    def notify_written(self) -> None:
        """The store moved (a local write or applied rows): wake parked pulls."""
        self.sync.notify_written()

    def _pace_for(self, peer: str) -> float | None:
        """A WAN peer's session is paced at the link's bandwidth when the config says so.
        Never the source's: it pulls from a replica only to recover, and waits for that."""
        if not self.config.sync.pace_wan or peer == self.config.source.name:
            return None
        return pace_rate(self._wan(peer))

    # -- pulling from upstream ----------------------------------------------------------

    async def _upstream(self, first_ready: asyncio.Event) -> None:
        candidates = self.config.upstreams(self.core.name)
        sync = self.config.sync
        while not self._stop.is_set():
            connected = False
            for i, peer in enumerate(candidates):
                conn = await self._try_connect(peer)
                if conn is None:
                    continue
                connected = True
                first_ready.set()
                try:
                    await self._pull_link(conn, peer, candidates[:i])
                finally:  # a bug raises on to the supervisor (logged, counted, restarted)
                    with contextlib.suppress(TransportError, OSError):
                        await conn.close()
                break
            if not connected:
                log.warning("no upstream of %s reachable; retrying", self.core.name)
                await asyncio.sleep(sync.failover_probe_s / 4)

    async def _try_connect(self, peer: NodeConfig) -> Connection | None:
        try:
            return await connect(
                peer.host,
                peer.sync_port,
                node=self.core.name,
                secret=self.secret,
                schema=SYNC_SCHEMA,
                wan=self._wan(peer.name),
                compress=self.config.sync.compress,
                timeout=self.config.sync.connect_timeout_s,
            )
        except (TimeoutError, OSError, TransportError) as exc:
            log.info("upstream %s unreachable: %s", peer.name, exc)
            return None

    async def _pull_link(
        self, conn: Connection, peer: NodeConfig, preferred: list[NodeConfig]
    ) -> None:
        """Pull from ``peer`` until the link breaks or a preferred upstream is back."""
        self.core.upstream_name = peer.name
        log.info("%s pulling from %s", self.core.name, peer.name)
        puller = Puller(
            self.core.store,
            self.core.puller_config(self._wan(peer.name)),
            latency=None,  # measured by the apply port
            traffic=self.core.traffic,
        )
        self.core.links.attach(peer.name, puller)

        rebuilds = [0]

        def on_response(msg: PullResponse) -> None:
            if puller.rebuilds != rebuilds[0]:
                rebuilds[0] = puller.rebuilds
                self._rebuilt()
            self._lineage = self.core.store.lineage  # adopted by an empty store, or rebuilt

        probe = self._probe(preferred) if preferred else None
        try:
            if await run_pull_link(conn, puller, on_response, probe, self.apply):
                log.info("%s returns to preferred upstream", self.core.name)
        finally:
            self.core.upstream_name = None
            self.core.links.detach(peer.name)

    def _rebuilt(self) -> None:
        """The puller replaced the store's tables with the upstream lineage's: serve them."""
        self.core.rebuilds += 1
        log.warning(
            "%s rebuilt its store from lineage %x (was %x): rows the source lacks are gone",
            self.core.name,
            self.core.store.lineage,
            self._lineage,
        )
        self.models.replace_store(self.core.store)
        self.notify_written()

    async def _probe(self, preferred: list[NodeConfig]) -> None:
        """Return once a preferred upstream accepts a connection again."""
        while True:
            await asyncio.sleep(self.config.sync.failover_probe_s)
            for peer in preferred:
                conn = await self._try_connect(peer)
                if conn is not None:
                    with contextlib.suppress(TransportError, OSError):
                        await conn.close()
                    return

    # -- guard ----------------------------------------------------------------------------

    async def _guard_loop(self) -> None:
        """Advance the baseline often; run the guard's evaluation every interval."""
        interval = self.config.guard.interval_s
        next_tick = time.monotonic() + interval
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            if self.models.lagged is not None:
                self.models.lagged.advance(now)
            if now >= next_tick:
                next_tick += interval
                self.models.guard_tick(now, time.time())

    def _post(self, target: str, path: str, body: dict) -> None:
        """Fire-and-forget POST to another node's admin API (guard messages), with retries."""
        if self._http is None:
            return
        node = self.config.node(target)
        url = f"http://{node.host}:{node.admin_port}{path}"
        self.supervisor.spawn("guard_message", self._post_retry(url, path, body))

    async def _post_retry(self, url: str, path: str, body: dict) -> None:
        assert self._http is not None
        for attempt in range(5):
            try:
                content, headers = signed_json(self.secret, url, body)
                r = await self._http.post(url, content=content, headers=headers)
                if needs_resign(r):
                    continue  # the target started after we signed: sign again
                if r.status_code < 500:
                    if r.status_code >= 400:
                        log.warning("guard message to %s refused: %s", url, r.text[:200])
                    return
            except httpx.HTTPError as exc:
                log.info("guard message to %s failed (%s); retrying", url, exc)
            await asyncio.sleep(0.2 * (attempt + 1))
        log.error("guard message to %s dropped after 5 attempts", url)

    # -- checkpoint replicas -------------------------------------------------------------

    async def _checkpoint_copies(self) -> None:
        """Load a full copy of the source every ``checkpoint_interval_s``: the refresh of a
        deployment without Ekko. The copy crosses the emulated WAN as one transfer (delay plus
        size over bandwidth); a failed copy keeps the previous one."""
        src = self.config.source
        url = f"http://{src.host}:{src.admin_port}/v1/snapshot"
        wan = self._wan(src.name)
        interval = self.core.node.checkpoint_interval_s
        async with httpx.AsyncClient(timeout=max(30.0, interval)) as client:
            while True:
                started = self._copy_started = time.time()
                self._copy_now.clear()  # a request from here on asks for a later copy
                try:
                    for _ in range(2):  # again if the source started after we signed
                        headers = auth_headers(
                            self.secret, "node", "GET", "/v1/snapshot", host=host_of(url)
                        )
                        resp = await client.get(url, headers=headers)
                        if not needs_resign(resp):
                            break
                    resp.raise_for_status()
                    data = resp.content
                    if wan is not None:
                        await asyncio.sleep(WanLine(wan).delivery_time(0.0, len(data)))
                    store = self.core.load_copy(data, started)
                    self.sync.responder = self.core.responder
                    self.models.replace_store(store)
                    rows = sum(t.rows for t in store.tables.values())
                    self.core.links.count_copy(src.name, rows, len(data))
                    self.notify_written()
                    log.info(
                        "%s loaded a full copy (%d bytes) from %s",
                        self.core.name,
                        len(data),
                        src.name,
                    )
                except (httpx.HTTPError, SnapshotError, OSError) as exc:
                    log.warning(
                        "%s: copy from %s failed (%s); keeping the previous copy",
                        self.core.name,
                        src.name,
                        exc,
                    )
                with contextlib.suppress(TimeoutError):
                    wait = max(0.0, interval - (time.time() - started))
                    await asyncio.wait_for(self._copy_now.wait(), wait)
                # Copies start at least refresh_min_interval_s apart: a flood of refresh
                # requests coalesces into one copy per spacing, not one copy each.
                spacing = self.config.http.refresh_min_interval_s - (time.time() - started)
                if spacing > 0:
                    await asyncio.sleep(spacing)

    async def _refresh_now(self, request: Request) -> Response:
        """Operator action: take the next full copy now rather than at the interval (no
        sooner than ``[http] refresh_min_interval_s`` after the last one started)."""
        self._copy_now.set()
        spacing = self.config.http.refresh_min_interval_s
        due = max(0.0, self._copy_started + spacing - time.time())
        return JSONResponse(
            {"node": self.core.name, "refresh": "requested", "starts_in_s": round(due, 3)},
            status_code=202,
        )

    # -- source snapshots and recovery ---------------------------------------------------

    async def _recover(self) -> None:
        """Before the source takes a write: pull what the replicas hold beyond its snapshot
        and log, then make that durable under its lineage (``ekko.node.recover``)."""
        self.recovery = await recover_source(self.core, self._try_connect)

    async def _release_held(self) -> None:
        """Write deferred rows once their staleness bound is due (the scheduler holds them
        out of the table until then); the port wakes the pullers."""
        port = self.core.port
        while True:
            due = port.next_due()
            await asyncio.sleep(0.05 if due is None else min(0.05, max(0.0, due - time.time())))
            port.release(time.time(), time.time_ns())

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync.snapshot_interval_s)
            try:
                self.core.save_snapshot()
            except OSError as exc:
                log.error("snapshot failed (%s); the previous snapshot is kept", exc)


def run_node(
    config: ClusterConfig,
    name: str,
    base_dir: Path,
    *,
    writer: SyntheticWriterConfig | None = None,
    rebuild: bool = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per guard message
    from ekko.store import warm

    warm()
    try:
        runner = NodeRunner(config, name, base_dir, writer=writer, rebuild=rebuild)
    except (SnapshotError, WalError) as exc:
        log.error(
            "%s refuses to start: %s. Nothing was changed; to rebuild this source from its "
            "replicas (setting these files aside), start it with --rebuild.",
            name,
            exc,
        )
        raise SystemExit(3) from exc
    asyncio.run(runner.run())
