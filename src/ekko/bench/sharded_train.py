"""Sharded training throughput: events/s of 2 ranks vs 1 on the same stream (issue 17).

Not a test: it measures wall time. Three trainers run the same seeded stream and model, each
with one torch thread: the 1-rank ``OnlineTrainer`` (in this process), and ``train_rank`` with
W = 1 and W = 2 rank processes (gloo). Runs go in mirrored order (A B C, then C B A) so drift
in the machine's load hits all alike; events/s count the steps after the first (process start,
imports, the model's construction and the stream's batches, drawn before, excluded) and are
averaged over the runs. The online AUC
(predictions before learning) of each is reported: the sharded math is the 1-rank trainer's.

The ceiling on this machine: 2 ranks on 2 cores can at most double the 1-rank rate, less the
exchanges (four ``all_to_all`` and one ``all_reduce`` per step, each a rendezvous of both
processes), the work every rank repeats per step whatever its slice (optimizer calls per
table, the per-table lookups), and whatever else the cores run.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ekko.bench.report import write_result
from ekko.quality.offline import auc
from ekko.train.dlrm import DLRM, DLRMConfig
from ekko.train.sharded import ShardedRunSpec, train_rank
from ekko.train.sharded_launch import ShardedRun
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig

console = Console(stderr=True)

MODEL = DLRMConfig()  # the demo's shape: 26 tables of 100 000 rows x 16
STREAM = StreamConfig(seed=7)
BATCH = 1024
ADAGRAD = TrainerConfig(optimizer="adagrad")


def _one_rank(events: int) -> dict[str, Any]:
    trainer = OnlineTrainer(DLRM(MODEL), ADAGRAD)
    steps = events // BATCH
    batches = list(itertools.islice(SyntheticStream(STREAM).batches(BATCH), steps))
    predictions, labels = [], []
    started = cpu_started = 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            started, cpu_started = time.perf_counter(), time.process_time()
        predictions.append(trainer.step(batch).predictions)
        labels.append(batch.labels)
    seconds = time.perf_counter() - started
    return {
        "events_per_s": (steps - 1) * BATCH / seconds,
        "cpu_ms_per_step": 1e3 * (time.process_time() - cpu_started) / (steps - 1),
        "predictions": np.concatenate(predictions),
        "labels": np.concatenate(labels),
    }


def _sharded(world: int, events: int) -> dict[str, Any]:
    spec = ShardedRunSpec(MODEL, STREAM, events, BATCH, ADAGRAD, pregenerate=True)
    with ShardedRun(train_rank, world, (spec,), timeout_s=120) as run:
        reports = run.join()
    seconds = max(r.seconds_after_first for r in reports)
    steps = reports[0].steps
    predictions = [np.concatenate([r.predictions[s] for r in reports]) for s in range(steps)]
    return {
        "events_per_s": reports[0].events_after_first / seconds,
        "cpu_ms_per_step": 1e3 * max(r.cpu_seconds_after_first for r in reports) / (steps - 1),
        "predictions": np.concatenate(predictions),
    }


def run(*, quick: bool = False, out: Path | None = None, events: int = 0) -> dict:
    torch.set_num_threads(1)
    events = events or (40_960 if quick else 204_800)
    order = ["1", "sharded_1", "2"]
    order = order if quick else order + order[::-1]
    rates: dict[str, list[float]] = {name: [] for name in order}
    cpu_ms: dict[str, list[float]] = {name: [] for name in order}
    preds: dict[str, np.ndarray] = {}
    labels = np.empty(0)
    for name in order:
        console.print(f"[sharded_train] {name}: {events} events, batch {BATCH}")
        if name == "1":
            got = _one_rank(events)
            labels = got["labels"]
        else:
            got = _sharded(1 if name == "sharded_1" else 2, events)
        rates[name].append(got["events_per_s"])
        cpu_ms[name].append(got["cpu_ms_per_step"])
        preds[name] = got["predictions"]
    per_s = {name: float(np.mean(r)) for name, r in rates.items()}
    cpu = {name: float(np.mean(c)) for name, c in cpu_ms.items()}
    aucs = {name: auc(labels, p) for name, p in preds.items()}
    summary = {
        "train_events_per_s": {"1": round(per_s["1"]), "2": round(per_s["2"])},
        "sharded_1_rank_events_per_s": round(per_s["sharded_1"]),
        "speedup_2_vs_1": round(per_s["2"] / per_s["1"], 3),
        # CPU of the busiest process per step: the rate were each process given a core alone
        "cpu_ms_per_step": {name: round(c, 2) for name, c in cpu.items()},
        "events_per_s_if_a_core_each": {name: round(BATCH / c * 1e3) for name, c in cpu.items()},
        "auc_by_ranks": {"1": round(aucs["1"], 4), "2": round(aucs["2"], 4)},
        "auc_2_minus_1": aucs["2"] - aucs["1"],
    }
    console.print(f"[sharded_train] {summary}")
    inputs = {"events": events, "batch": BATCH, "quick": quick, "threads_per_process": 1}
    details = {"events_per_s_runs": rates, "cpu_ms_runs": cpu_ms, "auc": aucs, "order": order}
    write_result("sharded_train", inputs, summary, details, out, lambda fig: _plot(fig, rates))
    return {"summary": summary}


def _plot(fig, rates: dict[str, list[float]]) -> None:  # type: ignore[no-untyped-def]
    ax = fig.add_subplot(1, 1, 1)
    names = list(rates)
    ax.bar(names, [float(np.mean(rates[n])) for n in names])
    ax.set_ylabel("events/s (steps after the first)")
    ax.set_title("online training: 1-rank trainer, sharded W=1, sharded W=2 (1 thread each)")
