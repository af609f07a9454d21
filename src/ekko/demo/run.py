"""``ekko demo``: online DLRM training reaching inference replicas in three data centres.

A generated cluster: the training DC (source + trainer), three inference DCs with emulated
one-way WAN delays of 25/50/100 ms (one serving replica each), and one "checkpoint" replica
that gets a full copy of the model every ``checkpoint_every_s`` instead of syncing, as
deployments without Ekko do. The ``OnlineLoop`` drives the seeded drifting synthetic stream
through predict → feedback → train; a live dashboard polls the nodes' APIs; at the end a
summary table, a JSON document and a PNG (AUC over time, update-latency CDF).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table as RichTable

from ekko.demo.loop import OnlineLoop
from ekko.demo.report import write_png
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.quality.latency import LatencyHistogram
from ekko.train.streams import StreamConfig, SyntheticStream

MODEL = "ctr"


@dataclass(frozen=True)
class DemoSpec:
    """Inputs of one demo run; recorded in its JSON."""

    duration_s: float = 60.0
    rate: float = 1024.0  # events/s offered; the stream's simulated clock runs at this rate
    batch: int = 256
    wan_delay_ms: tuple[float, ...] = (25.0, 50.0, 100.0)
    checkpoint_every_s: float = 60.0
    rows_per_table: int = 100_000
    embedding_dim: int = 8
    interval_s: float = 5.0  # AUC-over-time resolution
    warmup_events: int = 30_000  # trained before the run; then every replica gets a copy
    guard: bool = True
    baseline_lag_s: float = 20.0
    poison_at_s: float | None = None  # train on flipped labels from then ...
    poison_for_s: float = 20.0  # ... for this long
    ready_timeout_s: float = 120.0
    seed: int = 7


def _cluster(spec: DemoSpec, workdir: Path) -> Path:
    model = {
        "name": MODEL,
        "rows_per_table": spec.rows_per_table,
        "embedding_dim": spec.embedding_dim,
        "dense_interval_s": 1.0,
        "baseline_lag_s": spec.baseline_lag_s,
    }
    doc = cluster_doc(
        dcs=len(spec.wan_delay_ms),
        replicas=1,
        wan_delay_ms=list(spec.wan_delay_ms),
        serve=True,
        models=[model],
        checkpoint_every_s=spec.checkpoint_every_s,
        sync={"snapshot_interval_s": 0},
    )
    if spec.guard:
        doc["guard"] = {"enabled": True}
    doc["http"] = {"refresh_min_interval_s": 1.0}  # the warm-up asks for one copy at once
    return write_cluster(doc, workdir / "cluster.toml")


class Demo:
    """One run of the demo against a started ``LocalCluster``."""

    def __init__(self, spec: DemoSpec, cluster: LocalCluster, console: Console) -> None:
        self.spec = spec
        self.cluster = cluster
        self.console = console
        cfg = cluster.config
        self.source = cfg.source.name
        self.checkpoint = [n.name for n in cfg.nodes if n.refresh == "checkpoint"]
        self.replicas = [n.name for n in cfg.nodes if n.serve]
        self.synced = [n for n in self.replicas if n not in self.checkpoint]
        self.timeline: list[dict[str, Any]] = []
        self._last: dict[str, tuple[float, int]] = {}
        self.started = 0.0
        self.hists: dict[str, LatencyHistogram] = {}

    def url(self, name: str) -> str:
        return self.cluster.url(name, "")

    async def _get(self, client: httpx.AsyncClient, name: str, path: str) -> dict:
        r = await client.get(self.url(name) + path)
        r.raise_for_status()
        return r.json()

    async def wait_servable(self, client: httpx.AsyncClient) -> None:
        """Until every replica answers predict (its copy of the dense tensors arrived)."""
        cfg = self.cluster.config.model(MODEL)
        probe = {"dense": [[0.0] * cfg.num_dense], "sparse": [[0] * cfg.num_sparse]}
        deadline = time.monotonic() + self.spec.ready_timeout_s
        for name in self.replicas:
            while True:
                r = await client.post(f"{self.url(name)}/v1/models/{MODEL}/predict", json=probe)
                if r.status_code == 200:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica {name} not servable: {r.text[:200]}")
                await asyncio.sleep(0.2)

    async def warm_up(self, client: httpx.AsyncClient, loop: OnlineLoop, batches) -> None:
        """Train a first model, let it reach every replica, and give the checkpoint replica
        its first full copy of it, so the run compares a synced model with a copied one."""
        while loop.counters.trained < self.spec.warmup_events:
            await loop.train_only(next(batches))
        while (await self._get(client, self.source, f"/v1/models/{MODEL}/train"))["queued"]:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # dense tensors are published at most every second
        for name in self.checkpoint:
            before = (await self._get(client, name, "/v1/status"))["copied_at"]
            await client.post(self.url(name) + "/v1/checkpoint/refresh")
            while (await self._get(client, name, "/v1/status"))["copied_at"] == before:
                await asyncio.sleep(0.2)
        loop.counters.trained = 0
        await client.post(f"{self.url(self.source)}/v1/models/{MODEL}/train/quality/reset")
        for name in self.synced:
            await client.post(self.url(name) + "/v1/latency/reset")

    async def sample(self, client: httpx.AsyncClient, loop: OnlineLoop) -> dict[str, Any]:
        """One look at every node: latency, bytes pulled, windowed AUC; trainer counters."""
        now = time.monotonic()
        rows: dict[str, Any] = {}
        for name in self.replicas:
            status = await self._get(client, name, "/v1/status")
            metrics = await self._get(client, name, f"/v1/models/{MODEL}/metrics")
            wan_bytes = sum(link["bytes"] for link in status["links"].values())
            applied = sum(link["rows"] for link in status["links"].values())
            t0, b0 = self._last.get(name, (self.started, 0))
            r0 = self._last.get(name + "/rows", (self.started, 0))[1]
            dt = max(1e-9, now - t0)
            self._last[name] = (now, wan_bytes)
            self._last[name + "/rows"] = (now, applied)
            online = metrics["variants"]["online"]
            rows[name] = {
                "dc": status["dc"],
                "latency": status["latency"],
                "wan_bytes": wan_bytes,
                "wan_bytes_per_s": (wan_bytes - b0) / dt,
                "rows_per_s": (applied - r0) / dt,
                "auc_window": online["window"]["auc"],
                "auc_lifetime": online["lifetime"]["auc"],
                "copied_at": status.get("copied_at"),
            }
        trainer = await self._get(client, self.source, f"/v1/models/{MODEL}/train")
        snap = {
            "t": now - self.started,
            "replicas": rows,
            "trainer": trainer,
            "loop": asdict(loop.counters),
        }
        if self.spec.guard:
            snap["guard"] = await self._get(client, self.source, f"/v1/models/{MODEL}/health")
            for name in self.synced:
                h = await self._get(client, name, f"/v1/models/{MODEL}/health")
                rows[name]["guard"] = guard_cell(h)
                rows[name]["guard_doc"] = h
        return snap

    def table(self, snap: dict[str, Any], loop: OnlineLoop) -> RichTable:
        cfg = self.cluster.config
        t = RichTable(
            title=f"ekko demo · {snap['t']:.0f}/{self.spec.duration_s:.0f} s · "
            f"{loop.counters.events} events predicted → labelled → trained"
        )
        for col in (
            "replica",
            "one-way ms",
            "update p50 ms",
            "update p99 ms",
            "rows/s",
            "WAN KB/s",
            "online AUC",
            "guard",
        ):
            t.add_column(col, justify="right")
        for name, r in snap["replicas"].items():
            wan = cfg.wan(name, self.source)
            lat = r["latency"]
            if name in self.checkpoint:
                age = time.time() - r["copied_at"] if r["copied_at"] else float("nan")
                p50 = f"copy {age:.0f} s old"
                p99 = f"every {cfg.node(name).checkpoint_interval_s:.0f} s"
            else:
                p50, p99 = _ms(lat["p50_ms"]), _ms(lat["p99_ms"])
            t.add_row(
                f"{r['dc']}/{name}",
                f"{wan.delay_ms:.0f}" if wan else "-",
                p50,
                p99,
                f"{r['rows_per_s']:.0f}",
                f"{r['wan_bytes_per_s'] / 1e3:.0f}",
                _auc(r["auc_window"]),
                r.get("guard", "-"),
            )
        tr = snap["trainer"]
        g = snap.get("guard")
        poisoned = loop.poisoned_events
        t.add_row(
            "train/trainer",
            "-",
            "-",
            "-",
            f"{tr['events'] / max(1e-9, snap['t']):.0f} ev/s",
            "-",
            _auc(tr["window"]["auc"]),
            (
                f"{g['state']}{' paused' if g['training_paused'] else ''}"
                f"{f' · {poisoned} poisoned' if poisoned else ''}"
            )
            if g
            else "-",
        )
        return t

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        spec = self.spec
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        http = self.cluster.http
        async with http.async_client(timeout=30.0, limits=limits, auth=self.cluster.auth) as client:
            with self.console.status("waiting for every replica to hold the model"):
                await self.wait_servable(client)
            stream = SyntheticStream(StreamConfig(seed=spec.seed, events_per_s=spec.rate))
            batches = stream.batches(spec.batch)
            poison = None
            if spec.poison_at_s is not None:
                at, until = spec.poison_at_s, spec.poison_at_s + spec.poison_for_s
                poison = lambda t: at <= t < until  # noqa: E731
            loop = OnlineLoop(
                client,
                {n: self.url(n) for n in self.replicas},
                self.url(self.source),
                MODEL,
                spec.rate,
                poison=poison,
            )
            with self.console.status(f"warm-up: training on {spec.warmup_events} events"):
                await self.warm_up(client, loop, batches)
            self.started = time.monotonic()
            driver = asyncio.create_task(loop.run(batches, stop, spec.duration_s))
            next_interval = self.started + spec.interval_s
            snap: dict[str, Any] | None = None
            with Live(console=self.console, refresh_per_second=2) as live:
                while not driver.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(driver), 1.0)
                    try:
                        snap = await self.sample(client, loop)
                    except httpx.HTTPError as exc:
                        self.console.print(f"[yellow]status poll failed: {exc}[/yellow]")
                        continue
                    live.update(self.table(snap, loop))
                    if time.monotonic() >= next_interval or driver.done():
                        self._interval(loop, snap)
                        next_interval += spec.interval_s
            driver.result()
            await asyncio.sleep(0.5)  # the last batch's rows reach the replicas
            final = await self.sample(client, loop)
            for n in self.synced:
                self.hists[n] = LatencyHistogram.from_dict(
                    await self._get(client, n, "/v1/latency")
                )
        return self._summary(final, loop, self.hists)

    def _interval(self, loop: OnlineLoop, snap: dict[str, Any]) -> None:
        now = time.monotonic()
        point: dict[str, Any] = {"t": now - self.started, "auc": {}}
        for name, track in loop.tracks.items():
            point["auc"][name] = track.quality.take_interval(now).as_json()["auc"]
        point["trainer_auc_window"] = snap["trainer"]["window"]["auc"]
        self.timeline.append(point)

    def _summary(
        self, final: dict[str, Any], loop: OnlineLoop, hists: dict[str, LatencyHistogram]
    ) -> dict[str, Any]:
        cfg = self.cluster.config
        elapsed = max(1e-9, final["t"])
        per_dc = []
        for name in self.synced:
            r = final["replicas"][name]
            wan = cfg.wan(name, self.source)
            h = hists[name]
            per_dc.append(
                {
                    "dc": r["dc"],
                    "replica": name,
                    "one_way_delay_ms": wan.delay_ms if wan else 0.0,
                    "update_p50_ms": _num(h.quantile(0.5)),
                    "update_p99_ms": _num(h.quantile(0.99)),
                    "rows_applied": h.count,
                    "wan_bytes_per_s": r["wan_bytes"] / elapsed,
                    "auc": r["auc_lifetime"],
                }
            )
        ck = [final["replicas"][n] for n in self.checkpoint]
        trainer = final["trainer"]
        return {
            "per_dc": per_dc,
            "checkpoint_auc": ck[0]["auc_lifetime"] if ck else None,
            "checkpoint_wan_bytes_per_s": ck[0]["wan_bytes"] / elapsed if ck else None,
            "trainer_auc": trainer["lifetime"]["auc"],
            "trainer_publish_share": trainer["publish_share"],
            "events": loop.counters.events,
            "events_per_s": loop.counters.events / elapsed,
            "train_refused_batches": loop.counters.train_refused,
            "not_ready_predicts": {n: t.not_ready for n, t in loop.tracks.items()},
            "duration_s": elapsed,
            "poisoned_events": loop.poisoned_events,
            "poison_started_at": loop.poison_started_at,
            "guard": final.get("guard"),
            "replica_guards": {n: final["replicas"][n].get("guard_doc") for n in self.synced},
        }


def guard_cell(health: dict[str, Any]) -> str:
    """The demo's guard column for one replica: its state, and its score only when it can
    judge ("healthy 0.0" from a guard that has no samples or is warming up misled)."""
    cell = f"{health['state']}{' → baseline' if health['redirected'] else ''}"
    if health.get("judging") == "judging":
        return f"{cell} {health['score']:.1f}"
    return f"{cell} · {health.get('judgement', 'cannot judge')}"


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _auc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_summary(summary: dict[str, Any], console: Console) -> None:
    t = RichTable(title="ekko demo summary")
    for col in ("replica", "one-way ms", "update p50 ms", "update p99 ms", "WAN KB/s", "AUC"):
        t.add_column(col, justify="right")
    for d in summary["per_dc"]:
        t.add_row(
            f"{d['dc']}/{d['replica']}",
            f"{d['one_way_delay_ms']:.0f}",
            _ms(d["update_p50_ms"]),
            _ms(d["update_p99_ms"]),
            f"{d['wan_bytes_per_s'] / 1e3:.0f}",
            _auc(d["auc"]),
        )
    t.add_row(
        "checkpoint replica",
        "-",
        "full copy",
        "-",
        f"{(summary['checkpoint_wan_bytes_per_s'] or 0) / 1e3:.0f}",
        _auc(summary["checkpoint_auc"]),
    )
    t.add_row("trainer (pre-update)", "-", "-", "-", "-", _auc(summary["trainer_auc"]))
    console.print(t)
    console.print(
        f"{summary['events']} events at {summary['events_per_s']:.0f}/s; "
        f"publisher share of step time {summary['trainer_publish_share'] or 0:.1%}"
    )


def run_demo(
    spec: DemoSpec,
    workdir: Path,
    *,
    json_path: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Start the cluster, run the loop with the dashboard, stop everything, report."""
    import json

    console = console or Console(stderr=True)
    config = _cluster(spec, workdir)
    cluster = LocalCluster(config)
    console.print(f"demo cluster: {config} ({len(cluster.config.nodes)} nodes)")
    try:
        with console.status("starting nodes"):
            cluster.start(timeout=spec.ready_timeout_s)
        demo = Demo(spec, cluster, console)
        summary = asyncio.run(_run_with_signals(demo))
    finally:
        codes = cluster.stop_all()
    bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
    doc = {
        "name": "demo",
        "spec": asdict(spec),
        "summary": summary,
        "timeline": demo.timeline,
        "node_exit_codes": codes,
    }
    out_json = json_path or workdir / "demo.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=2))
    png = write_png(out_json.with_suffix(".png"), demo.timeline, demo.hists, cluster.config)
    print_summary(summary, console)
    console.print(f"wrote {out_json} and {png}")
    if bad:
        console.print(f"[yellow]nodes exited uncleanly: {bad}[/yellow]")
    return doc


async def _run_with_signals(demo: Demo) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return await demo.run(stop)
