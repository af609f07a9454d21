"""The routes that open a node's streams (``ekko.node.write_stream``) and their metrics:
``POST /v1/streams/write`` at the source, ``POST /v1/streams/lookup`` at any node.

Apart from the protocol because they are the HTTP side of it: the role and upgrade checks,
the limit on open streams, the switch of the connection, the collector of their figures."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.client.stream_frames import (
    LOOKUP_PATH,
    LOOKUP_UPGRADE,
    MAX_FRAME_HEADER,
    STREAM_PATH,
    UPGRADE,
)
from ekko.net.httpkit import error_response
from ekko.node.core import NodeCore
from ekko.node.http_server import UPGRADE_KEY, DeadlineProtocol
from ekko.node.lookup_variant import Baseline, lookup_store
from ekko.node.table_routes import guarded
from ekko.node.write_stream import StreamStats, WriteStreamProtocol


def write_stream_route(
    core: NodeCore, max_body: int, stats: StreamStats, lookups: StreamStats | None = None
) -> Route:
    """``POST /v1/streams/write`` with ``Upgrade: ekko-rows/1``: the connection becomes a
    write stream (writer role, checked like every route before this runs; only at the
    source). Streams of both kinds together take at most half ``http.max_connections``: a
    stream holds its connection as long as its client likes, and with every connection a
    stream the node answered 503 to everything else, ``/ready`` and the guard's routes
    included."""
    return _stream_route(core, max_body, stats, lookups, lookups=False)


def lookup_stream_route(
    core: NodeCore,
    max_body: int,
    stats: StreamStats,
    writes: StreamStats,
    baseline: Baseline | None = None,
) -> Route:
    """``POST /v1/streams/lookup`` with ``Upgrade: ekko-lookup/1``: the connection becomes a
    lookup stream (reader role, on any node), under the same limit as write streams. With
    ``x-ekko-variant: baseline`` it reads ``baseline()`` (the guard's lagged store; 409
    naming the node, before the switch, when it keeps none)."""
    return _stream_route(core, max_body, stats, writes, lookups=True, baseline=baseline)


def _stream_route(
    core: NodeCore,
    max_body: int,
    stats: StreamStats,
    others: StreamStats | None,
    *,
    lookups: bool,
    baseline: Baseline | None = None,
) -> Route:
    connections = core.config.http.max_connections
    most = max(1, connections // 2)
    path, token, kind = (
        (LOOKUP_PATH, LOOKUP_UPGRADE, "lookup") if lookups else (STREAM_PATH, UPGRADE, "write")
    )

    @guarded
    async def upgrade(request: Request) -> Response:
        """Open a stream: answered ``101 Switching Protocols``, then frames
        (``ekko.client.stream_frames``): of rows at the source, or of lookups at any node."""
        if not lookups:
            core.require_source("open write streams to")
        if request.headers.get("upgrade", "").lower() != token:
            return error_response(f"upgrade: expected {token!r} (a {kind} stream)", 426)
        store = core.store
        if lookups:
            store = lookup_store(core.name, core.store, baseline, request.headers)
        open_now = stats.open + (others.open if others is not None else 0)
        if open_now >= most:
            return error_response(
                f"{open_now} streams are open, the most this node takes (half its "
                f"http.max_connections, {connections}): close one, or raise the limit",
                503,
            )
        conn: DeadlineProtocol | None = request.scope.get("state", {}).get(UPGRADE_KEY)
        if conn is None:
            return error_response("this server cannot switch protocols", 501)
        protocol = WriteStreamProtocol(
            core, max_body, stats, lookups=lookups, store=None if store is core.store else store
        )
        conn.switch(protocol, token, {MAX_FRAME_HEADER: str(max_body)})
        stats.opened += 1
        stats.open += 1
        try:
            await protocol.run()
        finally:
            stats.open -= 1
        return Response(status_code=101)  # never sent: the connection is the stream's now

    return Route(path, upgrade, methods=["POST"])


def stream_metrics(
    node: str, stats: StreamStats, kind: str = "write"
) -> Callable[[], Iterator[Metric]]:
    """A collector of the node's streams of ``kind`` (``write`` or ``lookup``): opened and
    open, frames answered and rows (keys) in them, frames refused, streams broken by a
    frame that could not be read."""
    what = "written (acknowledged once durable)" if kind == "write" else "answered"

    def collect() -> Iterator[Metric]:
        for name, family, doc, value in (
            (f"ekko_{kind}_streams_opened", CounterMetricFamily, f"{kind} streams opened",
             stats.opened),
            (f"ekko_{kind}_streams_open", GaugeMetricFamily, f"{kind} streams open now",
             stats.open),
            (f"ekko_{kind}_stream_frames", CounterMetricFamily, f"{kind}-stream frames {what}",
             stats.frames),
            (f"ekko_{kind}_stream_rows", CounterMetricFamily,
             f"Rows (keys) in {kind}-stream frames", stats.rows),
            (f"ekko_{kind}_stream_refusals", CounterMetricFamily,
             f"{kind}-stream frames refused (the reason went to the client)", stats.refused),
            (f"ekko_{kind}_streams_broken", CounterMetricFamily,
             f"{kind} streams closed on a frame whose head could not be read", stats.broken),
        ):  # fmt: skip
            m = family(name, doc, labels=["node"])
            m.add_metric([node], value)
            yield m

    return collect
