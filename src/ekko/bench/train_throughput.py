"""Training throughput and publisher overhead on the synthetic stream (for ``ekko bench``).

Not a test: it measures wall time. Two identical trainers (same model seed, same stream
seed), one publishing into a sink that only counts, one not, run in alternating blocks
(A B A B ...) so machine noise hits both alike; figures are medians over steps.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import numpy as np
import torch

from ekko.store.spec import TableSpec
from ekko.train.dlrm import DLRM, DLRMConfig
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig


class CountingSink:
    """Keeps counts and the last arrays only: the cost of the hand-off, not of a store."""

    def __init__(self) -> None:
        self.rows = 0
        self.last: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def create_table(self, spec: TableSpec) -> None:
        self.last.setdefault(spec.name, (np.empty(0, np.int64), np.empty((0, spec.dim))))

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.rows += len(keys)
        self.last[table] = (keys, values)


def measure(
    steps: int,
    batch_size: int,
    *,
    block: int = 10,
    warmup: int = 10,
    model_config: DLRMConfig | None = None,
    stream_config: StreamConfig | None = None,
) -> dict[str, Any]:
    """Train ``steps`` batches with and without the publisher, alternating blocks.

    Returns events/s, median step times, the publisher's share of a publishing step (from
    its own timers: hook recording + publish) and the A/B step-time ratio.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(steps, batch_size, block, warmup, model_config, stream_config)
    finally:
        torch.set_num_threads(threads)


def _measure(
    steps: int,
    batch_size: int,
    block: int,
    warmup: int,
    model_config: DLRMConfig | None,
    stream_config: StreamConfig | None,
) -> dict[str, Any]:
    mcfg = model_config or DLRMConfig()
    scfg = stream_config or StreamConfig()
    sink = CountingSink()
    with_pub_model = DLRM(mcfg)
    publisher = EmbeddingPublisher(
        with_pub_model, sink, PublisherConfig(table_names=with_pub_model.table_names())
    )
    runs = {
        "publish": (OnlineTrainer(with_pub_model, TrainerConfig(), publisher), publisher),
        "plain": (OnlineTrainer(DLRM(mcfg), TrainerConfig()), None),
    }
    streams = {name: SyntheticStream(scfg).batches(batch_size) for name in runs}
    step_s: dict[str, list[float]] = {name: [] for name in runs}
    overhead_s: list[float] = []
    gen_s: list[float] = []
    for name, (trainer, _) in runs.items():
        for events in itertools.islice(streams[name], warmup):
            trainer.step(events)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for name, (trainer, pub) in runs.items():
            for _ in range(n):
                start = time.perf_counter()
                events = next(streams[name])
                gen_s.append(time.perf_counter() - start)
                before = pub.statistics() if pub else None
                result = trainer.step(events)
                step_s[name].append(result.step_time_s)
                if pub is not None and before is not None:
                    after = pub.statistics()
                    overhead_s.append(
                        after.record_time_s
                        - before.record_time_s
                        + after.publish_time_s
                        - before.publish_time_s
                    )
        done += n
    stats = publisher.statistics()
    med = {name: statistics.median(v) for name, v in step_s.items()}
    return {
        "steps": steps,
        "batch_size": batch_size,
        "torch_threads": 1,
        "rows_per_table": mcfg.rows_per_table,
        "num_tables": mcfg.num_sparse,
        "step_s_median_plain": med["plain"],
        "step_s_median_publish": med["publish"],
        "events_per_s_plain": batch_size / med["plain"],
        "events_per_s_publish": batch_size / med["publish"],
        "publisher_s_median": statistics.median(overhead_s),
        "publisher_share": statistics.median(
            o / s for o, s in zip(overhead_s, step_s["publish"], strict=True)
        ),
        "ab_step_ratio": med["publish"] / med["plain"],
        "rows_per_step": stats.rows_published / max(stats.publishes, 1),
        "bytes_per_step": stats.bytes_published / max(stats.publishes, 1),
        "stream_events_per_s": batch_size / statistics.median(gen_s),
    }
