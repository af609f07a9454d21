"""Online AUC of a system under test: each step's events scored the moment they arrive, on
the replicas' state at that moment.

Why this way: what WAN bytes buy is freshness, and freshness is worth what it does to the
predictions served meanwhile. Every system replays the same trace, so the same events are
scored on every system's replicas, just before the source writes the updates trained on
them; the AUCs are paired and differ only by what the replicas held.
"""

from __future__ import annotations

import numpy as np

from ekko.bench.trace import Trace
from ekko.quality.offline import auc
from ekko.serve.replica import ReplicaModel
from ekko.store import Store
from ekko.train.dlrm import DLRMConfig


class OnlineAuc:
    """Scores the trace's events on the attached replicas, step by step (``on_step`` is the
    replay's hook), and keeps the predictions with their step, so a run's AUC can be taken
    over all of it or over a stretch (``auc(steps)``)."""

    def __init__(self, trace: Trace, model: DLRMConfig) -> None:
        if trace.steps == 0:
            raise ValueError("the trace holds no events to score")
        self.trace = trace
        self.model = model
        self._events = trace.events
        self._models: list[ReplicaModel] = []
        self._preds: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._steps: list[int] = []
        self._next = 0

    def attach(self, stores: list[Store]) -> None:
        """Score on these replica stores from now on (a new run starts from step 0)."""
        self._models = [ReplicaModel(s, self.model, f"replica{i}") for i, s in enumerate(stores)]
        self._preds, self._labels, self._steps = [], [], []
        self._next = 0

    def on_step(self, step: int) -> None:
        """The source is about to write step ``step``'s updates: score every step's events up
        to and including it (steps that published nothing are scored here too)."""
        while self._next <= min(step, len(self._events) - 1):
            ev = self._events[self._next]
            for m in self._models:
                self._preds.append(m.predict(ev.dense, ev.sparse))
                self._labels.append(ev.labels)
                self._steps.append(self._next)
            self._next += 1

    def auc(self, steps: range | None = None) -> float:
        """AUC over the events scored so far (only those of ``steps``, if given)."""
        if not self._preds:
            return float("nan")
        keep = [i for i, s in enumerate(self._steps) if steps is None or s in steps]
        if not keep:
            return float("nan")
        return auc(
            np.concatenate([self._labels[i] for i in keep]),
            np.concatenate([self._preds[i] for i in keep]),
        )
