"""A step that would make the model non-finite is undone: parameters and optimizer state as
before it, nothing published, the reason reported; the next good step trains as usual."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ekko.train.dlrm import DLRM, embedding_table_name
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.sink import MemorySink
from ekko.train.streams import Events, SyntheticStream
from ekko.train.trainer import REJECT_REASONS, OnlineTrainer, TrainerConfig

OPTIMIZERS = ("adam", "adagrad")


def _setup(cfg, optimizer: str) -> tuple[OnlineTrainer, MemorySink]:
    model = DLRM(cfg)
    sink = MemorySink()
    pub = EmbeddingPublisher(
        model, sink, PublisherConfig(table_names=model.table_names(), dense_interval_s=0.0)
    )
    return OnlineTrainer(model, TrainerConfig(optimizer), pub), sink


def _state(trainer: OnlineTrainer) -> tuple[dict, list[dict]]:
    return (
        copy.deepcopy(trainer.model.state_dict()),
        [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers],
    )


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _batches(stream_cfg, n: int) -> list[Events]:
    it = SyntheticStream(stream_cfg).batches(128)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_overflowing_input_is_rejected_and_changes_nothing(
    small_model_config, small_stream_config, optimizer
) -> None:
    trainer, sink = _setup(small_model_config, optimizer)
    good, after = _batches(small_stream_config, 2)
    assert trainer.step(good).rejected is None
    before = _state(trainer)
    writes = len(sink.writes)
    bad = Events(np.full_like(good.dense, 3e38), good.sparse, good.labels, good.ts)
    result = trainer.step(bad)
    assert result.rejected in REJECT_REASONS  # where it overflows depends on the optimizer
    _assert_same(_state(trainer), before)
    assert len(sink.writes) == writes  # nothing published
    ok = trainer.step(after)  # the ids of the rejected batch were not kept for publishing
    assert ok.rejected is None and np.isfinite(ok.loss)
    published = sink.written_keys(embedding_table_name(0))
    assert published == {int(k) for b in (good, after) for k in b.sparse[:, 0] % 4000}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_non_finite_gradient_skips_the_optimizer_step(
    small_model_config, small_stream_config, optimizer
) -> None:
    trainer, _sink = _setup(small_model_config, optimizer)
    first, second = _batches(small_stream_config, 2)
    trainer.step(first)
    before = _state(trainer)
    weight = trainer.model.top[0].weight
    handle = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    result = trainer.step(second)
    handle.remove()
    assert result.rejected == "gradient"
    assert np.isfinite(result.predictions).all()  # pre-update predictions stay usable
    _assert_same(_state(trainer), before)
    assert trainer.step(second).rejected is None


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_step_that_makes_parameters_non_finite_is_restored(
    small_model_config, small_stream_config, optimizer
) -> None:
    trainer, sink = _setup(small_model_config, optimizer)
    first, second = _batches(small_stream_config, 2)
    trainer.step(first)
    before = _state(trainer)
    writes = len(sink.writes)
    lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
    for opt in trainer.optimizers:
        for g in opt.param_groups:
            g["lr"] = float("inf")  # finite gradients, but the update overflows
    result = trainer.step(second)
    assert result.rejected == "parameters"
    for opt, saved in zip(trainer.optimizers, lrs, strict=True):
        for g, lr in zip(opt.param_groups, saved, strict=True):
            g["lr"] = lr
    _assert_same(_state(trainer), before)
    assert len(sink.writes) == writes
    assert trainer.step(second).rejected is None
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_first_step_rejected_leaves_no_optimizer_state(
    small_model_config, small_stream_config
) -> None:
    trainer, _sink = _setup(small_model_config, "adam")
    (batch,) = _batches(small_stream_config, 1)
    before = copy.deepcopy(trainer.model.state_dict())
    for opt in trainer.optimizers:
        for g in opt.param_groups:
            g["lr"] = float("inf")
    assert trainer.step(batch).rejected == "parameters"
    _assert_same(trainer.model.state_dict(), before)
    assert all(not opt.state for opt in trainer.optimizers)  # created by the step, dropped
