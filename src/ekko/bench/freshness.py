"""``ekko bench freshness``: online AUC and log loss of one model served under several update
delays, side by side, on the synthetic stream and on MovieLens-100k.

Design. One online trainer (``OnlineTrainer`` over a ``DLRM``) learns the stream one batch at
a time; its ``EmbeddingPublisher`` writes exactly the changed rows (and the dense tensors,
after every step) into a real source ``Store`` through ``WritePort``. Every delay variant is a
replica ``Store`` served by a ``ReplicaModel``:

- ``in_process``: no replica; the trainer's own predictions, made before it learns the batch
  (delay 0, the ceiling).
- ``ekko``: the replica pulls from the source through the real sync protocol (``Responder`` +
  ``Puller``, long-poll) over a simulated WAN link: each message takes 100 ms one way plus an
  exponential jitter of mean 5 ms, in order per direction like a TCP connection (the README
  measures p50 ~ delay + 5 ms, p99 ~ delay + 10-30 ms on real sockets). The source is woken
  once per publish, after all its tables are written, as the node's ``LoopSink`` does. Pulls:
  a window of 4 and a long-poll wait of 10 min (the node defaults to 32 and 1 s). A parked
  pull is answered the moment the source moves, so the wait never adds latency; a 1 s wait
  would only make the simulation replay MovieLens' idle hours as millions of empty polls.
- fixed delays (``10s``, ``1min``, ``10min``): every published batch of rows (with the
  versions the source gave it) reaches the replica exactly ``delay`` after it was written and
  is applied there last-version-wins, as the sync protocol would.

Everything runs on one simulated clock: stream time. The trainer learns a batch when its last
event is over and publishes at that event's time. Before a batch is learned, every variant
scores it from its replica: each event is scored by the replica's state *at the event's
time*, so an update that lands in the middle of a batch (Ekko's 100 ms inside a 1 s batch)
serves the events after it and not those before (a variant is re-run only at the moments its
store changes). The labels then score every variant on the same events: AUC (exact, by
ranks) and log loss over the run after a warm-up (longer than the largest delay, so every
variant is in steady state), and a time series of AUC per interval for the plot.

Replicas start from the source's snapshot of the initial model (``Store.save`` /
``Store.load``), as a new replica would; the trainer's first publish writes every row
(``EmbeddingPublisher.snapshot``) so a replica answers ids training has not touched yet.

Time mapping. The synthetic stream runs at 1024 events per simulated second with 1024-event
batches, so the trainer steps once per simulated second, for 45 simulated minutes (warm-up
15 minutes). MovieLens-100k is replayed on its own timeline (delays in real seconds of its
timestamps, 7 months, one event per ~3 minutes on average, but bursty: 57 % of consecutive
ratings share a 10 s window), in batches of 64 events; a batch's span is whatever its
timestamps say. ``--quick`` compresses the synthetic stream's time constants and its fixed
delays by 10x (the WAN delay stays 100 ms) and replays a prefix of MovieLens with the real
delays; the JSON says so.

Modules: ``freshness_setup`` (setups, the stream they open, results), ``freshness_replicas``
(the replicas and the event-time scorer), this one (the run, its summary and plot).
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ekko.bench.freshness_replicas import (
    DelayedReplica,
    EventTimeScorer,
    SimClock,
    SyncedReplica,
    TapSink,
)
from ekko.bench.freshness_setup import (
    AUC_BAR,
    EKKO,
    IN_PROCESS,
    FreshnessRun,
    FreshnessSetup,
    VariantResult,
    default_setups,
    open_stream,
    setup_json,
)
from ekko.bench.report import write_result
from ekko.quality.offline import auc, log_loss
from ekko.quality.windowed import WindowedQuality
from ekko.schedule.write_port import WritePort
from ekko.serve.replica import ReplicaModel
from ekko.store import Store
from ekko.train.dlrm import DLRM
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.trainer import OnlineTrainer

console = Console(stderr=True)

# -- one stream ------------------------------------------------------------------------------


def run_stream(setup: FreshnessSetup, *, show_progress: bool = True) -> FreshnessRun:
    """Train once over ``setup``'s stream and score every delay variant side by side."""
    start_wall = time.perf_counter()
    batches, total, stream_info = open_stream(setup)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"stream {setup.stream} is empty")
    t0 = float(first.ts[0])
    end_pad = float(stream_info["batch_end_after_last_event_s"])
    clock = [0.0]  # simulated seconds since the first event

    model = DLRM(setup.model)
    source = Store()
    port = WritePort(source, clock=SimClock(lambda: clock[0]))
    tap = TapSink(port, lambda: clock[0])
    publisher = EmbeddingPublisher(
        model,
        tap,
        PublisherConfig(
            table_names=model.table_names(),
            embedding_shards=setup.embedding_shards,
            dense_interval_s=0.0,  # dense tensors after every step
        ),
        clock=lambda: clock[0],
    )
    publisher.snapshot()  # the initial model, every row: replicas start from it
    trainer = OnlineTrainer(model, setup.trainer, publisher)

    replicas: dict[str, Store] = {}
    with tempfile.TemporaryDirectory(prefix="ekko-freshness-") as tmp:
        snap = Path(tmp) / "source.snap"
        source.save(snap)
        for name in setup.variants[1:]:
            replicas[name] = Store.load(snap)
    synced = SyncedReplica(
        source, replicas[EKKO], setup.wan, setup.puller, now=0.0, responder_config=setup.responder
    )
    delayed: dict[str, DelayedReplica] = {}
    for name, delay in setup.fixed_delays_s:
        delayed[name] = DelayedReplica(replicas[name], delay)
        tap.delayed.append(delayed[name])
    scorers = {
        EKKO: EventTimeScorer(ReplicaModel(replicas[EKKO], setup.model, EKKO), synced.advance)
    }
    for name, rep in delayed.items():
        scorers[name] = EventTimeScorer(
            ReplicaModel(replicas[name], setup.model, name), rep.advance
        )

    series_q = {name: WindowedQuality(setup.series_s, buckets=1) for name in setup.variants}
    series: dict[str, list[dict[str, float | None]]] = {name: [] for name in setup.variants}
    next_cut = setup.series_s
    kept_preds: dict[str, list[np.ndarray]] = {name: [] for name in setup.variants}
    kept_labels: list[np.ndarray] = []
    kept_times: list[np.ndarray] = []
    events_seen = 0
    n_batches = 0
    t_last = 0.0

    progress = Progress(
        TextColumn(f"[freshness] {setup.stream}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} batches"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task("train", total=total, status="")
        for events in itertools.chain([first], batches):
            t = np.asarray(events.ts, np.float64) - t0
            preds = {name: sc.score(events, t) for name, sc in scorers.items()}
            # The batch is over and its labels are in: learn and publish now.
            clock[0] = float(t[-1]) + end_pad
            synced.advance(clock[0], _no_events)  # nothing left to score before the publish
            preds[IN_PROCESS] = trainer.step(events).predictions
            # One wake-up per publish, after all its tables were written, as the node's
            # LoopSink drains a publish and then calls notify_written once.
            synced.source_changed()
            labels = events.labels
            while t[-1] >= next_cut:
                for name in setup.variants:
                    snap_q = series_q[name].take_interval(next_cut)
                    series[name].append(
                        {
                            "t_s": next_cut,
                            "auc": _none(snap_q.auc),
                            "log_loss": _none(snap_q.log_loss),
                            "events": snap_q.count,
                        }
                    )
                next_cut += setup.series_s
            for name in setup.variants:
                series_q[name].update(preds[name], labels, now=float(t[-1]))
            keep = t >= setup.warmup_s
            if keep.any():
                for name in setup.variants:
                    kept_preds[name].append(np.asarray(preds[name][keep], np.float32))
                kept_labels.append(labels[keep])
                kept_times.append(t[keep])
            events_seen += len(t)
            n_batches += 1
            t_last = float(t[-1])
            if n_batches % 50 == 0 or n_batches == total:
                progress.update(task, completed=n_batches, status=_status(kept_preds, kept_labels))
    publisher.close()

    labels_all = np.concatenate(kept_labels) if kept_labels else np.empty(0, np.float32)
    times_all = np.concatenate(kept_times) if kept_times else np.empty(0)
    predictions = {
        name: np.concatenate(p) if p else np.empty(0, np.float32) for name, p in kept_preds.items()
    }
    variants = {
        name: VariantResult(
            name=name,
            auc=auc(labels_all, predictions[name]) if len(labels_all) else math.nan,
            log_loss=log_loss(labels_all, predictions[name]) if len(labels_all) else math.nan,
            events=len(labels_all),
            series=series[name],
        )
        for name in setup.variants
    }
    stream_info["scorer_predict_calls"] = {name: sc.predicts for name, sc in scorers.items()}
    return FreshnessRun(
        setup=setup,
        variants=variants,
        predictions=predictions,
        labels=labels_all,
        times=times_all,
        source=source,
        replicas=replicas,
        delayed=delayed,
        synced=synced,
        ekko_latency=synced.puller.latency.summary(),
        ekko_messages=synced.messages,
        batches=n_batches,
        events=events_seen,
        stream_seconds=t_last,
        wall_s=time.perf_counter() - start_wall,
        stream_info=stream_info,
    )


def _no_events(_at: float) -> None:
    pass


def _none(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def _status(kept_preds: dict[str, list[np.ndarray]], kept_labels: list[np.ndarray]) -> str:
    """AUC of each variant over the last few kept batches (progress display only)."""
    if not kept_labels:
        return "warm-up"
    y = np.concatenate(kept_labels[-50:])
    parts = [f"{name} {auc(y, np.concatenate(p[-50:])):.4f}" for name, p in kept_preds.items()]
    return " ".join(parts)


# -- the bench -------------------------------------------------------------------------------


def summarize(runs: dict[str, FreshnessRun]) -> dict[str, Any]:
    """The bench's ``summary`` from one run per stream."""
    auc_by = {s: {n: _none(v.auc) for n, v in r.variants.items()} for s, r in runs.items()}
    ll_by = {s: {n: _none(v.log_loss) for n, v in r.variants.items()} for s, r in runs.items()}
    diff_ip = {s: _diff(a.get(EKKO), a.get(IN_PROCESS)) for s, a in auc_by.items()}
    syn = auc_by.get("synthetic", {})
    ekko_1min = _diff(syn.get(EKKO), syn.get("1min"))
    ekko_10min = _diff(syn.get(EKKO), syn.get("10min"))
    within = [abs(d) <= AUC_BAR if d is not None else False for d in diff_ip.values()]
    return {
        "auc_by_delay": auc_by,
        "logloss_by_delay": ll_by,
        "ekko_minus_1min_auc": ekko_1min,
        "ekko_minus_10min_auc": ekko_10min,
        "ekko_minus_in_process_auc": diff_ip,
        "ekko_update_latency_ms": {s: r.ekko_latency for s, r in runs.items()},
        f"bar_ekko_within_{AUC_BAR}_of_in_process": bool(within) and all(within),
        "bar_ekko_above_1min_and_10min_synthetic": (
            ekko_1min is not None and ekko_10min is not None and ekko_1min > 0 and ekko_10min > 0
        ),
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _block_diffs(run: FreshnessRun, a: str, b: str) -> dict[str, float | None]:
    """AUC(a) - AUC(b) per series interval after the warm-up: mean and its standard error
    (intervals as independent blocks), and the share of intervals where a wins."""
    pairs = [
        (x["auc"], y["auc"])
        for x, y in zip(run.variants[a].series, run.variants[b].series, strict=True)
        if x["t_s"] > run.setup.warmup_s and x["auc"] is not None and y["auc"] is not None
    ]
    if len(pairs) < 2:
        return {"intervals": len(pairs), "mean": None, "se": None, "share_a_wins": None}
    d = np.array([x - y for x, y in pairs])
    return {
        "intervals": len(d),
        "mean": float(d.mean()),
        "se": float(d.std(ddof=1) / np.sqrt(len(d))),
        "share_a_wins": float(np.mean(d > 0)),
    }


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    """Run both streams, write ``bench/results/freshness.json`` (or ``out``) and a PNG."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setups = default_setups(quick)
        runs = {s.stream: run_stream(s) for s in setups}
    finally:
        torch.set_num_threads(threads)
    summary = summarize(runs)
    for stream, r in runs.items():
        console.print(
            f"[freshness] {stream}: "
            + ", ".join(f"{n} AUC {v.auc:.4f}" for n, v in r.variants.items())
            + f" ({r.wall_s:.0f} s wall)"
        )
    inputs = {
        "quick": quick,
        "time_scale": 0.1 if quick else 1.0,
        "note": (
            "quick: the synthetic stream's time constants and its fixed delays are compressed "
            "10x (10s/1min/10min are 1 s/6 s/60 s of stream time); the WAN delay stays 100 ms; "
            "MovieLens is a prefix of its timeline with the real delays"
            if quick
            else "delays are in simulated stream seconds (MovieLens: its own timestamps)"
        ),
        "setups": {s.stream: setup_json(s) for s in setups},
    }
    details = {
        stream: {
            "batches": r.batches,
            "events": r.events,
            "events_scored_after_warmup": len(r.labels),
            "stream_seconds": r.stream_seconds,
            "wall_s": r.wall_s,
            "stream": r.stream_info,
            "ekko_link_messages": r.ekko_messages,
            "ekko_minus_1min_auc_by_interval": _block_diffs(r, EKKO, "1min"),
            "ekko_minus_in_process_auc_by_interval": _block_diffs(r, EKKO, IN_PROCESS),
            "replica_rows": {
                n: sum(t.rows for t in s.tables.values()) for n, s in r.replicas.items()
            },
            "series": {n: v.series for n, v in r.variants.items()},
        }
        for stream, r in runs.items()
    }
    write_result("freshness", inputs, summary, details, out, lambda fig: _plot(fig, runs))
    return {"summary": summary}


_COLORS = {
    IN_PROCESS: "k",
    EKKO: "tab:green",
    "10s": "tab:blue",
    "1min": "tab:orange",
    "10min": "tab:red",
}


def _plot(fig: Figure, runs: dict[str, FreshnessRun]) -> None:
    fig.set_size_inches(14, 5)
    syn = runs.get("synthetic")
    ax = fig.add_subplot(1, 3, 1)
    if syn is not None:
        for name, v in syn.variants.items():
            xs = [p["t_s"] / 60 for p in v.series if p["auc"] is not None]
            ys = [p["auc"] for p in v.series if p["auc"] is not None]
            ax.plot(xs, ys, label=name, color=_COLORS.get(name), lw=1.2)
        ax.axvline(syn.setup.warmup_s / 60, color="gray", ls=":", lw=1)
        ax.set_xlabel("stream time, min (dotted: end of warm-up)")
        ax.set_ylabel(f"AUC per {syn.setup.series_s:.0f} s")
        ax.set_title("synthetic: online AUC over time")
        ax.legend(fontsize=8)
    for i, (stream, r) in enumerate(runs.items()):
        ax = fig.add_subplot(1, 3, 2 + i)
        names = list(r.variants)
        vals = [r.variants[n].auc for n in names]
        ax.bar(range(len(names)), vals, color=[_COLORS.get(n, "tab:gray") for n in names])
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(hi - lo, 0.002)
            ax.set_ylim(lo - pad, hi + 0.5 * pad)
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.4f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel("AUC after warm-up")
        ax.set_title(f"{stream}: AUC by update delay")
    fig.suptitle("Freshness: one trainer, every replica scored on the same events")
