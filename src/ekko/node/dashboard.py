"""The node's dashboard: ``/ui`` (one self-contained page) and ``/v1/ui/series``, a bounded
ring of samples the page draws.

Why a ring on the node: the page must work with nothing but the node (no Prometheus, no
internet), and a figure over time needs its past. Once a second the recorder samples what
``/metrics`` already exports (update latency of the last second per DC, bytes per link,
the scheduler's lanes, the replica's lag, the guard states) and keeps the last
``RING`` samples (10 minutes). The source, which applies nothing itself, reads its replicas'
latency histograms (``/v1/latency``, as a reader) so its page shows every DC.

Both routes are open like ``/metrics``: they carry the figures the metrics export, no rows,
keys, digests or model values (README "Seeing a cluster").
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ekko.net.httpkit import error_response
from ekko.node.access import ClusterAuth
from ekko.node.config import ClusterConfig
from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.node.http_client import ClusterHttp
from ekko.node.metrics import LANE_NAMES
from ekko.node.ui_page import PAGE
from ekko.quality.latency import LatencyHistogram
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)

RING = 600
SAMPLE_S = 1.0
SERIES_PATH = "/v1/ui/series"


def _window(now: np.ndarray, before: np.ndarray | None) -> LatencyHistogram:
    """The latencies recorded between two reads of a histogram's counts (a reset between
    them: everything since)."""
    h = LatencyHistogram()
    d = now if before is None else now - before
    h.counts[:] = now if (d < 0).any() else d
    return h


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def latency_peers(config: ClusterConfig, name: str) -> list[str]:
    """The nodes whose latency node ``name`` (a source) reads for its dashboard: those
    holding one of its partitions (every replica, in a cluster of one partition)."""
    mine = set(config.held(name))
    return [n.name for n in config.nodes if n.name != name and mine & set(config.held(n.name))]


class SeriesRecorder(Driver):
    """Samples the node once per ``interval_s`` into a ring the dashboard reads.

    Args:
        core: the node.
        http: the cluster's HTTP ports (the source reads the latency of the replicas holding
            its partitions: in a partitioned cluster every source reading every node cost
            each holder a request per source a second).
        secret: signs those reads (as a reader).
        guards: each model's guard state and incidents here (``ModelHost.guard_view``).
        lag: this replica's lag per table (None at the source).
        interval_s: time between samples.
        clock: sample times.
    """

    name = "ui_series"

    def __init__(
        self,
        core: NodeCore,
        http: ClusterHttp,
        secret: bytes,
        guards: Callable[[], dict[str, Any]],
        lag: Callable[[], dict[str, Any]] | None,
        interval_s: float = SAMPLE_S,
        clock: LoopClock = SYSTEM_CLOCK,
    ) -> None:
        self.core = core
        self.http = http
        self.secret = secret
        self.guards = guards
        self.lag = lag
        self.interval_s = interval_s
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=RING)
        self._hist: dict[str, np.ndarray] = {}  # last counts per node read
        self._bytes: dict[str, int] = {}
        self._lanes: list[int] | None = None
        self._t: float | None = None

    async def run(self) -> None:
        peers = latency_peers(self.core.config, self.core.name)
        auth = ClusterAuth(self.secret)
        async with self.http.async_client(auth=auth, timeout=max(2.0, self.interval_s)) as c:
            while True:
                hists = {self.core.name: self.core.latency.counts.copy()}
                if self.core.is_source:
                    hists.update(await self._read_peers(c, peers))
                self.sample(hists)
                await self.clock.sleep(self.interval_s)

    async def _read_peers(self, client: httpx.AsyncClient, peers: list[str]) -> dict:
        async def one(name: str) -> tuple[str, np.ndarray | None]:
            try:
                r = await client.get(self.http.url(name, "/v1/latency"))
                r.raise_for_status()
                return name, np.asarray(r.json()["counts"], np.int64)
            except (httpx.HTTPError, ValueError, KeyError):
                return name, None  # a peer that is down has no latency this second

        got = await asyncio.gather(*(one(p) for p in peers))
        return {
            n: h for n, h in got if h is not None and h.shape == LatencyHistogram().counts.shape
        }

    def sample(self, hists: dict[str, np.ndarray]) -> dict[str, Any]:
        """One sample from the latency counts read per node (and the node's own figures)."""
        core, cfg = self.core, self.core.config
        now = self.clock.wall()
        dt = None if self._t is None else max(1e-6, now - self._t)
        per_dc: dict[str, LatencyHistogram] = {}
        for name, counts in hists.items():
            dc = cfg.node(name).dc
            per_dc.setdefault(dc, LatencyHistogram()).merge(_window(counts, self._hist.get(name)))
            self._hist[name] = counts
        latency = {
            dc: {"p50_ms": _ms(h.quantile(0.5)), "p99_ms": _ms(h.quantile(0.99)), "rows": h.count}
            for dc, h in sorted(per_dc.items())
            if h.count
        }
        links = {f"{p}→{core.name}": s.bytes_received for p, s in core.links.statistics().items()}
        links[f"{core.name}→pullers"] = core.responder.statistics().bytes_sent
        rates = {}
        for link, total in links.items():
            before = self._bytes.get(link)
            rates[link] = 0.0 if dt is None or before is None else max(0, total - before) / dt
        self._bytes = links
        doc: dict[str, Any] = {"t": round(now, 3), "latency": latency, "bytes_per_s": rates}
        scheduler = core.port.scheduler
        if scheduler is not None:
            lanes = list(scheduler.statistics().rows_by_lane)
            if self._lanes is not None:
                moved = [max(0, a - b) for a, b in zip(lanes, self._lanes, strict=True)]
                doc["lanes"] = {LANE_NAMES[i]: n for i, n in enumerate(moved)}
            self._lanes = lanes
        if self.lag is not None:
            lag = self.lag()
            doc["lag"] = {
                "versions": sum(x["versions"] for x in lag.values()),
                "seconds": max((x["seconds"] for x in lag.values()), default=0.0),
            }
        doc["guard"] = {m: g["state"] for m, g in self.guards().items()}
        self._t = now
        self.samples.append(doc)
        return doc

    def now(self) -> dict[str, Any]:
        """What the page's header shows: the node and its figures at this moment."""
        core = self.core
        doc: dict[str, Any] = {
            "node": core.name,
            "role": core.role,
            "dc": core.dc,
            "upstream": core.upstream_name,
            "accepting_writes": core.not_ready is None if core.is_source else None,
            "tables": {n: t.rows for n, t in core.store.tables.items()},
            "guard": self.guards(),
        }
        if self.lag is not None:
            doc["lag"] = self.lag()
        return doc

    def routes(self) -> list[Route]:
        async def page(request: Request) -> Response:
            """The dashboard: one self-contained HTML page drawing ``/v1/ui/series``."""
            return HTMLResponse(PAGE)

        async def series(request: Request) -> Response:
            """The node now and its samples (``since``: only those taken after it, unix s)."""
            raw = request.query_params.get("since")
            try:
                since = float(raw) if raw is not None else -math.inf
            except ValueError:
                return error_response(f"since: expected unix seconds, got {raw[:40]!r}", 400)
            if math.isnan(since):
                return error_response("since: expected unix seconds, got NaN", 400)
            samples = [s for s in self.samples if s["t"] > since]
            return JSONResponse({"now": self.now(), "interval_s": self.interval_s,
                                 "samples": samples})  # fmt: skip

        return [Route("/ui", page, methods=["GET"]), Route(SERIES_PATH, series, methods=["GET"])]
