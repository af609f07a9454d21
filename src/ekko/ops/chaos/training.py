"""Online training during a chaos run: the source trains on a clean synthetic stream and
every serving replica predicts it and gets its labels back, so the guard judges live
quality the whole time (and must raise no alarm: nothing is poisoned)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx
import msgspec
import numpy as np

from ekko.train.streams import StreamConfig, SyntheticStream

_JSON = msgspec.json.Encoder()
_CT = {"content-type": "application/json"}
TIMEOUT_S = 3.0


class TrainingClient:
    """Every ``interval_s``: one batch predicted at each serving replica that is up, its
    labels fed back there, then trained at the source. Refusals (a node down, recovering,
    a full queue) are counted and the batch moves on: training is load, not a record."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        source_url: str,
        replica_urls: dict[str, str],
        model: str,
        up: Callable[[str], bool],
        *,
        batch: int = 128,
        interval_s: float = 0.25,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.source_url = source_url
        self.replica_urls = replica_urls
        self.model = model
        self.up = up
        self.interval_s = interval_s
        self.batches = SyntheticStream(StreamConfig(seed=seed)).batches(batch)
        self.trained = self.refused = self.predicted = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ev = next(self.batches)
            body = {"dense": ev.dense.tolist(), "sparse": ev.sparse.tolist()}
            labels = ev.labels.astype(np.int64).tolist()
            await asyncio.gather(
                *(self._predict(name, body, labels) for name in self.replica_urls if self.up(name))
            )
            await self._post(
                f"{self.source_url}/v1/models/{self.model}/train", {**body, "labels": labels}, 202
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def _predict(self, name: str, body: dict, labels: list[int]) -> None:
        base = f"{self.replica_urls[name]}/v1/models/{self.model}"
        r = await self._post(f"{base}/predict", body, 200)
        if r is None:
            return
        ids = [p["id"] for p in r.json()["predictions"]]
        self.predicted += len(ids)
        fb = {"labels": [{"id": i, "label": y} for i, y in zip(ids, labels, strict=True)]}
        await self._post(f"{base}/feedback", fb, 200)

    async def _post(self, url: str, body: dict, ok: int) -> httpx.Response | None:
        try:
            r = await self.client.post(
                url, content=_JSON.encode(body), headers=_CT, timeout=TIMEOUT_S
            )
        except httpx.HTTPError:
            r = None
        if r is None or r.status_code != ok:
            self.refused += 1
            return None
        if ok == 202:
            self.trained += 1
        return r
