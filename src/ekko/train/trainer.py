"""The online-learning loop: predict on a batch, then learn from its labels, then publish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ekko.train.publisher import EMBEDDING_TYPES, EmbeddingPublisher
from ekko.train.streams import Events


@dataclass(frozen=True)
class TrainerConfig:
    """Optimizer choice and learning rates.

    ``"adam"``: SparseAdam for sparse-gradient embedding tables, Adam for the rest.
    ``"adagrad"``: one Adagrad over everything (it handles sparse gradients). Both move only
    the embedding rows looked up in the step, which is what the publisher relies on.
    """

    optimizer: Literal["adam", "adagrad"] = "adam"
    sparse_lr: float = 0.01
    dense_lr: float = 0.001

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adagrad"):
            raise ValueError(
                f"TrainerConfig.optimizer must be 'adam' or 'adagrad': {self.optimizer}"
            )
        if self.sparse_lr <= 0 or self.dense_lr <= 0:
            raise ValueError("TrainerConfig.sparse_lr and dense_lr must be > 0")


@dataclass(frozen=True)
class StepResult:
    """What one online step did.

    ``predictions`` float32 [B] are the CTRs the model gave *before* learning this batch's
    labels (the honest online-evaluation signal); times are wall seconds, ``step_time_s``
    including ``publish_time_s``.
    """

    loss: float
    predictions: np.ndarray
    step_time_s: float
    publish_time_s: float


def _sparse_embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, EMBEDDING_TYPES) and m.sparse]


class OnlineTrainer:
    """Trains a CTR model one event batch at a time and hands changed rows to a publisher.

    Why: the freshness that Ekko delivers starts here; each step first scores the batch with
    the current model (those scores are the online AUC), then trains on it, then publishes.
    The scores come from the training forward pass itself, computed before the optimizer
    step: they are the pre-update model's predictions, without a second forward.

    Args:
        model: ``model(dense float32 [B, N], sparse int64 [B, F]) -> logits float32 [B]``.
        config: optimizer and learning rates.
        publisher: receives ``publish()`` after every optimizer step; None trains only.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig | None = None,
        publisher: EmbeddingPublisher | None = None,
    ) -> None:
        self.model = model
        self.config = config or TrainerConfig()
        self.publisher = publisher
        self.loss_fn = nn.BCEWithLogitsLoss()
        cfg = self.config
        sparse = _sparse_embedding_weights(model)
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]
        self.optimizers: list[torch.optim.Optimizer] = []
        if cfg.optimizer == "adam":
            if sparse:
                self.optimizers.append(torch.optim.SparseAdam(sparse, lr=cfg.sparse_lr))
            if dense:
                self.optimizers.append(torch.optim.Adam(dense, lr=cfg.dense_lr))
        else:
            groups = [{"params": sparse, "lr": cfg.sparse_lr}, {"params": dense}]
            self.optimizers.append(
                torch.optim.Adagrad([g for g in groups if g["params"]], lr=cfg.dense_lr)
            )

    def step(self, events: Events) -> StepResult:
        """Predict ``events`` with the current model, learn their labels, publish."""
        start = time.perf_counter()
        self.model.train()
        dense = torch.from_numpy(np.ascontiguousarray(events.dense, dtype=np.float32))
        sparse = torch.from_numpy(np.ascontiguousarray(events.sparse, dtype=np.int64))
        labels = torch.from_numpy(np.ascontiguousarray(events.labels, dtype=np.float32))
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        logits = self.model(dense, sparse)
        loss = self.loss_fn(logits, labels)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        predictions = torch.sigmoid(logits.detach()).numpy()
        publish_start = time.perf_counter()
        if self.publisher is not None:
            self.publisher.publish()
        end = time.perf_counter()
        return StepResult(
            loss=float(loss.detach()),
            predictions=predictions,
            step_time_s=end - start,
            publish_time_s=end - publish_start,
        )

    @torch.no_grad()
    def predict(self, events: Events) -> np.ndarray:
        """CTR float32 [B] of the current model, learning nothing."""
        self.model.eval()
        dense = torch.from_numpy(np.ascontiguousarray(events.dense, dtype=np.float32))
        sparse = torch.from_numpy(np.ascontiguousarray(events.sparse, dtype=np.int64))
        return torch.sigmoid(self.model(dense, sparse)).numpy()
