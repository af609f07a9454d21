"""``ekko demo``: online DLRM training reaching inference replicas in three data centres.

``--partitions P`` runs the partitioned form (``ekko.demo.partitioned``): P sources, a
holder of each partition per DC serving by scatter-gather, the sharded trainer's ranks
(``ShardedFeed``) in place of the source's trainer, no checkpoint replica; the guard's
coordinator is the source of partition 0 (``cfg.source``), so the same polls read it.

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
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.live import Live

from ekko.demo.dashboard import (
    LATENCY_WINDOW_S,
    PROGRESS_LEGEND,
    guard_cell,
    incident_line,
    live_table,
    live_view,
    print_summary,
    progress_line,
)
from ekko.demo.loop import OnlineLoop
from ekko.demo.partitioned import ShardedFeed
from ekko.demo.report import auc_phases, write_png
from ekko.demo.setup import MODEL, DemoSpec, cluster_config, previous_run
from ekko.ops.launcher import LocalCluster
from ekko.quality.latency import LatencyHistogram
from ekko.train.streams import StreamConfig, SyntheticStream


class Demo:
    """One run of the demo against a started ``LocalCluster``."""

    def __init__(
        self,
        spec: DemoSpec,
        cluster: LocalCluster,
        console: Console,
        feed: ShardedFeed | None = None,
    ) -> None:
        self.spec = spec
        self.feed = feed  # the partitioned form's sharded trainer; None: the source's
        self.guarded = spec.guard
        self.cluster = cluster
        self.console = console
        cfg = cluster.config
        self.source = cfg.source.name  # partitioned: partition 0's, the guard's coordinator
        self.checkpoint = [n.name for n in cfg.nodes if n.refresh == "checkpoint"]
        self.replicas = [n.name for n in cfg.nodes if n.serve]
        self.synced = [n for n in self.replicas if n not in self.checkpoint]
        self.timeline: list[dict[str, Any]] = []
        self._last: dict[str, tuple[float, int]] = {}
        self.started = 0.0
        self.started_wall = 0.0
        self.hists: dict[str, LatencyHistogram] = {}
        self.recent: dict[str, deque[tuple[float, LatencyHistogram]]] = {}
        self.loads: list[float] = []  # seconds of the run the checkpoint replica loaded a copy

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
        while (await self._trainer(client))["queued"]:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # dense tensors are published at most every second
        for name in self.checkpoint:
            before = (await self._get(client, name, "/v1/status"))["copied_at"]
            await client.post(self.url(name) + "/v1/checkpoint/refresh")
            while (await self._get(client, name, "/v1/status"))["copied_at"] == before:
                await asyncio.sleep(0.2)
        loop.counters.trained = 0
        if self.feed is not None:
            self.feed.reset_quality()
        else:
            await client.post(f"{self.url(self.source)}/v1/models/{MODEL}/train/quality/reset")
        for name in self.synced:
            await client.post(self.url(name) + "/v1/latency/reset")

    async def _trainer(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """The trainer's counters and own quality: the sharded feed's, or the source's."""
        if self.feed is not None:
            return self.feed.report()
        return await self._get(client, self.source, f"/v1/models/{MODEL}/train")

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
            copied_at = status.get("copied_at")
            if name in self.checkpoint and self.started_wall and copied_at:
                t_load = copied_at - self.started_wall
                if t_load > 0 and (not self.loads or t_load > self.loads[-1] + 1e-6):
                    self.loads.append(t_load)
            rows[name] = {
                "dc": status["dc"],
                "latency": status["latency"],
                "wan_bytes": wan_bytes,
                "wan_bytes_per_s": (wan_bytes - b0) / dt,
                "rows_per_s": (applied - r0) / dt,
                "auc_window": online["window"]["auc"],
                "auc_lifetime": online["lifetime"]["auc"],
                "copied_at": copied_at,
            }
            if name in self.synced:
                rows[name] |= await self._recent_latency(client, name, now)
        trainer = await self._trainer(client)
        snap = {
            "t": now - self.started,
            "replicas": rows,
            "trainer": trainer,
            "loop": asdict(loop.counters),
        }
        if self.guarded:
            snap["guard"] = await self._get(client, self.source, f"/v1/models/{MODEL}/health")
            for name in self.synced:
                h = await self._get(client, name, f"/v1/models/{MODEL}/health")
                rows[name]["guard"] = guard_cell(h)
                rows[name]["guard_doc"] = h
        return snap

    async def _recent_latency(
        self, client: httpx.AsyncClient, name: str, now: float
    ) -> dict[str, float | None]:
        """Update-latency quantiles of the last ``LATENCY_WINDOW_S``: the histogram now less
        the one taken that long ago (cumulative quantiles let one burst pin p99 for good)."""
        h = LatencyHistogram.from_dict(await self._get(client, name, "/v1/latency"))
        past = self.recent.setdefault(name, deque())
        past.append((now, h))
        while len(past) > 1 and past[1][0] <= now - LATENCY_WINDOW_S:
            past.popleft()
        w = h.since(past[0][1]) if len(past) > 1 else h
        return {"window_p50_ms": _num(w.quantile(0.5)), "window_p99_ms": _num(w.quantile(0.99))}

    def incident(self, snap: dict[str, Any], loop: OnlineLoop) -> str | None:
        span = None
        if self.spec.poison_at_s is not None and loop.poison_started_at is not None:
            at = loop.poison_started_at - self.started_wall
            span = (at, at + self.spec.poison_for_s)
        return incident_line(snap.get("guard"), span, self.started_wall)

    def table(self, snap: dict[str, Any], loop: OnlineLoop):
        table = live_table(self, snap, loop.counters.events, loop.poisoned_events)
        return live_view(table, self.incident(snap, loop))

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
                train=self.feed.submit if self.feed is not None else None,
            )
            with self.console.status(f"warm-up: training on {spec.warmup_events} events"):
                await self.warm_up(client, loop, batches)
            self.started, self.started_wall = time.monotonic(), time.time()
            driver = asyncio.create_task(loop.run(batches, stop, spec.duration_s))
            next_interval = self.started + spec.interval_s
            snap: dict[str, Any] | None = None
            # A terminal gets the live table; a log file a line per interval (Live writes
            # only its last frame where it cannot redraw).
            live = Live(console=self.console, refresh_per_second=2)
            if not self.console.is_terminal:
                self.console.print(PROGRESS_LEGEND, highlight=False, soft_wrap=True)
            with live if self.console.is_terminal else contextlib.nullcontext():
                while not driver.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(driver), 1.0)
                    try:
                        snap = await self.sample(client, loop)
                    except httpx.HTTPError as exc:
                        self.console.print(f"[yellow]status poll failed: {exc}[/yellow]")
                        continue
                    if self.console.is_terminal:
                        live.update(self.table(snap, loop))
                    if time.monotonic() >= next_interval or driver.done():
                        self._interval(loop, snap)
                        next_interval += spec.interval_s
                        if not self.console.is_terminal:
                            line = progress_line(
                                snap, spec.duration_s, loop.counters.events,
                                self.incident(snap, loop),
                            )  # fmt: skip
                            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
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
        incident = self.incident(final, loop)
        marks = self._marks(final, loop)
        return {
            "per_dc": per_dc,
            "checkpoint_auc": ck[0]["auc_lifetime"] if ck else None,
            "checkpoint_wan_bytes_per_s": ck[0]["wan_bytes"] / elapsed if ck else None,
            "checkpoint_every_s": self.spec.checkpoint_interval_s,
            "checkpoint_loads": len(self.loads),
            "checkpoint_loads_at_s": self.loads,
            "trainer_auc": trainer["lifetime"]["auc"],
            "partitions": self.spec.partitions,
            "trainer_ranks": self.feed.ranks if self.feed is not None else None,
            "trainer_publish_share": trainer["publish_share"],
            "events": loop.counters.events,
            "events_per_s": loop.counters.events / elapsed,
            "train_refused_batches": loop.counters.train_refused,
            "not_ready_predicts": {n: t.not_ready for n, t in loop.tracks.items()},
            "duration_s": elapsed,
            "poisoned_events": loop.poisoned_events,
            "poison_started_at": loop.poison_started_at,  # the loop flipped the labels
            # the ranks stepped on the first flipped batch (partitioned: behind their queues)
            "poison_trained_at": trainer.get("flipped_labels_trained_at"),
            "guard": final.get("guard"),
            "replica_guards": {n: final["replicas"][n].get("guard_doc") for n in self.synced},
            "incident_line": incident,
            "marks": marks,
            "auc_phases": auc_phases(self.timeline, marks, self.synced),
            "trainer_quarantine": trainer.get("quarantine"),
            "trainer_failed": trainer.get("failed"),
        }

    def _marks(self, final: dict[str, Any], loop: OnlineLoop) -> dict[str, Any]:
        """What the AUC plot marks, in seconds of the run: checkpoint loads, the poisoned
        span, each incident's detection and rollback."""
        guard = final.get("guard") or {}
        incs = [
            *guard.get("incidents", []),
            *([guard["incident"]] if guard.get("incident") else []),
        ]
        rel = lambda key: [i[key] - self.started_wall for i in incs if i.get(key)]  # noqa: E731
        poison = None
        if loop.poison_started_at is not None:
            at = loop.poison_started_at - self.started_wall
            poison = [at, at + self.spec.poison_for_s]
        return {
            "checkpoint_loads": self.loads,
            "poison": poison,
            "detected": rel("detected_at"),
            "rolled_back": rel("decided_at"),
            "restored": rel("completed_at"),
            "training_resumes": rel("quarantine_until"),  # the ranks' (partitioned form)
        }


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


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
    spec.validate()
    fresh = previous_run(workdir, console)
    config = cluster_config(spec, workdir)
    cluster = LocalCluster(config, fresh=fresh)
    feed: ShardedFeed | None = None
    console.print(
        f"demo cluster: {config} ({len(cluster.config.nodes)} nodes); node logs: "
        f"{cluster.log_dir}/<node>.log",
        highlight=False,
    )
    try:
        with console.status("starting nodes"):
            cluster.start(timeout=spec.ready_timeout_s)
        if spec.partitions > 1:
            console.print(
                f"{spec.partitions} partitions per DC; the sharded trainer: {spec.ranks} rank "
                "processes, each publishing its partitions to their sources",
                highlight=False,
            )
            feed = ShardedFeed(cluster.config, config, cluster.config.model(MODEL), spec.ranks)
        demo = Demo(spec, cluster, console, feed)
        summary = asyncio.run(_run_with_signals(demo))
    finally:
        if feed is not None:
            _close_feed(feed, console)
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
    png = write_png(
        out_json.with_suffix(".png"), demo.timeline, demo.hists, cluster.config, summary["marks"]
    )
    # The summary goes to stdout, whole: a pipe or a file gets it without cut names.
    print_summary(summary, Console(width=None if sys.stdout.isatty() else 120))
    console.print(f"wrote {out_json} and {png}", highlight=False)
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


def _close_feed(feed: ShardedFeed, console: Console) -> None:
    """End the sharded trainer's ranks before the nodes (their last rows acknowledged)."""
    try:
        steps = [r.steps for r in feed.close()]
        console.print(f"sharded trainer: ranks took {steps} steps", highlight=False)
    except Exception as exc:  # the nodes are stopped next either way
        console.print(f"[yellow]sharded trainer failed: {exc}[/yellow]")
