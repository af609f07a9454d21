"""``ekko bench scale``: issue 17's "Done when", each measured for real on this machine.

1. Capacity (``scale_load.capacity``): the model is ``key_space`` rows of table ``emb``,
   counted from the table's creation (its initial rows); every node's ``max_memory_mb`` is a
   quarter of it (+10 %). A 1-partition cluster's source refuses to start, by name; a
   4-partition cluster (a source and a holder per partition) takes every row, none refused,
   and its holders converge.
2. Update latency: a 4-partition cluster of 13 processes (4 sources; in dc1 and dc2 a holder
   of each partition, in dc1 a second holder of partition 1) serving the model takes ``rate``
   row-updates/s of ``emb``, spread over the 4 sources through the client's write streams
   (each key to its partition's source, one thread here); the replicas' write->apply
   histograms give p99 per DC; the bar is one-way delay + 25 ms.
3. Failover: under the same load, a client predicts at ``dc1-p0-r0`` (it reads partition 1
   from ``dc1-p1-r0``) while ``dc1-p1-r0``, partition 1's leader in dc1, is killed -9: its
   follower fails over to ``source-p1``, the predicts keep being answered (the scatter
   retries on the follower), and every holder's digests converge to its partition's source.
4. Serving: ``scale_serve.measure`` (4 partitions vs 1, alternated blocks, medians).
5. Training: ``sharded_train``'s measurement, 1 rank vs 2 (events/s and online AUC).

The model's rows are written by a client (``scale_cluster``): a partitioned source runs no
in-node trainer. Why no budget on the latency cluster: a replica's first fill creates every
table it learns of with 1 024 reserved rows (the source's initial rows are not on the wire),
and the model's widest dense tensor (23 488 floats) alone then needs 92 MB of a budget.
Phases run one after another, never two clusters at once (2 cores).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from ekko.bench import scale_serve, sharded_train
from ekko.bench.report import median, write_result
from ekko.bench.scale_cluster import partitioned_doc, publish, write_configs
from ekko.bench.scale_load import LOAD_TABLE, QUICK, ScaleSpec, Writer, capacity, digests
from ekko.node.config import ModelConfig
from ekko.ops.launcher import LocalCluster
from ekko.ops.live import per_dc, reset_latency
from ekko.quality.offline import auc

console = Console(stderr=True)

FRONT = "dc1-p0-r0"  # predicts during the failover (holds partition 0, reads 1 from dc1-p1-r0)
KILLED = "dc1-p1-r0"  # partition 1's leader in dc1
FOLLOWER = "dc1-p1-r1"  # its follower, the one holder of a partition past the first


# -- the partitioned cluster ------------------------------------------------------------------


def _doc(spec: ScaleSpec) -> dict[str, Any]:
    """The latency and failover cluster: the model's tables and ``emb``, no budget."""
    doc = partitioned_doc(
        spec.model(), partitions=spec.partitions, dcs=len(spec.wan_delay_ms), replicas=2,
        shards=spec.shards, wan_delay_ms=list(spec.wan_delay_ms),
        sync={"snapshot_interval_s": 0, "failover_probe_s": 0.5},
    )  # fmt: skip
    doc["tables"].append({"name": LOAD_TABLE, "dim": spec.dim, "shards": spec.shards})
    # one holder of each partition per DC, and in dc1 a follower of partition 1 (the one that
    # fails over): 13 processes on 2 cores
    doc["nodes"] = [
        n for n in doc["nodes"] if not n["name"].endswith("-r1") or n["name"] == FOLLOWER
    ]
    for n in doc["nodes"]:
        n["serve"] = n["name"] == FRONT
    return doc


def _latency(cluster: LocalCluster, writer: Writer, spec: ScaleSpec) -> list[dict[str, Any]]:
    blocks = []
    for b in range(spec.blocks):
        reset_latency(cluster)
        sent0, t0 = writer.sent, time.monotonic()
        time.sleep(spec.measure_s)  # the cluster runs under load while we wait
        rate = (writer.sent - sent0) / (time.monotonic() - t0)
        dcs = per_dc(cluster)
        blocks.append({"rate_rows_per_s": rate, "per_dc": dcs})
        shown = ", ".join(f"{d['dc']} p99 {d['p99_ms']:.1f} ms" for d in dcs)
        console.print(f"[scale] latency block {b + 1}/{spec.blocks}: {rate:.0f} rows/s; {shown}")
    return blocks


# -- failover ---------------------------------------------------------------------------------


class Predictor(threading.Thread):
    """Posts a predict to ``FRONT`` every 50 ms; each answer's time and status."""

    def __init__(self, cluster: LocalCluster, model: ModelConfig) -> None:
        super().__init__(daemon=True, name="scale-predictor")
        rng = np.random.default_rng(3)
        self.body = {"dense": rng.random((32, model.num_dense)).round(3).tolist(),
                     "sparse": rng.integers(0, 10**6, (32, model.num_sparse)).tolist()}  # fmt: skip
        self.url = cluster.url(FRONT, f"/v1/models/{model.name}/predict")
        self.client = cluster.http.client(auth=cluster.auth, timeout=5.0)
        self.stop_event = threading.Event()
        self.answers: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                status = self.client.post(self.url, json=self.body).status_code
            except httpx.HTTPError:
                status = 0
            self.answers.append((time.monotonic(), status))
            self.stop_event.wait(0.05)
        self.client.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _failover(cluster: LocalCluster, writer: Writer, spec: ScaleSpec) -> dict[str, Any]:
    model = spec.model()
    pred = Predictor(cluster, model)
    pred.start()
    time.sleep(2.0)  # answers before the kill
    killed_at = time.monotonic()
    cluster.kill(KILLED)
    console.print(f"[scale] failover: kill -9 {KILLED}; predicting at {FRONT}")
    time.sleep(spec.failover_s)  # the load and the predicts go on
    writer.stop()
    pred.stop()
    before = [s for t, s in pred.answers if t < killed_at]
    after = [s for t, s in pred.answers if t >= killed_at]
    cfg = cluster.config
    alive = [n.name for n in cfg.nodes if n.name != KILLED and n.dc != "train"]
    t0 = time.monotonic()
    unequal: list[str] = []
    while time.monotonic() - t0 < spec.converge_s:
        want = {p: digests(cluster, cfg.source_of(p).name) for p in range(spec.partitions)}
        unequal = [n for n in alive if digests(cluster, n) != want[cfg.held(n)[0]]]
        if not unequal:
            break
        time.sleep(0.5)  # other processes catch up
    follower = cluster.get(FOLLOWER, "/v1/status")["upstream"]
    out = {
        "killed": KILLED,
        "predicts_before": _answers(before),
        "predicts_after": _answers(after),
        "follower_upstream": follower,
        "converged_s": time.monotonic() - t0 if not unequal else None,
        "unequal": unequal,
        "scatter_metrics": _scatter_metrics(cluster),
    }
    out["digests_equal"] = not unequal
    out["follower_failed_over"] = follower == cfg.source_of(1).name
    out["serving_stayed_up"] = 0 < after.count(200) == len(after)
    out["converged"] = all(
        out[k] for k in ("digests_equal", "follower_failed_over", "serving_stayed_up")
    )
    console.print(f"[scale] failover: {out}")
    return out


def _answers(statuses: list[int]) -> dict[str, Any]:
    ok = statuses.count(200)
    return {"answered": ok, "other": len(statuses) - ok, "statuses": sorted(set(statuses))}


def _scatter_metrics(cluster: LocalCluster) -> list[str]:
    with cluster.http.client(auth=cluster.auth, timeout=10) as c:
        text = c.get(cluster.url(FRONT, "/metrics")).text
    return [
        ln for ln in text.splitlines() if ln.startswith("ekko_scatter_") and "_created" not in ln
    ]


# -- the run ----------------------------------------------------------------------------------


def partitioned(spec: ScaleSpec, tmp: Path) -> dict[str, Any]:
    """Latency and failover, on one 4-partition cluster serving the model."""
    doc = _doc(spec)
    path, configs = write_configs(doc, spec.model(), tmp / "p4")
    cluster = LocalCluster(path, node_configs=configs)
    writer: Writer | None = None
    try:
        t0 = time.monotonic()
        cluster.start(timeout=180)
        console.print(f"[scale] {len(doc['nodes'])} nodes up in {time.monotonic() - t0:.0f} s")
        publish(cluster, spec.model())
        writer = Writer(cluster, spec)
        writer.start()
        console.print(f"[scale] load {spec.rate:.0f} rows/s over {spec.partitions} sources; "
                      f"warm-up {spec.warm_s:g} s")  # fmt: skip
        time.sleep(spec.warm_s)  # the cluster runs under load while we wait
        blocks = _latency(cluster, writer, spec)
        failover = _failover(cluster, writer, spec)
        refusals = [n.name for n in cluster.config.nodes
                    if n.name != KILLED and not cluster.procs[n.name].alive]  # fmt: skip
    finally:
        if writer is not None and writer.is_alive():
            writer.stop()
        cluster.stop_all()
    return {
        "nodes": len(doc["nodes"]),
        "nodes_exited": refusals, "latency_blocks": blocks, "failover": failover,
        "writer_error": writer.error if writer else None,
        "rows_acknowledged": writer.acked() if writer else 0,
    }  # fmt: skip


def training(spec: ScaleSpec) -> dict[str, Any]:
    """``sharded_train``'s 1-rank trainer vs 2 ranks on the same stream, mirrored order."""
    import torch

    torch.set_num_threads(1)
    order = ["1", "2"] if spec.quick else ["1", "2", "2", "1"]
    rates: dict[str, list[float]] = {"1": [], "2": []}
    preds: dict[str, Any] = {}
    labels = None
    for i, name in enumerate(order):
        console.print(f"[scale] training {i + 1}/{len(order)}: {name} rank(s), "
                      f"{spec.train_events} events")  # fmt: skip
        if name == "1":
            got = sharded_train._one_rank(spec.train_events)
            labels = got["labels"]
        else:
            got = sharded_train._sharded(2, spec.train_events)
        rates[name].append(got["events_per_s"])
        preds[name] = got["predictions"]
    return {
        "events_per_s": {k: float(np.mean(v)) for k, v in rates.items()},
        "events_per_s_runs": rates,
        "auc": {k: auc(labels, p) for k, p in preds.items()},
        "order": order,
    }


def run(*, quick: bool = False, out: Path | None = None, rate: float | None = None) -> dict:
    spec = QUICK if quick else ScaleSpec()
    if rate is not None:
        spec = dataclasses.replace(spec, rate=float(rate))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ekko-bench-scale-") as tmp:
        cap = capacity(spec, Path(tmp))
        part = partitioned(spec, Path(tmp))
    console.print("[scale] serving: 4 partitions vs 1 (scale_serve, alternated blocks)")
    serve_spec = scale_serve.ScaleServeSpec()
    if quick:
        serve_spec = scale_serve.ScaleServeSpec(rows_per_table=5_000, blocks=2, warm_s=1.0,
                                                measure_s=4.0)  # fmt: skip
    serve = scale_serve.measure(serve_spec)
    train = training(spec)
    summary, context = _summary(spec, cap, part, serve["summary"], train)
    console.print(f"[scale] {summary}\n[scale] {context}")
    inputs = asdict(spec) | {"serve": asdict(serve_spec), "loadavg_before": load_before,
                             "loadavg_after": os.getloadavg()}  # fmt: skip
    details = {
        "context": context,
        "capacity": cap,
        "partitioned": part,
        "serve": serve,
        "train": train,
    }
    write_result("scale", inputs, summary, details, out,
                 lambda fig: _plot(fig, summary, context))  # fmt: skip
    return {"summary": summary}


def _summary(
    spec: ScaleSpec, cap: dict, part: dict, serve: dict, train: dict
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The issue's summary keys, exactly, and beside them (``details.context``) what they
    were measured under and the bars."""
    blocks = part["latency_blocks"]
    per_dc = [
        {"dc": d["dc"], "one_way_delay_ms": d["one_way_delay_ms"],
         "p99_ms": median([b["per_dc"][i]["p99_ms"] for b in blocks])}
        for i, d in enumerate(blocks[0]["per_dc"])
    ]  # fmt: skip
    summary = {
        "partitions": spec.partitions,
        "refused_on_one": bool(cap["one_partition"]["refused"]),
        "per_dc": per_dc,
        "predict_p99_ms": serve["predict_p99_ms"],
        "train_events_per_s": {k: round(v) for k, v in train["events_per_s"].items()},
        "auc_by_ranks": {k: round(v, 4) for k, v in train["auc"].items()},
        "failover_converged": bool(part["failover"]["converged"]),
    }
    context = {
        "update_rate_rows_per_s": median([b["rate_rows_per_s"] for b in blocks]),
        "update_rate_asked": spec.rate,
        "bar_p99_le_delay_plus_25ms": all(
            d["p99_ms"] <= d["one_way_delay_ms"] + 25 for d in per_dc
        ),
        "bar_predict_p99_ratio_le_1_3": serve["bar_p99_ratio_le_1_3"],
        "auc_2_minus_1": train["auc"]["2"] - train["auc"]["1"],
        "model_mb": round(cap["model_mb"], 1),
        "budget_mb": cap["budget_mb"],
        "capacity_runs_on_4": cap["four_partitions"]["runs"],
        "predict_p99_ms_local": serve["predict_p99_ms_local"],
        "predict_p99_ratio_4_to_1": serve["p99_ratio_4_to_1"],
    }
    return summary, context


def _plot(fig: Any, summary: dict[str, Any], context: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 3, 1)
    dcs = summary["per_dc"]
    x = np.arange(len(dcs))
    ax.bar(x, [d["p99_ms"] for d in dcs], 0.5, label="update p99")
    ax.scatter(x, [d["one_way_delay_ms"] + 25 for d in dcs], color="r", marker="_", s=900,
               label="bar: delay + 25 ms", zorder=3)  # fmt: skip
    ax.set_xticks(x, [f"{d['dc']} ({d['one_way_delay_ms']:.0f} ms)" for d in dcs])
    ax.set_ylabel("ms")
    ax.set_title(f"update latency, {context['update_rate_rows_per_s'] / 1e3:.0f} k rows/s",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 2)
    p = summary["predict_p99_ms"]
    ax.bar(["1 partition", "4 partitions"], [p["1"], p["4"]], color=["tab:blue", "tab:orange"])
    ax.axhline(p["1"] * 1.3, color="k", ls="--", lw=1, label="bar: 1.3 x")
    ax.set_ylabel("predict p99, ms")
    ax.set_title("scatter-gather serving", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 3)
    t = summary["train_events_per_s"]
    a = summary["auc_by_ranks"]
    ax.bar(["1 rank", "2 ranks"], [t["1"], t["2"]], color="tab:green")
    for i, k in enumerate(("1", "2")):
        ax.text(i, t[k], f"AUC {a[k]:.4f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("training events/s")
    ax.set_title("sharded training (2 cores)", fontsize=9)
