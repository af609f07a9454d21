"""The chaos run's acknowledged writes: HTTP writes to the source, each acknowledgement kept.

A writer owns a key range, sends one batch at a time and sends the same batch again until
it is acknowledged (a request with no answer may or may not have been applied; writes are
idempotent per key), so the last acknowledged write of a key is also the last one sent for
it, and the source must end holding it (or, after a request that never got its answer, a
newer version).

Half of each batch are keys written again and again (last-version-wins under faults), half
keys written once, never again: the checker judges a key by its final row, so a write the
source dropped after acknowledging it was invisible once a later write covered its keys
(with 2 000 keys a writer, every key is covered within a short run). A fresh key keeps every
acknowledged write judged.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import msgspec
import numpy as np

from ekko.ops.chaos.history import History

_JSON = msgspec.json.Encoder()
_CT = {"content-type": "application/json"}


def row_value(n: int, writer: int, dim: int) -> list[float]:
    """Write ``n`` of ``writer`` stores this row at each of its keys (exact in float32
    for n < 2**24), so a row read back names the write it came from."""
    return [float(n), float(writer)] + [0.0] * (dim - 2)


class AckWriter:
    """One client writing batches of ``batch`` keys of its own range to ``table``.

    Why its own key range: one request at a time per key range makes "the last acknowledged
    write" of a key well defined without ordering between clients."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        index: int,
        dim: int,
        key_base: int,
        key_space: int,
        fresh_base: int,
        batch: int,
        interval_s: float,
        history: History,
        seed: int,
    ) -> None:
        if dim < 2:
            raise ValueError(f"chaos writes need a table of dim >= 2, got {dim}")
        self.client = client
        self.url = url
        self.index = index
        self.dim = dim
        self.keys = np.arange(key_base, key_base + key_space, dtype=np.int64)
        self.fresh_base = fresh_base  # keys from here up: each written by one write only
        self.batch = batch
        self.interval_s = interval_s
        self.history = history
        self.rng = np.random.default_rng(seed)
        self.sent = 0
        self.refused = 0
        self.acked = asyncio.Event()  # set at every acknowledgement (waiters clear it)

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            fresh = self.batch // 2
            first = self.fresh_base + (n - 1) * fresh
            keys = list(range(first, first + fresh))
            keys += self.rng.choice(self.keys, self.batch - fresh, replace=False).tolist()
            row = row_value(n, self.index, self.dim)
            body = _JSON.encode({"keys": keys, "values": [row] * len(keys)})
            await self._send(keys, n, body, stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def _send(self, keys: list[int], n: int, body: bytes, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sent += 1
            try:
                r = await self.client.post(self.url, content=body, headers=_CT)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                self.history.acked(self.index, n, keys, r.json()["versions"])
                self.acked.set()
                return
            self.refused += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)  # down or recovering: send again
