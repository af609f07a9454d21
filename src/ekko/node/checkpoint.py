"""A checkpoint replica's refresher: a full copy of the source every interval, as a
deployment without Ekko would refresh (the baseline the benches compare against)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.net.signed_requests import auth_headers, host_of, needs_resign
from ekko.net.wan import WanLine, WanProfile
from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.node.http_client import ClusterHttp
from ekko.store import SnapshotError, Store
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)

RETRY_S = 1.0
"""After a failed copy (the source down, or recovering: 503) the next is tried this soon,
doubling up to the interval, instead of a whole interval later."""


class CheckpointRefresher(Driver):
    """Loads a full copy of the source every ``checkpoint_interval_s``, or sooner when an
    operator asks (``POST /v1/checkpoint/refresh``), never sooner than ``[http]
    refresh_min_interval_s`` after the last one started.

    Why a driver: the copy crosses the emulated WAN as one transfer (delay plus size over
    bandwidth) and may fail; a failed copy keeps the previous one and the loop goes on.

    Args:
        core: the node (its store is replaced by each copy).
        http: the cluster's HTTP ports (the source's URL, TLS checked).
        secret: signs the snapshot request.
        wan: the emulated WAN profile of the link to the source (None: LAN).
        on_loaded: called with the new store once it is in place (serve it, wake pulls).
        clock: the intervals and the emulated transfer time.
    """

    name = "checkpoint_copies"

    def __init__(
        self,
        core: NodeCore,
        http: ClusterHttp,
        secret: bytes,
        wan: WanProfile | None,
        on_loaded: Callable[[Store], None],
        clock: LoopClock = SYSTEM_CLOCK,
    ) -> None:
        self.core = core
        self.http = http
        self.secret = secret
        self.wan = wan
        self.on_loaded = on_loaded
        self.clock = clock
        self.started = 0.0  # wall time the last copy started
        self._now = asyncio.Event()

    def routes(self) -> list[Route]:
        return [Route("/v1/checkpoint/refresh", self.refresh_route, methods=["POST"])]

    async def run(self) -> None:
        cfg = self.core.config
        src = cfg.source
        url = self.http.url(src.name, "/v1/snapshot")
        interval = self.core.node.checkpoint_interval_s
        self.core.links.declare(src.name)
        retry = RETRY_S
        async with self.http.async_client(timeout=max(30.0, interval)) as client:
            while True:
                started = self.started = self.clock.wall()
                self._now.clear()  # a request from here on asks for a later copy
                if await self._copy(client, url, started):
                    wait = max(0.0, interval - (self.clock.wall() - started))
                    retry = RETRY_S
                else:  # the source is down or recovering: try again soon, backing off
                    wait, retry = min(retry, interval), min(2 * retry, interval)
                await self._sleep_unless_asked(wait)
                # Copies start at least refresh_min_interval_s apart: a flood of refresh
                # requests coalesces into one copy per spacing, not one copy each.
                spacing = cfg.http.refresh_min_interval_s - (self.clock.wall() - started)
                if spacing > 0:
                    await self.clock.sleep(spacing)

    async def _copy(self, client: httpx.AsyncClient, url: str, started: float) -> bool:
        """One full copy loaded (True), or the previous one kept (False)."""
        src = self.core.config.source.name
        try:
            for _ in range(2):  # again if the source started after we signed
                headers = auth_headers(
                    self.secret, "node", "GET", "/v1/snapshot", host=host_of(url)
                )
                resp = await client.get(url, headers=headers)
                if not needs_resign(resp):
                    break
            resp.raise_for_status()
            data = resp.content
            if self.wan is not None:
                await self.clock.sleep(WanLine(self.wan).delivery_time(0.0, len(data)))
            store = self.core.load_copy(data, started)
            rows = sum(t.rows for t in store.tables.values())
            self.core.links.count_copy(src, rows, len(data))
            self.on_loaded(store)
            log.info("%s loaded a full copy (%d bytes) from %s", self.core.name, len(data), src)
            return True
        except (httpx.HTTPError, SnapshotError, OSError) as exc:
            log.warning(
                "%s: copy from %s failed (%s); keeping the previous copy", self.core.name, src, exc
            )
            return False

    async def _sleep_unless_asked(self, seconds: float) -> None:
        asked = asyncio.ensure_future(self._now.wait())
        slept = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({asked, slept}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (asked, slept):
                f.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await f

    async def refresh_route(self, request: Request) -> Response:
        """Operator action: take the next full copy now rather than at the interval (no
        sooner than ``[http] refresh_min_interval_s`` after the last one started)."""
        self._now.set()
        spacing = self.core.config.http.refresh_min_interval_s
        due = max(0.0, self.started + spacing - self.clock.wall())
        return JSONResponse(
            {"node": self.core.name, "refresh": "requested", "starts_in_s": round(due, 3)},
            status_code=202,
        )
