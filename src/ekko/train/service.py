"""The online trainer as a service: labelled event batches in, published rows out.

The source node runs one ``TrainingService`` per configured model. Batches arrive (over
HTTP, ``ekko.train.routes``) into a bounded queue; one worker thread trains on them in order
and the publisher hands each step's changed rows to a ``Sink``. The node passes a sink that
moves the writes onto its event loop, so the store is only ever touched by one thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ekko.quality.windowed import WindowedQuality
from ekko.store.spec import Sink
from ekko.train.dlrm import DLRM, DLRMConfig, dense_table_name
from ekko.train.memory_budget import MemoryBudgetStatistics
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.slots import SlotStatistics
from ekko.train.streams import Events
from ekko.train.trainer import REJECT_REASONS, OnlineTrainer, TrainerConfig

log = logging.getLogger(__name__)

StoredRows = Callable[[str], tuple[np.ndarray, np.ndarray] | None]
"""``stored(table) -> (keys int64 [n], values float32 [n, dim])``: every row a store holds
of ``table``, or None when it holds none."""


LOAD_ROUNDS = 64


def _interleaved(
    rows: dict[str, tuple[np.ndarray, np.ndarray]],
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``rows`` as ``LOAD_ROUNDS`` rounds of a slice of every table's (each table's rows in
    equal parts). Why: dynamic tables sharing a memory budget take rows while it has room, so
    loaded table by table, a store holding more than fits (a budget lowered since) left the
    first tables whole and the last ones empty; loaded in rounds, each keeps its share of
    what fits (its part of the store's rows, to a round's slice)."""
    size = {table: -(-len(keys) // LOAD_ROUNDS) for table, (keys, _) in rows.items()}
    for r in range(LOAD_ROUNDS):
        for table, (keys, values) in rows.items():
            a, b = r * size[table], (r + 1) * size[table]
            if a < len(keys):
                yield table, keys[a:b], values[a:b]


class TrainerBusy(RuntimeError):
    """The training queue is full: the caller should retry later (HTTP 503)."""


@dataclass(frozen=True)
class TrainingStats:
    """Counters of one training service, read by the status page and Prometheus."""

    model: str
    batches: int
    events: int
    queued: int
    refused: int
    train_seconds: float
    publish_seconds: float
    rows_published: int
    last_loss: float
    failed: str | None
    paused: str | None
    dropped_events: int
    rejected_steps: dict[str, int]  # steps undone (model kept finite), by REJECT_REASONS key
    # rows, admitted, rejected, evicted of each dynamic table (none: hashed tables)
    dynamic_tables: dict[str, SlotStatistics] = field(default_factory=dict)
    # the dynamic tables' shared byte budget (none: DLRMConfig.memory_budget_bytes unset)
    memory_budget: MemoryBudgetStatistics | None = None


class TrainingService:
    """Trains one DLRM online on the batches it is given and publishes every step.

    Why a worker thread and a queue: a training step takes milliseconds to tens of
    milliseconds of torch work; run on the node's event loop it would stall sync and HTTP.
    The queue is bounded so a producer faster than the trainer gets ``TrainerBusy`` instead
    of unbounded memory and ever-growing update latency.

    Args:
        name: the model's name (for logs and metrics).
        config: DLRM shape.
        sink: receives the published rows (called from the worker thread).
        trainer: optimizer and learning rates.
        embedding_shards: shards per embedding table in the store.
        dense_interval_s: dense tensors are published at most this often.
        max_queue: batches waiting at most; more raise ``TrainerBusy``.
        window_s: span of the trainer's own windowed quality (pre-update predictions).
        clock: monotonic seconds, for the quality windows.
    """

    def __init__(
        self,
        name: str,
        config: DLRMConfig,
        sink: Sink,
        *,
        trainer: TrainerConfig | None = None,
        embedding_shards: int = 16,
        dense_interval_s: float = 1.0,
        max_queue: int = 64,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.model = DLRM(config)
        self.publisher = EmbeddingPublisher(
            self.model,
            sink,
            PublisherConfig(
                table_names=self.model.table_names(),
                dense_prefix=dense_table_name("", config.table_namespace),
                embedding_shards=embedding_shards,
                dense_interval_s=dense_interval_s,
            ),
        )
        self.trainer = OnlineTrainer(self.model, trainer, self.publisher)
        self.quality = WindowedQuality(window_s)
        self._clock = clock
        self._queue: queue.Queue[Events | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # held for a whole step; a rollback waits on it
        self._paused: str | None = None
        self.dropped_events = 0
        self._batches = self._events = self._refused = 0
        self._train_s = self._publish_s = 0.0
        self._last_loss = float("nan")
        self._failed: str | None = None
        self._stopping = False
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)

    def bootstrap(self, stored: StoredRows | None = None) -> int:
        """Resume from the rows the store holds for this model, else start from the seed:
        before any training, create the model's tables and publish what the store lacks.

        ``stored(table)`` gives every (keys, values) the store holds of ``table``, or None
        when it has none. A restarted source's store (restored from its snapshot and log, or
        rebuilt from the replicas) holds the trained model: those rows are loaded into the
        model the way a rollback loads restored rows, and only the dense tensors the store
        lacks are published, so seed weights never overwrite trained ones. The optimizer
        state is not in the store: it starts afresh. Embedding rows the store lacks keep
        their seed values (training has not touched them; a replica serves its default row
        for them) and are published as training touches them. Returns the rows loaded.
        """
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        pub = self.publisher
        for table in (*pub.table_names, *pub.dense_table_names):
            got = stored(table) if stored is not None else None
            if got is not None and len(got[0]):
                rows[table] = got
        if rows:
            self.load_rows(rows)
            n = sum(len(keys) for keys, _ in rows.values())
            log.info("model %s resumes from %d rows of %d tables", self.name, n, len(rows))
        self.publisher.flush()
        return sum(len(keys) for keys, _ in rows.values())

    def start(self) -> None:
        torch.set_num_threads(1)
        self._thread = threading.Thread(target=self._run, name=f"train-{self.name}", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> str | None:
        """Why the worker thread is gone (the exception, or that it exited unasked), else None."""
        thread = self._thread
        gone = thread is not None and not thread.is_alive() and not self._stopping
        if self._failed is None and gone:
            self._failed = "the worker thread exited without being stopped"
        return self._failed

    def submit(self, events: Events) -> int:
        """Queue a labelled batch; returns the queue depth. Raises ``TrainerBusy`` when full
        and ``RuntimeError`` when the trainer has failed or stopped."""
        if self.failed is not None:
            raise RuntimeError(f"trainer of model {self.name} failed: {self._failed}")
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"trainer of model {self.name} is not running")
        if self._paused is not None:  # quarantined input: accepted and discarded
            with self._lock:
                self.dropped_events += len(events)
            return 0
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            with self._lock:
                self._refused += 1
            raise TrainerBusy(
                f"model {self.name}: {self._queue.maxsize} batches queued for training; "
                f"retry shortly"
            ) from None
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued batches, publish what is pending, stop the worker."""
        if self._thread is None:
            return
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("trainer of %s did not stop within %.0f s", self.name, timeout)

    def _run(self) -> None:
        try:
            self._train_batches()
        except BaseException as exc:  # a dead trainer must be visible, never a silent thread
            self._failed = f"{type(exc).__name__}: {exc}"
            log.exception("trainer of %s failed; no further batches are trained", self.name)
            return
        try:
            self.publisher.flush()
        except Exception:
            log.exception(
                "final publish of %s failed; its last step's rows are not written", self.name
            )

    def _train_batches(self) -> None:
        while True:
            events = self._queue.get()
            if events is None:
                return
            with self._step_lock:
                if self._paused is not None:
                    self.dropped_events += len(events)
                    continue
                result = self.trainer.step(events)
            if result.rejected is not None:
                log.warning(
                    "model %s: training step on %d events rejected (%s: %s, loss %s); the "
                    "model and optimizer are as before it and nothing was published",
                    self.name, len(events), result.rejected,
                    REJECT_REASONS[result.rejected], result.loss,
                )  # fmt: skip
            with self._lock:
                # Pre-update predictions are finite unless the forward pass overflowed, a
                # rejected step; the quality window only takes probabilities.
                finite = np.isfinite(result.predictions)
                labels = events.labels.astype(np.int8)
                self.quality.update(result.predictions[finite], labels[finite], self._clock())
                if result.rejected is not None:
                    self._rejected[result.rejected] += 1
                    continue
                self._batches += 1
                self._events += len(events)
                self._train_s += result.step_time_s
                self._publish_s += result.publish_time_s
                self._last_loss = result.loss

    def quarantine(self, why: str) -> int:
        """Stop training: the queued input window is dropped (it is suspect), and batches
        submitted until ``resume`` are accepted and discarded. Returns the events dropped
        from the queue. Waits for a running step to finish."""
        with self._step_lock:
            self._paused = why
            dropped = 0
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # a stop request: keep it for the worker
                    self._queue.put_nowait(None)
                    break
                dropped += len(item)
            self.dropped_events += dropped
        return dropped

    def load_rows(
        self,
        rows: dict[str, tuple[np.ndarray, np.ndarray]],
        gone: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write values the store holds into the model (a rollback's restored rows, while
        quarantined; a restarted source's store, before training) and drop the optimizers'
        momentum, which points where the undone updates went (their second moments and step
        counts stay: see ``OnlineTrainer.forget_momentum``). ``gone``: per table, keys the
        store no longer holds (a rollback's ids created since its healthy point): dynamic
        tables give their rows up first, every table's before any is loaded, so the restored
        rows have room within the row and memory budgets."""
        gone = gone or {}
        with self._step_lock:
            for table, keys in gone.items():
                self.publisher.forget_rows(table, keys)
            skipped: dict[str, int] = {}
            for table, keys, values in _interleaved(rows):
                if n := self.publisher.load_rows(table, keys, values, gone.get(table)):
                    skipped[table] = skipped.get(table, 0) + n
            self.trainer.forget_momentum()
        if skipped:
            log.warning(
                "model %s: rows the model has no place for were not loaded (keys outside an "
                "embedding table, beyond a dynamic table's free rows: deleted from the store "
                "when the table evicts, or other than 0 in a dense one): %s", self.name, skipped,
            )  # fmt: skip

    def resume(self) -> None:
        self._paused = None

    @property
    def paused(self) -> str | None:
        return self._paused

    def reset_quality(self) -> None:
        """Start the trainer's quality afresh (e.g. after a warm-up that should not count)."""
        with self._lock:
            self.quality = WindowedQuality(self.quality.window_s)

    def statistics(self) -> TrainingStats:
        with self._lock:
            return TrainingStats(
                model=self.name,
                batches=self._batches,
                events=self._events,
                queued=self._queue.qsize(),
                refused=self._refused,
                train_seconds=self._train_s,
                publish_seconds=self._publish_s,
                rows_published=self.publisher.statistics().rows_published,
                last_loss=self._last_loss,
                failed=self.failed,
                paused=self._paused,
                dropped_events=self.dropped_events,
                rejected_steps=dict(self._rejected),
                dynamic_tables={
                    name: t.statistics() for name, t in self.model.sparse.dynamic_tables().items()
                },
                memory_budget=memory.statistics() if (memory := self.model.sparse.memory) else None,
            )

    def report(self) -> dict[str, Any]:
        """Counters and the trainer's own windowed/lifetime quality, JSON-ready."""
        st = self.statistics()
        now = self._clock()
        doc: dict[str, Any] = dict(vars(st))
        doc["dynamic_tables"] = {name: asdict(t) for name, t in st.dynamic_tables.items()}
        doc["memory_budget"] = None if st.memory_budget is None else asdict(st.memory_budget)
        doc["publish_share"] = st.publish_seconds / st.train_seconds if st.train_seconds else None
        with self._lock:
            doc["window"] = self.quality.compute(now).as_json()
            doc["lifetime"] = self.quality.lifetime(now).as_json()
        if isinstance(doc["last_loss"], float) and doc["last_loss"] != doc["last_loss"]:
            doc["last_loss"] = None
        return doc
