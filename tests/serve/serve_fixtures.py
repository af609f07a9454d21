"""Tiny models, trained stores and services for the serve tests (no test functions here)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ekko.node.config import ModelConfig
from ekko.schedule import WritePort
from ekko.serve import InferenceService
from ekko.store import Store
from ekko.torch import EmbeddingPublisher, PublisherConfig
from ekko.train.dlrm import DLRM
from ekko.train.streams import Events, StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig

torch.set_num_threads(1)

SMALL_MODEL = ModelConfig(
    name="ctr", rows_per_table=2_000, embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1)
)
SMALL_STREAM = StreamConfig(seed=3, max_vocab=5_000, initial_items=2_000)


@dataclass
class Trained:
    """A DLRM trained a few steps, published into ``store`` through a ``WritePort``."""

    model: DLRM
    trainer: OnlineTrainer
    publisher: EmbeddingPublisher
    sink: WritePort
    store: Store
    batches: itertools.islice | object

    def held_out(self) -> Events:
        return next(self.batches)  # type: ignore[call-overload]


def train(steps: int = 4, *, snapshot: bool = True, batch: int = 128) -> Trained:
    model = DLRM(SMALL_MODEL.dlrm())
    store = Store()
    sink = WritePort(store)
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names=model.table_names()))
    if snapshot:
        pub.snapshot()
    trainer = OnlineTrainer(model, TrainerConfig(), pub)
    batches = SyntheticStream(SMALL_STREAM).batches(batch)
    for events in itertools.islice(batches, steps):
        trainer.step(events)
    pub.flush()
    return Trained(model, trainer, pub, sink, store, batches)


def service(store: Store, **kwargs: object) -> InferenceService:
    return InferenceService(store, SMALL_MODEL.served(), **kwargs)  # type: ignore[arg-type]


def random_events(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, SMALL_MODEL.num_dense)).astype(np.float32)
    sparse = rng.integers(0, 10**9, (n, SMALL_MODEL.num_sparse), dtype=np.int64)
    return dense, sparse
