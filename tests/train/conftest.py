"""Shared fixtures: tiny models and streams; one torch thread (the machine is shared)."""

from __future__ import annotations

import pytest
import torch

from ekko.train.dlrm import DLRMConfig
from ekko.train.streams import StreamConfig

torch.set_num_threads(1)

SMALL_STREAM = StreamConfig(seed=3, max_vocab=5_000, initial_items=2_000)
SMALL_MODEL = DLRMConfig(rows_per_table=4_000, embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1))


@pytest.fixture
def small_stream_config() -> StreamConfig:
    return SMALL_STREAM


@pytest.fixture
def small_model_config() -> DLRMConfig:
    return SMALL_MODEL
