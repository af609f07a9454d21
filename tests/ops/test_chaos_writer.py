"""The chaos writers leave every acknowledged write judged: a source that acknowledges a
write and drops it fails the checker even when later writes reuse the write's other keys."""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from ekko.ops.chaos.checker import check
from ekko.ops.chaos.history import History
from ekko.ops.chaos.writer import AckWriter


class DroppingSource:
    """Acknowledges every write with fresh versions; stores none of write ``drop``."""

    def __init__(self, drop: int, writes: int, stop: asyncio.Event) -> None:
        self.rows: dict[int, list[int]] = {}  # key -> [version, write n, writer]
        self.version = 0
        self.seen = 0
        self.drop, self.writes, self.stop = drop, writes, stop

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = msgspec.json.decode(request.content)
        self.seen += 1
        versions = []
        for key, value in zip(body["keys"], body["values"], strict=True):
            self.version += 1
            versions.append(self.version)
            if self.seen != self.drop:
                self.rows[key] = [self.version, int(value[0]), int(value[1])]
        if self.seen == self.writes:
            self.stop.set()
        return httpx.Response(200, json={"table": "kv", "versions": versions})


def test_a_write_acknowledged_then_dropped_fails_the_checker_though_its_keys_are_reused() -> None:
    async def run() -> History:
        history, stop = History(seed=1), asyncio.Event()
        source = DroppingSource(drop=3, writes=60, stop=stop)
        async with httpx.AsyncClient(transport=httpx.MockTransport(source)) as client:
            writer = AckWriter(
                client, "http://source/v1/tables/kv/rows", index=0, dim=2, key_base=0,
                key_space=20, fresh_base=10**7, batch=10, interval_s=0.0, history=history, seed=1,
            )  # fmt: skip
            await writer.run(stop)
        history.final["source_rows"] = {str(k): row for k, row in source.rows.items()}
        return history

    history = asyncio.run(run())
    assert len(history.writes) == 60
    lost = [f for f in check(history).failures if "acknowledged writes lost" in f]
    assert lost and "write 0/3" in lost[0], check(history).failures
