"""``ekko chaos``: a real cluster under acknowledged writes and online training while the
nemesis injects its schedule; then every fault healed, the cluster left to converge, and
the history judged by the checker.

Set-up, in order: the run's own copy of the cluster config, with one config file per node
whose peers' sync addresses are the harness's proxies; a wall-clock offset file per node
(``+0`` until a clock jump, see ``faults.clock_env``); a tmpfs as the source's data dir; the
proxies; the nodes. The harness process holds the proxies, the clients and the nemesis on one
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import signal
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ekko.node.config import ClusterConfig
from ekko.ops.chaos.checker import Verdict, check
from ekko.ops.chaos.disk import ChaosSetupError, DiskWatch, TmpfsDisk
from ekko.ops.chaos.faults import (
    Hands,
    Nemesis,
    clock_env,
    last_traceback,
    traceback_counts,
)
from ekko.ops.chaos.history import History
from ekko.ops.chaos.probes import (
    GuardWatch,
    HealProbe,
    RowReader,
    StalenessProbe,
    at_risk,
    converge,
    final_rows,
)
from ekko.ops.chaos.proxy import ProxyMesh
from ekko.ops.chaos.schedule import (
    Fault,
    FaultKind,
    ScheduleError,
    Timing,
    Topology,
    check_limits,
    counts,
    generate,
)
from ekko.ops.chaos.training import TrainingClient
from ekko.ops.chaos.writer import AckWriter
from ekko.ops.cluster_init import cluster_doc, free_ports, write_cluster
from ekko.ops.launcher import LocalCluster

log = logging.getLogger(__name__)


PROGRESS_S = 30.0  # how often a running chaos run says how far it is


def progress_line(t: float, injected: int, planned: int, acked: int, crashes: int) -> str:
    """What a running chaos run says every ``PROGRESS_S``."""
    return (
        f"chaos: t={t:.0f}s, {injected}/{planned} faults injected, {acked} writes "
        f"acknowledged, {crashes} unplanned crashes"
    )


FRESH_SPAN = 10**7  # writer i's keys written once start at (i + 1) * FRESH_SPAN


@dataclass(frozen=True)
class ChaosSettings:
    """A run's knobs; the seed and these replay it."""

    seed: int = 0
    duration_s: float | None = 60.0  # the schedule ends here...
    rounds: int | None = None  # ...or after this many rounds of every fault kind
    timing: Timing = field(default_factory=Timing)
    writers: int = 2
    batch: int = 10  # keys per acknowledged write
    key_space: int = 2000  # keys per writer written again and again (below FRESH_SPAN)
    write_interval_s: float = 0.05
    train_interval_s: float = 0.25
    warmup_s: float = 3.0
    settle_s: float = 5.0  # a path counts as connected this long after its last fault
    converge_bound_s: float = 60.0
    stale_slack_s: float = 2.0  # + the path's one-way WAN delays: the staleness bound
    disk_mb: int = 64
    table: str | None = None  # the acknowledged writes' table (default: the first one)

    def __post_init__(self) -> None:
        if self.seed < 0:  # numpy's generators (the writers') take none
            raise ScheduleError(f"seed: 0 or more, got {self.seed}")
        check_limits(self.duration_s, self.rounds)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def default_cluster_doc() -> dict[str, Any]:
    """The cluster ``ekko chaos`` runs without ``--config``: a source, two inference DCs
    of a leader and a follower, a small DLRM trained online with the guard on, a table of
    the harness's acknowledged writes, small caches (the full-scan path runs too)."""
    model = {
        "name": "ctr",
        "rows_per_table": 5000,
        "embedding_dim": 8,
        "dense_interval_s": 0.5,
        "baseline_lag_s": 2.0,
    }
    doc = cluster_doc(
        dcs=2,
        replicas=2,
        wan_delay_ms=[10.0, 25.0],
        tables=[("kv", 8, 8)],
        serve=True,
        models=[model],
        sync={"snapshot_interval_s": 1.0, "failover_probe_s": 0.5, "cache_capacity": 256},
    )
    doc["guard"] = {"enabled": True, "interval_s": 1.0}
    doc["durability"] = {"recovery_timeout_s": 10.0}
    return doc


@dataclass
class _Parts:
    """What one run's drive holds: its client, nodes' URLs, hands, nemesis and clients."""

    client: httpx.AsyncClient
    urls: dict[str, str]
    reader: RowReader
    hands: Hands
    nemesis: Nemesis
    writers: list[AckWriter]
    trainer: TrainingClient | None
    watch: GuardWatch | None
    probes: list[asyncio.Task]
    clients: list[asyncio.Task]
    paths: dict[str, dict[str, Any]]
    stops: tuple[asyncio.Event, asyncio.Event, asyncio.Event]


class ChaosRun:
    """One run: set up, drive, heal, converge, judge. ``run()`` returns the history (also
    written to ``workdir/history.json``) and the checker's verdict."""

    def __init__(
        self,
        doc: dict[str, Any],
        workdir: Path,
        settings: ChaosSettings,
        secret: bytes | None = None,
        say=print,
    ) -> None:
        self.settings = settings
        self.workdir = Path(workdir).resolve()
        self.say = say
        self.doc = copy.deepcopy(doc)
        self.doc.setdefault("cluster", {}).update(secret_file="cluster.secret", data_dir="data")
        self.config = ClusterConfig.model_validate(self.doc)
        bad = [n.name for n in self.config.nodes if n.refresh != "sync"]
        if bad:
            raise ChaosSetupError(f"chaos runs syncing nodes only; {bad} refresh by checkpoint")
        self.source = self.config.source.name
        self.replicas = [n.name for n in self.config.nodes if n.name != self.source]
        if not self.replicas:
            raise ChaosSetupError("chaos needs at least one replica in the cluster")
        if not self.config.tables:
            raise ChaosSetupError("chaos writes to a [[tables]] entry; the config has none")
        self.table = self.config.tables[0]
        if settings.table is not None:
            self.table = next((t for t in self.config.tables if t.name == settings.table), None)
            if self.table is None:
                raise ChaosSetupError(f"chaos: no table {settings.table!r} in the config")
        self.model = self.config.models[0].name if self.config.models else None
        self.secret = secret or secrets.token_hex(32).encode()
        self.dials = self._dials()
        self.topology = Topology(
            self.source,
            tuple(self.replicas),
            tuple(sorted({tuple(sorted(p)) for p in self.dials})),  # type: ignore[misc]
        )
        self.history = History(settings.seed)
        self._tasks: set[asyncio.Task] = set()

    def _dials(self) -> list[tuple[str, str]]:
        """``(dialer, target)`` for every sync connection the cluster can open."""
        pairs = {(r, u.name) for r in self.replicas for u in self.config.upstreams(r)}
        pairs |= {(self.source, r) for r in self.replicas}  # the source's recovery pulls
        return sorted(pairs)

    def schedule(self) -> list[Fault]:
        s = self.settings
        return generate(
            s.seed, self.topology, duration_s=s.duration_s, rounds=s.rounds, timing=s.timing
        )

    # -- set-up -------------------------------------------------------------------------

    def _write_configs(self, ports: dict[tuple[str, str], int]) -> dict[str, Path]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        secret = self.workdir / "cluster.secret"
        secret.write_bytes(self.secret)
        secret.chmod(0o600)
        write_cluster(self.doc, self.workdir / "cluster.toml")
        out = {}
        for node in [self.source, *self.replicas]:
            doc = copy.deepcopy(self.doc)
            for n in doc["nodes"]:
                if (node, n["name"]) in ports:
                    n["sync_port"] = ports[(node, n["name"])]
                    n["host"] = "127.0.0.1"
            out[node] = write_cluster(doc, self.workdir / f"cluster.{node}.toml")
        return out

    def _paths(self) -> dict[str, dict[str, Any]]:
        """Per replica: its preferred path to the source (nodes and links) and the bound
        its rows' staleness is held to while that path is free of faults."""
        out = {}
        for r in self.replicas:
            path, delay, node = [r], 0.0, r
            while node != self.source:
                up = self.config.upstreams(node)[0].name
                path.append("|".join(sorted((node, up))))
                wan = self.config.wan(node, up)
                delay += wan.delay_ms / 1000 if wan is not None else 0.0
                path.append(up)
                node = up
            bound = round(self.settings.stale_slack_s + delay, 3)
            out[r] = {"path": path, "bound_s": bound}
        return out

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> tuple[History, Verdict]:
        s = self.settings
        faults = self.schedule()
        self.history.settings = {
            **s.as_json(),
            "source": self.source,
            "replicas": self.replicas,
            "table": self.table.name,
            "model": self.model,
            "links": ["|".join(p) for p in self.topology.links],
        }
        self.history.schedule = [f.as_json() for f in faults]
        self.say(f"chaos seed {s.seed}: {len(faults)} faults planned {counts(faults)}")
        ports = dict(zip(self.dials, free_ports(len(self.dials)), strict=True))
        node_configs = self._write_configs(ports)
        data = self.config.path(self.config.cluster.data_dir, self.workdir)
        data_dirs = {n: data / n for n in [self.source, *self.replicas]}
        clocks = {n: self.workdir / "clock" / f"{n}.offset" for n in data_dirs}
        env = {n: clock_env(clocks[n]) for n in data_dirs}
        real = {n.name: (n.host, n.sync_port) for n in self.config.nodes}
        mesh = ProxyMesh(real, ports)
        disk = TmpfsDisk(data_dirs[self.source], s.disk_mb)
        disk.setup()
        cluster: LocalCluster | None = None
        try:
            await mesh.start()
            cluster = LocalCluster(
                self.workdir / "cluster.toml", node_configs=node_configs, node_env=env
            )
            started = time.monotonic()
            # Shielded: a SIGTERM meanwhile must not stop the nodes while more still start.
            starting = asyncio.ensure_future(asyncio.to_thread(cluster.start, None, 180.0))
            await asyncio.shield(starting)
            self.history.event("cluster_ready", seconds=round(time.monotonic() - started, 2))
            await self._drive(cluster, mesh, disk, data_dirs, clocks, faults)
        finally:
            if cluster is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await starting  # its failure, if any, is already on its way up
                await asyncio.to_thread(self._stop, cluster)
            await mesh.close()
            disk.teardown()
        s = self.settings
        verdict = check(self.history, settle_s=s.settle_s, converge_bound_s=s.converge_bound_s)
        self.history.final["verdict"] = {"failures": verdict.failures, "summary": verdict.summary}
        path = self.history.write(self.workdir / "history.json")
        self.say(f"history: {path}")
        return self.history, verdict

    async def _drive(self, cluster, mesh, disk, data_dirs, clocks, faults) -> None:
        s = self.settings
        h = self.history
        h.t0 = time.monotonic()  # history times count from the clients' start
        urls = {n: cluster.url(n, "") for n in data_dirs}
        paths = self._paths()
        stops = (asyncio.Event(), asyncio.Event(), asyncio.Event())
        stop_clients, stop_probes, _ = stops
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        http = cluster.http.async_client(auth=cluster.auth, timeout=3.0, limits=limits)
        async with http as client:  # https and the cluster CA with [cluster] tls
            reader = RowReader(client, urls, self.table.name)
            hands = Hands(
                cluster,
                mesh,
                h,
                data_dirs,
                clocks,
                disk,
                self.workdir / "copies",
                at_risk=lambda: at_risk(h, reader, [r for r in self.replicas if hands.up(r)]),
            )
            writers = [
                AckWriter(
                    client,
                    f"{urls[self.source]}/v1/tables/{self.table.name}/rows",
                    index=i,
                    dim=self.table.dim,
                    key_base=i * s.key_space,
                    key_space=s.key_space,
                    fresh_base=(i + 1) * FRESH_SPAN,
                    batch=s.batch,
                    interval_s=s.write_interval_s,
                    history=h,
                    seed=s.seed * 1000 + i,
                )
                for i in range(s.writers)
            ]
            clients = [self._spawn(w.run(stop_clients)) for w in writers]
            trainer = None
            if self.model is not None:
                trainer = TrainingClient(
                    client,
                    urls[self.source],
                    {r: urls[r] for r in self.replicas},
                    self.model,
                    hands.up,
                    interval_s=s.train_interval_s,
                    seed=s.seed,
                )
                clients.append(self._spawn(trainer.run(stop_clients)))
            probes = [
                self._spawn(StalenessProbe(h, reader, paths, hands.up).run(stop_probes)),
                self._spawn(self._monitor(cluster, hands, stop_probes)),
            ]
            watch = None
            if self.model is not None and self.config.guard.enabled:
                watch = GuardWatch(h, client, urls, self.source, self.model, hands.up)
                probes.append(self._spawn(watch.run(stop_probes)))
            heal_probe = HealProbe(h, reader, paths, s.converge_bound_s)

            def on_heal(f: Fault, t: float) -> None:
                self._spawn(heal_probe.after_heal(f.as_json(), t, stop_probes))
                if f.kind is FaultKind.DISK_FULL:
                    self._spawn(disk_watch.after_heal(f, t, stop_probes))

            async def on_fault(f: Fault) -> None:
                if f.kind is FaultKind.DISK_FULL:
                    await disk_watch.during(f, urls[f.target])

            disk_watch = DiskWatch(h, client, s.converge_bound_s)
            nemesis = Nemesis(hands, h, on_heal, on_fault=on_fault)
            probes.append(self._spawn(self._progress(nemesis, len(faults), stop_probes)))
            parts = _Parts(client, urls, reader, hands, nemesis, writers, trainer, watch,
                           probes, clients, paths, stops)  # fmt: skip
            try:
                await self._nemesis(parts, faults)
            finally:  # on any error too: nothing may outlive the client
                hands.closing = True
                for e in stops:
                    e.set()
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _nemesis(self, p: _Parts, faults: list[Fault]) -> None:
        """Warm up, run the schedule, heal everything, write on a while, stop the clients,
        converge, read the final rows."""
        s, h = self.settings, self.history
        stop_clients, stop_probes, stop_nemesis = p.stops
        await self._warm_up(p.writers, s.warmup_s)
        await asyncio.to_thread(p.hands.copy_data_dirs)
        h.event("nemesis_start")
        await p.nemesis.run(faults, stop_nemesis, asyncio.get_running_loop().time())
        await p.hands.heal_everything()
        healed = h.event("last_heal")["t"]
        self.say(f"chaos: schedule done at t={healed:.1f}s; injected {p.nemesis.injected}")
        # writes go on after the last heal until reads on paths free of faults for
        # settle_s are judged (the staleness check always has a quiet spell)
        after = s.settle_s + max(x["bound_s"] for x in p.paths.values()) + 2.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_nemesis.wait(), after)
        stop_clients.set()
        await asyncio.gather(*p.clients)
        stopped = h.event("writes_stopped")["t"]
        await converge(h, p.client, p.urls, self.source, stopped, s.converge_bound_s)
        await final_rows(h, p.reader, self.source)
        stop_probes.set()
        await asyncio.gather(*p.probes, *list(self._tasks), return_exceptions=True)
        h.settings["injected"] = p.nemesis.injected
        h.settings["clients"] = {
            "writes_sent": sum(w.sent for w in p.writers),
            "writes_refused": sum(w.refused for w in p.writers),
            "train_batches": p.trainer.trained if p.trainer else 0,
            "train_refused": p.trainer.refused if p.trainer else 0,
            "predicted": p.trainer.predicted if p.trainer else 0,
            "guard_polls": p.watch.polls if p.watch else 0,
        }

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _warm_up(self, writers: list[AckWriter], seconds: float) -> None:
        """Every writer acknowledged once and ``seconds`` passed: the copies an
        ``old_snapshot`` restores are of a cluster that has run."""
        end = asyncio.get_running_loop().time() + seconds
        for w in writers:
            await asyncio.wait_for(w.acked.wait(), 120.0)
        left = end - asyncio.get_running_loop().time()
        if left > 0:
            await asyncio.sleep(left)  # the warm-up is a span of running, not a condition

    async def _progress(self, nemesis: Nemesis, planned: int, stop: asyncio.Event) -> None:
        """A line every ``PROGRESS_S`` while the run goes on, so a log file shows it moving."""
        h = self.history
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_S)
            if not stop.is_set():
                self.say(progress_line(h.now(), sum(nemesis.injected.values()), planned,
                                       len(h.writes), len(h.crashes)))  # fmt: skip

    async def _monitor(self, cluster: LocalCluster, hands: Hands, stop: asyncio.Event) -> None:
        """A node that exits without the nemesis's hand is an unplanned crash: recorded
        with its log's last traceback, then started again so the run goes on."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
            for node, st in hands.state.items():
                p = cluster.procs.get(node)
                if st.up and p is not None and not p.alive:
                    self.history.crashes.append(
                        {
                            "node": node,
                            "t": self.history.now(),
                            "code": p.proc.returncode,
                            "traceback": last_traceback(p.log_path),
                        }
                    )
                    self.say(f"chaos: {node} exited unplanned (code {p.proc.returncode})")
                    st.up = False
                    await hands.restart(node)

    def _stop(self, cluster: LocalCluster) -> None:
        codes = cluster.stop_all()
        self.history.final["exit_codes"] = codes
        logs = [p.log_path for p in cluster.procs.values()]
        self.history.final["tracebacks"] = traceback_counts(logs)
        for node, code in codes.items():
            if code != 0:
                self.history.crashes.append(
                    {
                        "node": node,
                        "t": self.history.now(),
                        "code": code,
                        "traceback": last_traceback(cluster.procs[node].log_path),
                        "when": "at the final SIGTERM",
                    }
                )


def run_chaos(
    settings: ChaosSettings,
    workdir: Path,
    config: Path | None = None,
    say=print,
) -> tuple[History, Verdict]:
    """Run one chaos run (``ekko chaos``, the bench, the CI test)."""
    import tomllib

    if config is None:
        doc, secret = default_cluster_doc(), None
    else:
        doc = tomllib.loads(Path(config).read_text())
        base = Path(config).resolve().parent
        secret_file = base / doc.get("cluster", {}).get("secret_file", "cluster.secret")
        secret = secret_file.read_bytes().strip() if secret_file.exists() else None
    run = ChaosRun(doc, workdir, settings, secret=secret, say=say)
    return asyncio.run(_until_terminated(run.run()))


async def _until_terminated(
    coro: Coroutine[Any, Any, tuple[History, Verdict]],
) -> tuple[History, Verdict]:
    """Run ``coro``; a SIGTERM cancels it, so the run stops its nodes, proxies and tmpfs as
    on Ctrl-C. Python's default SIGTERM ended the harness at once: the nodes, in sessions of
    their own, ran on (paused ones stopped forever) and the source's tmpfs stayed mounted.
    Raises ChaosTerminated once cleaned up."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    hooked = threading.current_thread() is threading.main_thread()
    if hooked:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await coro
    except asyncio.CancelledError:
        if terminated:
            raise ChaosTerminated("chaos: terminated (SIGTERM); its nodes were stopped") from None
        raise
    finally:
        if hooked:
            loop.remove_signal_handler(signal.SIGTERM)


class ChaosTerminated(RuntimeError):
    """A chaos run ended by SIGTERM, after stopping what it started (no verdict)."""
