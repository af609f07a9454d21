"""``ekko bench dynamic``: online AUC of the trainer with bounded dynamic tables vs unbounded.

The demo's stream (seed 7, 1024 events/s, new items arriving) and the demo's model (dim 8),
trained online by three trainers side by side, each scoring every batch before learning it
(prequential AUC, the signal the demo plots): ``hashed`` (today's tables, ids modulo
100 k rows), ``unbounded`` (dynamic tables, a budget above every id the run sees, admit all,
never evict) and ``bounded`` (``budget`` rows per table, the demo's count admission and LRU
unless told otherwise). The trainers step in turn, batch by batch, so their step times meet
the same machine load (each model seeds its own init: ``DLRMConfig.seed``, so runs repeat).
``ekko bench lifecycle`` runs it on the events its cluster trained, without the hashed
trainer. The store side (deletes reaching replicas, resident memory) is issue 18's ``bench
lifecycle``; this bench measures the trainer alone.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ekko.bench.report import write_result
from ekko.quality.offline import auc
from ekko.train.admission import AdmissionConfig
from ekko.train.dlrm import DLRM, DLRMConfig
from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
from ekko.train.eviction import EvictionConfig
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.sink import MemorySink
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer

console = Console(stderr=True)
DEMO_MODEL = DLRMConfig(embedding_dim=8, bottom_mlp=(64, 8), rows_per_table=100_000)
DEMO_STREAM = StreamConfig(seed=7, events_per_s=1024.0)
BATCH = 256
WARMUP_EVENTS = 30_000  # the demo trains this much before its run; not scored


class _CountingSink(MemorySink):
    """Keeps only the live key count per table (a MemorySink's dicts, without the log)."""

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.tables[table].update(dict.fromkeys(keys.tolist()))

    def delete(self, table: str, keys: np.ndarray) -> None:
        rows = self.tables[table]
        for key in keys.tolist():
            rows.pop(key, None)


DEMO_ADMISSION = {"kind": "count", "threshold": 2, "sketch_width": 1 << 16}


def variants(
    budget: int,
    unbounded_rows: int,
    eviction: str | dict = "lru",
    admission: dict | None = None,
) -> dict[str, DLRMConfig]:
    """The three trainers' models; ``admission``: ``AdmissionConfig`` fields of the bounded
    one (default: the demo's count >= 2); ``eviction``: its kind, or ``EvictionConfig``
    fields."""
    bounded = DynamicEmbeddingConfig(
        row_budget=budget,
        admission=AdmissionConfig(**(admission or DEMO_ADMISSION)),
        eviction=EvictionConfig(**eviction)
        if isinstance(eviction, dict)
        else EvictionConfig(kind=eviction),
    )
    unbounded = DynamicEmbeddingConfig(
        row_budget=unbounded_rows, eviction=EvictionConfig(kind="none")
    )
    return {
        "hashed": DEMO_MODEL,
        "unbounded": dataclasses.replace(DEMO_MODEL, dynamic=unbounded),
        "bounded": dataclasses.replace(DEMO_MODEL, dynamic=bounded),
    }


def run(
    *,
    quick: bool = False,
    out: Path | None = None,
    budget: int = 5_000,
    events: int = 0,
    eviction: str | dict = "lru",
    admission: dict | None = None,
    stream: StreamConfig = DEMO_STREAM,
    hashed: bool = True,
    seed: int = 0,
) -> dict:
    """``events`` of ``stream`` (batches of ``BATCH``; the first ``WARMUP_EVENTS`` not
    scored) through the trainers of ``variants``; ``hashed=False`` leaves that one out;
    ``seed``: every model's init (``DLRMConfig.seed``: the trainers share dense layers)."""
    torch.set_num_threads(1)
    events = events or (60_000 if quick else 200_000)
    steps = events // BATCH
    seconds = events / stream.events_per_s
    # above any id the run can draw: item ids grow by new_items_per_s, an open context
    # vocabulary's by context_new_ids_per_s
    new_ids_per_s = stream.new_items_per_s + stream.context_new_ids_per_s
    unbounded_rows = stream.max_vocab + int(seconds * new_ids_per_s) + 1_000
    configs = variants(budget, unbounded_rows, eviction, admission)
    configs = {n: dataclasses.replace(c, seed=seed) for n, c in configs.items()}
    if not hashed:
        del configs["hashed"]
    trainers, sinks = {}, {}
    for name, cfg in configs.items():
        model = DLRM(cfg)
        sinks[name] = _CountingSink()
        pub = EmbeddingPublisher(model, sinks[name], PublisherConfig(model.table_names()))
        trainers[name] = OnlineTrainer(model, publisher=pub)
    preds = {n: [] for n in configs}
    step_s = {n: [] for n in configs}
    max_store_rows = dict.fromkeys(configs, 0)
    labels, distinct = [], [set() for _ in range(DEMO_MODEL.num_sparse)]
    console.print(f"[dynamic] {steps} steps x {len(configs)} trainers, budget {budget}")
    warm = WARMUP_EVENTS // BATCH
    for i, batch in zip(range(steps), SyntheticStream(stream).batches(BATCH), strict=False):
        for f in range(DEMO_MODEL.num_sparse):
            distinct[f].update(batch.sparse[:, f].tolist())
        for name, trainer in trainers.items():
            start = time.perf_counter()
            result = trainer.step(batch)
            step_s[name].append(time.perf_counter() - start)
            if i >= warm:
                preds[name].append(result.predictions)
        if i >= warm:
            labels.append(batch.labels)
        if i % 20 == 0 or i == steps - 1:
            for name, sink in sinks.items():
                most = max((len(t) for t in sink.tables.values()), default=0)
                max_store_rows[name] = max(max_store_rows[name], most)
    y = np.concatenate(labels)
    tail = slice(len(y) // 2, None)
    results = {}
    for name, trainer in trainers.items():
        p = np.concatenate(preds[name])
        tables = trainer.model.sparse.dynamic_tables()
        stats = [t.statistics() for t in tables.values()]
        rows_alloc = max(s.row_budget for s in stats) if stats else configs[name].rows_per_table
        results[name] = {
            "auc": auc(y, p),
            "auc_second_half": auc(y[tail], p[tail]),
            "rows_allocated_per_table": rows_alloc,
            "max_rows_used_per_table": max((s.rows for s in stats), default=rows_alloc),
            "max_store_rows_per_table": max_store_rows[name],
            "admitted": sum(s.admitted for s in stats),
            "rejected": sum(s.rejected for s in stats),
            "evicted": sum(s.evicted for s in stats),
            "step_ms_p50": 1e3 * float(np.median(step_s[name])),
        }
    distinct_max = max(len(d) for d in distinct)
    summary = {
        "row_budget": budget,
        "distinct_ids_max_table": distinct_max,
        "auc": {n: round(r["auc"], 4) for n, r in results.items()},
        "auc_bounded_minus_unbounded": results["bounded"]["auc"] - results["unbounded"]["auc"],
        "max_store_rows": {n: r["max_store_rows_per_table"] for n, r in results.items()},
        "rows_saved_vs_unbounded": 1
        - results["bounded"]["max_rows_used_per_table"]
        / results["unbounded"]["max_rows_used_per_table"],
        "step_ms_p50": {n: round(r["step_ms_p50"], 1) for n, r in results.items()},
    }
    for name, r in results.items():
        console.print(f"[dynamic] {name}: {r}")
    summary["scored_events"] = [warm * BATCH, steps * BATCH]  # [first, end) of the stream
    inputs = {"events": events, "batch": BATCH, "budget": budget, "quick": quick,
              "eviction": eviction, "admission": admission or DEMO_ADMISSION, "seed": seed,
              "stream": dataclasses.asdict(stream)}  # fmt: skip
    write_result("dynamic", inputs, summary, results, out, lambda fig: _plot(fig, results))
    return {"summary": summary}


def _plot(fig, results: dict) -> None:
    names = list(results)
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(names, [results[n]["auc"] for n in names])
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("online AUC (pre-update predictions)")
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(names, [results[n]["max_store_rows_per_table"] for n in names])
    ax.set_ylabel("rows in the store, largest table")
