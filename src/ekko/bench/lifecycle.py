"""``ekko bench lifecycle``: a drifting stream through bounded dynamic tables, end to end.

A real cluster (``ekko up``'s launcher): the source trains the demo's model online with every
embedding table dynamic (``[[models]] row_budget``, admission of every id, expected-rate
eviction), fed the demo's stream with faster drift (``LifecycleSpec.drift``: new items
arriving and fading within a minute, users and other open context vocabularies taking new
ids) over its ``/train`` route; evictions become deletes through the source's write port and
travel to two replicas in two DCs like rows. Every ``sample_s`` the bench reads each node's
``/v1/status`` (live rows, tombstones and tombstones purged per table) and its resident
memory (``/proc/PID/status``). At the end training stops and the replicas must hold exactly
the source's rows (digests per table). The online AUC of bounded vs unbounded tables is
``ekko bench dynamic``'s trainer-alone measurement, run here on exactly the events the
cluster trained (same stream config, batch size and count), once per model seed.

Summary keys: ``row_budget``, ``distinct_ids`` (over the run, the most of any table; also
``distinct_ids_min``, ``distinct_ids_per_table``, ``tables_at_10x``, ``tables_in_budget``:
whole vocabularies that fit, and ``tables_over_budget_below_10x``), ``max_rows`` {node: the
most live rows any table held}, ``rss_slope_mb_per_min`` {node: least squares after
warm-up}, ``auc`` {``bounded``, ``unbounded``, ``scored_events`` of the first seed;
``bounded_minus_unbounded`` per seed, ``median_gap``, ``worst_gap``}, ``digests_equal``,
``tombstones_max`` (the most any node held, all tables), ``tombstones_purged`` {node: at the
end, all tables}, ``row_bytes`` {``bounded``, ``unbounded``} (embedding values in the store).
"""

from __future__ import annotations

import asyncio
import dataclasses
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
    duration_s: float = 360.0  # every table over the budget passes 10 x 2 500 ids (>= 25.1 k)
    rate: float = 1024.0  # events/s offered to the trainer (and the stream's own rate)
    batch: int = 256
    sample_s: float = 2.0
    warmup_fraction: float = 0.3  # memory slope fitted after this much of the run
    converge_s: float = 120.0
    # expected lookups per step (``ekko.train.eviction``, its default prior and patience):
    # aged LFU (at 3 x, its best aging here) kept items that had stopped for as long as their
    # counts took to halve away, and lost steady tail items they pushed out (README)
    eviction: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "rate"})
    # every new id takes a row: with ids this short-lived, count >= 2 with idle rows cost
    # 0.0007 more AUC (seed 0, trainers alone) (README)
    admission: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "all"})
    # How the stream drifts (``StreamConfig`` fields over the demo's stream): new items
    # arrive 3 x as fast and stay hot a third as long (the hot set keeps its size), and every
    # open context vocabulary (>= 1 000 ids: users, queries; not device or hour) takes new
    # ids, so each table whose ids outgrow the budget sees >= 10 x it in distinct ids.
    drift: dict[str, float] = dataclasses.field(
        default_factory=lambda: {
            "new_items_per_s": 30.0,
            "hot_lifetime_s": 40.0,
            "context_new_ids_per_s": 170.0,
        }
    )
    seeds: tuple[int, ...] = (0, 1, 2)  # model inits of the AUC pair (trainers alone)

    @classmethod
    def quick(cls) -> LifecycleSpec:
        return cls(row_budget=300, duration_s=60.0, seeds=(0,))

    @property
    def events(self) -> int:
        """What the source trains: ``duration_s`` at ``rate``, whole batches."""
        return int(self.duration_s * self.rate) // self.batch * self.batch

    @property
    def stream(self) -> StreamConfig:
        """The demo's stream at ``rate`` with ``drift``: fed to the cluster and to the AUC
        comparison."""
        return dataclasses.replace(dynamic.DEMO_STREAM, events_per_s=self.rate, **self.drift)


def _model(spec: LifecycleSpec) -> dict[str, Any]:
    return {
        "name": MODEL,
        "embedding_dim": dynamic.DEMO_MODEL.embedding_dim,
        "rows_per_table": dynamic.DEMO_MODEL.rows_per_table,
        "dense_interval_s": 1.0,
        "row_budget": spec.row_budget,
        "admission": spec.admission,
        "eviction": spec.eviction,
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
        self.trained_until = float("inf")  # seconds since the start when the feed ended

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
        batches = SyntheticStream(spec.stream).batches(spec.batch)
        start = time.monotonic()
        for _, events in zip(range(spec.events // spec.batch), batches, strict=False):
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
                "tombstones_purged": sum(v.get("tombstones_purged", 0) for v in tables.values()),
                "rows_total": sum(v["rows"] for v in tables.values()),
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
                while not feeder.done():  # it stops after spec.events (or raises)
                    t = time.monotonic() - self.started
                    row = await asyncio.to_thread(self.sample, t)
                    src = row["nodes"]["source"]
                    console.print(
                        f"{t:5.0f} s  trained {self.trained:,}  source rows/table ≤ "
                        f"{src['rows_max']:,}  tombstones {src['tombstones']:,} "
                        f"(purged {src['tombstones_purged']:,})  rss {src['rss_mb']:.0f} MB"
                    )
                    await asyncio.wait({feeder}, timeout=spec.sample_s)
                feeder.result()  # raises what stopped it
                self.trained_until = time.monotonic() - self.started
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
    began = time.monotonic()
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
        trainers = [_trainers_alone(spec, seed, Path(tmp)) for seed in spec.seeds]
    auc = _auc(spec, trainers)
    summary = _summary(spec, lifecycle, equal, auc)
    summary["wall_s"] = round(time.monotonic() - began, 1)
    details = {
        "stream": dataclasses.asdict(spec.stream),
        "trainers_alone": dict(zip((f"seed {k}" for k in spec.seeds), trainers, strict=True)),
        "samples": lifecycle.samples,
    }
    until = lifecycle.trained_until
    write_result("lifecycle", asdict(spec), summary, details, out,
                 lambda fig: _plot(fig, spec, lifecycle.samples, until))  # fmt: skip
    return {"summary": summary}


def _trainers_alone(spec: LifecycleSpec, seed: int, tmp: Path) -> dict[str, Any]:
    """``ekko bench dynamic``'s bounded and unbounded trainers on the cluster's events."""
    console.print(f"AUC, bounded vs unbounded, the same {spec.events:,} events, model seed {seed}")
    return dynamic.run(
        out=tmp / f"dynamic-{seed}.json",
        budget=spec.row_budget,
        events=spec.events,
        eviction=spec.eviction,
        admission=spec.admission,
        stream=spec.stream,
        hashed=False,
        seed=seed,
    )["summary"]


def _auc(spec: LifecycleSpec, trainers: list[dict[str, Any]]) -> dict[str, Any]:
    """The first seed's pair, and bounded minus unbounded for every seed (median, worst)."""
    first = trainers[0]
    gaps = [round(t["auc_bounded_minus_unbounded"], 4) for t in trainers]
    return {
        "bounded": first["auc"]["bounded"],
        "unbounded": first["auc"]["unbounded"],
        "scored_events": first["scored_events"],
        "seeds": list(spec.seeds),
        "bounded_minus_unbounded": gaps,
        "median_gap": round(float(np.median(gaps)), 4),
        "worst_gap": min(gaps),
    }


def _summary(
    spec: LifecycleSpec, lifecycle: _Run, equal: bool, auc: dict[str, Any]
) -> dict[str, Any]:
    late = _late(spec, lifecycle.samples, lifecycle.trained_until)
    nodes = lifecycle.nodes
    distinct = [len(d) for d in lifecycle.distinct] or [0]
    value_bytes = dynamic.DEMO_MODEL.embedding_dim * 4  # float32
    end = lifecycle.samples[-1]["nodes"]["source"]
    return {
        "row_budget": spec.row_budget,
        "distinct_ids": max(distinct),
        "distinct_ids_min": min(distinct),
        # a table whose whole vocabulary fits in the budget can never reach 10 x it
        "tables_at_10x": sum(d >= 10 * spec.row_budget for d in distinct),
        "tables_in_budget": sum(d <= spec.row_budget for d in distinct),
        "tables_over_budget_below_10x": sum(
            spec.row_budget < d < 10 * spec.row_budget for d in distinct
        ),
        "distinct_ids_per_table": distinct,
        "events": lifecycle.trained,
        # every id an unbounded table sees keeps its row to the end
        "row_bytes": {
            "bounded": end["rows_total"] * value_bytes,
            "unbounded": sum(distinct) * value_bytes,
        },
        "max_rows": {n: max(s["nodes"][n]["rows_max"] for s in lifecycle.samples) for n in nodes},
        "rss_slope_mb_per_min": {n: _rss_slope(late, n) for n in nodes},
        "auc": auc,
        "digests_equal": equal,
        "tombstones_max": max(
            s["nodes"][n]["tombstones"] for s in lifecycle.samples for n in nodes
        ),
        "tombstones_purged": {
            n: lifecycle.samples[-1]["nodes"][n]["tombstones_purged"] for n in nodes
        },
    }


def _late(spec: LifecycleSpec, samples: list[dict[str, Any]], until: float) -> list[dict]:
    """The samples after warm-up while training ran (the memory slope's)."""
    warm = spec.duration_s * spec.warmup_fraction
    return [s for s in samples if warm <= s["t"] <= until]


def _rss_slope(samples: list[dict[str, Any]], node: str) -> float:
    ts = [s["t"] for s in samples]
    return round(_slope_per_min(ts, [s["nodes"][node]["rss_mb"] for s in samples]), 2)


def _plot(fig: Figure, spec: LifecycleSpec, samples: list[dict[str, Any]], until: float) -> None:
    fig.set_size_inches(14, 4.8)
    ax_rows, ax_tomb, ax_rss = fig.subplots(1, 3)
    ts = [s["t"] for s in samples]
    late = _late(spec, samples, until)
    for i, name in enumerate(samples[0]["nodes"]):
        color = f"C{i}"
        ax_rows.plot(ts, [s["nodes"][name]["rows_max"] for s in samples], color=color, label=name)
        ax_tomb.plot(ts, [s["nodes"][name]["tombstones"] for s in samples], color=color,
                     label=f"{name} held")  # fmt: skip
        ax_tomb.plot(ts, [s["nodes"][name].get("tombstones_purged", 0) for s in samples], ":",
                     color=color, label=f"{name} purged")  # fmt: skip
        slope = _rss_slope(late, name)
        ax_rss.plot(ts, [s["nodes"][name]["rss_mb"] for s in samples], color=color,
                    label=f"{name} ({slope:+.1f} MB/min)")  # fmt: skip
    ax_rows.axhline(spec.row_budget, color="k", lw=0.8, ls="--", label="row budget")
    ax_rows.set_title("live rows (most of any table)")
    ax_tomb.set_title("tombstones (all tables)")
    ax_rss.axvline(spec.duration_s * spec.warmup_fraction, color="k", lw=0.8, ls=":")
    ax_rss.set_title("resident memory (MB), slope after warm-up")
    for ax in (ax_rows, ax_tomb, ax_rss):
        ax.set_xlabel("s")
        ax.legend(fontsize=7)
