"""``ekko bench lifecycle``: a drifting stream through bounded dynamic tables, end to end.

A real cluster (``ekko up``'s launcher): the source trains the demo's model online with every
embedding table dynamic (``[[models]] row_budget``, count admission, aged-LFU eviction), fed the
demo's drifting stream (new items arriving, old ones fading) over its ``/train`` route;
evictions become deletes through the source's write port and travel to two replicas in two
DCs like rows. Every ``sample_s`` the bench reads each node's ``/v1/status`` (live rows and
tombstones per table) and its resident memory (``/proc/PID/status``). At the end training
stops and the replicas must hold exactly the source's rows (digests per table). The online
AUC of bounded vs unbounded tables on the same stream is ``ekko bench dynamic``'s
measurement, run here on the same stream for the summary.

Summary keys: ``row_budget``, ``distinct_ids`` (over the run, the most of any table),
``max_rows`` {node: the most live rows any table held}, ``rss_slope_mb_per_min`` {node: least
squares after warm-up}, ``auc`` {``bounded``, ``unbounded``}, ``digests_equal``,
``tombstones_max`` (the most any node held, all tables).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
from matplotlib.figure import Figure
from rich.console import Console

from ekko.bench import dynamic
from ekko.bench.report import write_result
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.train.streams import Events, StreamConfig, SyntheticStream

console = Console(stderr=True)
MODEL = "ctr"
_JSON = msgspec.json.Encoder()


@dataclass(frozen=True)
class LifecycleSpec:
    """Inputs of one run; recorded in the JSON."""

    row_budget: int = 2_500
    duration_s: float = 300.0
    rate: float = 1024.0  # events/s offered to the trainer
    batch: int = 256
    sample_s: float = 2.0
    warmup_fraction: float = 0.3  # memory slope fitted after this much of the run
    converge_s: float = 120.0
    auc_events: int = 300_000  # the trainer-alone AUC comparison (ekko bench dynamic)
    eviction: str = "lfu"  # aged LFU kept drifting items' rows better than LRU (README)

    @classmethod
    def quick(cls) -> LifecycleSpec:
        return cls(row_budget=300, duration_s=60.0, auc_events=60_000)


def _model(spec: LifecycleSpec) -> dict[str, Any]:
    return {
        "name": MODEL,
        "embedding_dim": dynamic.DEMO_MODEL.embedding_dim,
        "rows_per_table": dynamic.DEMO_MODEL.rows_per_table,
        "dense_interval_s": 1.0,
        "row_budget": spec.row_budget,
        "admission": {"kind": "count", "threshold": 2},
        "eviction": {"kind": spec.eviction},
    }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _slope_per_min(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 3:
        return float("nan")
    t = np.asarray(ts) / 60.0
    return float(np.polyfit(t - t[0], np.asarray(ys), 1)[0])


class _Run:
    """One cluster's run: the feed, the samples, the end state."""

    def __init__(self, spec: LifecycleSpec, cluster: LocalCluster) -> None:
        self.spec = spec
        self.cluster = cluster
        self.nodes = [n.name for n in cluster.config.nodes]
        self.samples: list[dict[str, Any]] = []
        self.distinct: list[set[int]] = []
        self.trained = 0
        self.started = time.monotonic()

    def _body(self, events: Events) -> bytes:
        sparse = events.sparse
        if not self.distinct:
            self.distinct = [set() for _ in range(sparse.shape[1])]
        for f in range(sparse.shape[1]):
            self.distinct[f].update(np.unique(sparse[:, f]).tolist())
        return _JSON.encode({"dense": events.dense.tolist(), "sparse": sparse.tolist(),
                             "labels": events.labels.astype(np.int64).tolist()})  # fmt: skip

    async def feed(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        spec = self.spec
        url = self.cluster.url("source", f"/v1/models/{MODEL}/train")
        stream = SyntheticStream(StreamConfig(seed=7, events_per_s=spec.rate))
        start = time.monotonic()
        for events in stream.batches(spec.batch):
            if stop.is_set():
                return
            body = self._body(events)
            while True:
                r = await client.post(
                    url, content=body, headers={"content-type": "application/json"}
                )
                if r.status_code == 202:
                    break
                if r.status_code != 503:
                    raise RuntimeError(
                        f"the trainer refused a batch: {r.status_code} {r.text[:200]}"
                    )
                await asyncio.sleep(0.05)
            self.trained += len(events)
            delay = start + self.trained / spec.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    def sample(self, t: float) -> dict[str, Any]:
        row: dict[str, Any] = {"t": t, "nodes": {}}
        for name in self.nodes:
            status = self.cluster.get(name, "/v1/status")
            tables = {k: v for k, v in status["tables"].items() if not k.startswith("dense/")}
            row["nodes"][name] = {
                "rows_max": max((v["rows"] for v in tables.values()), default=0),
                "tombstones": sum(v["tombstones"] for v in tables.values()),
                "rss_mb": _rss_mb(self.cluster.procs[name].proc.pid),
                "digests": {k: v["digest"] for k, v in status["tables"].items()},
            }
        self.samples.append(row)
        return row

    async def run(self) -> None:
        spec = self.spec
        stop = asyncio.Event()
        http = self.cluster.http
        async with http.async_client(timeout=30.0, auth=self.cluster.auth) as client:
            feeder = asyncio.create_task(self.feed(client, stop))
            self.started = time.monotonic()
            try:
                while (t := time.monotonic() - self.started) < spec.duration_s:
                    if feeder.done():
                        feeder.result()  # raises what stopped it
                    row = await asyncio.to_thread(self.sample, t)
                    src = row["nodes"]["source"]
                    console.print(
                        f"{t:5.0f} s  trained {self.trained:,}  source rows/table ≤ "
                        f"{src['rows_max']:,}  tombstones {src['tombstones']:,}  "
                        f"rss {src['rss_mb']:.0f} MB"
                    )
                    await asyncio.sleep(spec.sample_s)
            finally:
                stop.set()
                await asyncio.gather(feeder, return_exceptions=True)

    def converged(self) -> bool:
        deadline = time.monotonic() + self.spec.converge_s
        while time.monotonic() < deadline:
            row = self.sample(time.monotonic() - self.started)
            digests = [n["digests"] for n in row["nodes"].values()]
            if all(d == digests[0] for d in digests):
                return True
            time.sleep(1.0)  # replicas in other processes pulling; bounded by the deadline
        return False


def run(quick: bool = False, out: Path | None = None, **_: Any) -> dict[str, Any]:
    spec = LifecycleSpec.quick() if quick else LifecycleSpec()
    with tempfile.TemporaryDirectory(prefix="ekko-bench-lifecycle-") as tmp:
        doc = cluster_doc(dcs=2, replicas=1, models=[_model(spec)],
                          sync={"snapshot_interval_s": 10.0})  # fmt: skip
        config = write_cluster(doc, Path(tmp) / "cluster.toml")
        with LocalCluster(config) as cluster:
            cluster.start(timeout=180)
            lifecycle = _Run(spec, cluster)
            asyncio.run(lifecycle.run())
            console.print("training stopped: waiting for the replicas to converge")
            equal = lifecycle.converged()
        console.print(f"AUC, bounded vs unbounded, {spec.auc_events:,} events (trainer alone)")
        trainers = dynamic.run(out=Path(tmp) / "dynamic.json", budget=spec.row_budget,
                               events=spec.auc_events, eviction=spec.eviction)  # fmt: skip
    got = trainers["summary"]["auc"]
    auc = {"bounded": got["bounded"], "unbounded": got["unbounded"]}
    summary = _summary(spec, lifecycle, equal, auc)
    details = {"samples": lifecycle.samples}
    write_result("lifecycle", asdict(spec), summary, details, out,
                 lambda fig: _plot(fig, spec, lifecycle.samples))  # fmt: skip
    return {"summary": summary}


def _summary(
    spec: LifecycleSpec, lifecycle: _Run, equal: bool, auc: dict[str, float]
) -> dict[str, Any]:
    warm = spec.duration_s * spec.warmup_fraction
    late = [s for s in lifecycle.samples if warm <= s["t"] <= spec.duration_s]
    nodes = lifecycle.nodes
    return {
        "row_budget": spec.row_budget,
        "distinct_ids": max((len(d) for d in lifecycle.distinct), default=0),
        "events": lifecycle.trained,
        "max_rows": {n: max(s["nodes"][n]["rows_max"] for s in lifecycle.samples) for n in nodes},
        "rss_slope_mb_per_min": {n: _rss_slope(late, n) for n in nodes},
        "auc": auc,
        "digests_equal": equal,
        "tombstones_max": max(
            s["nodes"][n]["tombstones"] for s in lifecycle.samples for n in nodes
        ),
    }


def _rss_slope(samples: list[dict[str, Any]], node: str) -> float:
    ts = [s["t"] for s in samples]
    return round(_slope_per_min(ts, [s["nodes"][node]["rss_mb"] for s in samples]), 2)


def _plot(fig: Figure, spec: LifecycleSpec, samples: list[dict[str, Any]]) -> None:
    ax_rows, ax_rss = fig.subplots(1, 2)
    ts = [s["t"] for s in samples]
    for name in samples[0]["nodes"]:
        ax_rows.plot(ts, [s["nodes"][name]["rows_max"] for s in samples], label=f"{name} rows")
        ax_rows.plot(ts, [s["nodes"][name]["tombstones"] for s in samples], ":",
                     label=f"{name} tombstones")  # fmt: skip
        ax_rss.plot(ts, [s["nodes"][name]["rss_mb"] for s in samples], label=name)
    ax_rows.axhline(spec.row_budget, color="k", lw=0.8, ls="--", label="row budget")
    ax_rows.set_xlabel("s")
    ax_rows.set_title("rows per table (most of any), tombstones (all tables)")
    ax_rows.legend(fontsize=7)
    ax_rss.axvline(spec.duration_s * spec.warmup_fraction, color="k", lw=0.8, ls=":")
    ax_rss.set_xlabel("s")
    ax_rss.set_title("resident memory (MB)")
    ax_rss.legend(fontsize=7)
