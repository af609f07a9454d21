"""The honest online-learning loop of the demo, over HTTP against a running cluster.

Each batch of the stream is first sent for prediction to every serving replica (one per
inference DC, plus the checkpoint-refreshed replica); then its labels go back to each replica
as feedback (the replicas score themselves) and, with the events, to the trainer at the
source. Nothing here knows about the store: the loop is a client of the public APIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import msgspec
import numpy as np

from ekko.quality.windowed import WindowedQuality
from ekko.train.streams import Events

log = logging.getLogger(__name__)
_JSON = msgspec.json.Encoder()


@dataclass
class ReplicaTrack:
    """What the loop saw of one replica: predictions served, refusals, and its quality per
    interval (the AUC-over-time plot) from the same (prediction, label) pairs it fed back."""

    name: str
    url: str
    quality: WindowedQuality = field(default_factory=lambda: WindowedQuality(3600.0))
    predicted: int = 0
    not_ready: int = 0
    errors: int = 0


@dataclass
class LoopCounters:
    batches: int = 0
    events: int = 0
    trained: int = 0
    train_retries: int = 0
    train_refused: int = 0


class OnlineLoop:
    """Drives ``events`` through predict → feedback → train at ``rate`` events/s.

    Why a client loop rather than in-process calls: the demo must exercise the real serving
    and training paths (HTTP, JSON, the node's event loop), as production traffic would.

    Args:
        client: shared async HTTP client.
        replicas: replica name -> base URL of its admin/inference API.
        source_url: base URL of the source (the trainer's endpoint).
        model: model name.
        rate: events per second offered (the loop falls behind if the cluster cannot keep up).
        in_flight: batches being predicted at once.
        poison: ``poison(seconds since start) -> bool``: train on flipped labels then (the
            guard's test: a label bug that the feedback, carrying true labels, exposes).
        train: ``await train(events, labels) -> accepted`` instead of the source's train
            route (the partitioned form's sharded trainer).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        replicas: dict[str, str],
        source_url: str,
        model: str,
        rate: float,
        in_flight: int = 4,
        poison: Callable[[float], bool] | None = None,
        train: Callable[[Events, np.ndarray], Awaitable[bool]] | None = None,
    ) -> None:
        self.client = client
        self.tracks = {name: ReplicaTrack(name, url) for name, url in replicas.items()}
        self.source_url = source_url
        self.model = model
        self.rate = rate
        self.in_flight = in_flight
        self.poison = poison
        self.train = train
        self.started = time.monotonic()
        self.poisoned_events = 0
        self.poison_started_at: float | None = None  # wall time of the first poisoned batch
        self.counters = LoopCounters()

    async def _predict(self, track: ReplicaTrack, body: bytes, labels: np.ndarray) -> None:
        base = f"{track.url}/v1/models/{self.model}"
        try:
            r = await self.client.post(f"{base}/predict", content=body, headers=_CT)
        except httpx.HTTPError as exc:
            track.errors += 1
            log.warning("predict at %s failed: %s", track.name, exc)
            return
        if r.status_code == 503:
            track.not_ready += 1
            return
        if r.status_code != 200:
            track.errors += 1
            log.warning("predict at %s: HTTP %d %s", track.name, r.status_code, r.text[:200])
            return
        preds = r.json()["predictions"]
        ids = [p["id"] for p in preds]
        ctr = np.array([p["ctr"] for p in preds], dtype=np.float64)
        track.predicted += len(ids)
        track.quality.update(ctr, labels.astype(np.int8), time.monotonic())
        fb = _JSON.encode(
            {"labels": [{"id": i, "label": int(y)} for i, y in zip(ids, labels, strict=True)]}
        )
        try:
            r = await self.client.post(f"{base}/feedback", content=fb, headers=_CT)
            if r.status_code != 200:
                track.errors += 1
        except httpx.HTTPError as exc:
            track.errors += 1
            log.warning("feedback at %s failed: %s", track.name, exc)

    async def _train(self, body: bytes, n: int) -> None:
        url = f"{self.source_url}/v1/models/{self.model}/train"
        for _attempt in range(100):
            try:
                r = await self.client.post(url, content=body, headers=_CT)
            except httpx.HTTPError as exc:
                log.warning("train request failed: %s", exc)
                r = None
            if r is not None and r.status_code == 202:
                self.counters.trained += n
                return
            if r is not None and r.status_code != 503:
                log.error("trainer refused a batch: HTTP %d %s", r.status_code, r.text[:200])
                break
            self.counters.train_retries += 1
            await asyncio.sleep(0.05)
        self.counters.train_refused += 1

    async def _submit(self, events: Events, labels: np.ndarray) -> None:
        if self.train is None:
            body = {
                "dense": events.dense.tolist(),
                "sparse": events.sparse.tolist(),
                "labels": labels.tolist(),
            }
            await self._train(_JSON.encode(body), len(events))
        elif await self.train(events, labels):
            self.counters.trained += len(events)
        else:
            self.counters.train_refused += 1

    async def train_only(self, events: Events) -> None:
        """Warm-up: train on a batch without predicting it (no quality is recorded)."""
        await self._submit(events, events.labels.astype(np.int64))

    async def _predict_all(self, events: Events, body: bytes) -> None:
        await asyncio.gather(*(self._predict(t, body, events.labels) for t in self.tracks.values()))

    async def _train_after(self, events: Events, predicted) -> None:
        await predicted
        labels = events.labels.astype(np.int64)
        if self.poison is not None and self.poison(time.monotonic() - self.started):
            labels = 1 - labels  # a label bug upstream of the trainer; feedback stays true
            if self.poison_started_at is None:
                self.poison_started_at = time.time()
            self.poisoned_events += len(labels)
        await self._submit(events, labels)
        self.counters.batches += 1
        self.counters.events += len(events)

    async def run(self, batches, stop: asyncio.Event, duration_s: float) -> None:
        """Step through ``batches`` at ``rate`` until ``duration_s`` or ``stop``.

        Up to ``in_flight`` batches are being predicted at once (the replicas are remote;
        waiting for each round trip in turn would cap the rate), but each batch is trained
        only after its own predictions are in, and batches train in stream order."""
        start = self.started = time.monotonic()
        offered = 0
        trains: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.in_flight)

        async def trainer() -> None:
            while (item := await trains.get()) is not None:
                events, predicted = item
                await self._train_after(events, predicted)
                slots.release()

        worker = asyncio.create_task(trainer())
        try:
            for events in batches:
                if stop.is_set() or time.monotonic() - start >= duration_s:
                    break
                await slots.acquire()
                body = _JSON.encode(
                    {"dense": events.dense.tolist(), "sparse": events.sparse.tolist()}
                )
                predicted = asyncio.create_task(self._predict_all(events, body))
                trains.put_nowait((events, predicted))
                offered += len(events)
                delay = start + offered / self.rate - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            trains.put_nowait(None)
            await worker


_CT = {"content-type": "application/json"}
