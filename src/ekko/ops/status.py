"""``ekko status``: one table of every node of a cluster, from each node's ``/v1/status``.

Why a table built here and not on a node: an operator wants the whole cluster at once,
including the nodes that do not answer (a row saying so, never a traceback), and a node
knows only itself. Rates (bytes/s) are the difference of two samples, so one frame reads
every node twice, ``interval`` apart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table as RichTable

from ekko.node.access import ClusterAuth
from ekko.node.config import ClusterConfig
from ekko.node.config_partitions import describe
from ekko.node.http_client import ClusterHttp

NodeStatus = dict[str, Any] | str
"""A node's ``/v1/status`` document, or why it could not be read."""


@dataclass(frozen=True)
class NodeRow:
    """One node's line of the table (``None``: not known, such as a node that is down)."""

    node: str
    role: str
    dc: str
    partitions: str
    upstream: str | None
    lag_versions: int | None
    lag_seconds: float | None
    rows: int | None
    in_bytes_per_s: float | None
    out_bytes_per_s: float | None
    guard: str | None
    state: str  # ready, starting, stopping, down: TASKS, recovering, unreachable, HTTP status
    error: str | None = None  # why a node could not be read


MAX_STATUS_BYTES = 8 << 20
"""A ``/v1/status`` answer larger than this is not a node's status (a misdirected port)."""


async def _read_one(client: httpx.AsyncClient, url: str) -> NodeStatus:
    try:
        async with client.stream("GET", url) as r:
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > MAX_STATUS_BYTES:
                    return f"bad answer: over {MAX_STATUS_BYTES} bytes"
    except httpx.HTTPError as exc:
        return f"unreachable ({type(exc).__name__}: {exc})"[:160]
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {body[:120].decode(errors='replace')}"
    try:
        doc = json.loads(body)
    except ValueError as exc:
        return f"bad answer: {exc}"[:160]
    if not isinstance(doc, dict):
        return f"bad answer: a JSON {type(doc).__name__}, not a status document"
    return doc


def read_all(
    cfg: ClusterConfig, http: ClusterHttp, auth: httpx.Auth, timeout: float
) -> dict[str, NodeStatus]:
    """Every node's status, or a short reason it is not there, read at once: a node that
    has not answered whole within ``timeout`` seconds (one dripping its answer, or stalled
    after accepting the connection) is a row saying so, never a wait without end."""

    async def one(client: httpx.AsyncClient, name: str) -> NodeStatus:
        try:
            return await asyncio.wait_for(_read_one(client, http.url(name, "/v1/status")),
                                          timeout)  # fmt: skip
        except TimeoutError:
            return f"unreachable (no whole answer within {timeout:g} s)"

    async def every() -> list[NodeStatus]:
        async with http.async_client(auth=auth, timeout=timeout) as client:
            return await asyncio.gather(*(one(client, n.name) for n in cfg.nodes))

    return dict(zip([n.name for n in cfg.nodes], asyncio.run(every()), strict=True))


def _bytes(doc: NodeStatus) -> tuple[int, int] | None:
    if isinstance(doc, str):
        return None
    got = sum(int(link.get("bytes", 0)) for link in doc.get("links", {}).values())
    sent = int(doc.get("served", {}).get("bytes", 0))
    return got, sent


def _guard(doc: dict[str, Any]) -> str | None:
    guard = doc.get("guard")
    if not guard:
        return None
    return ", ".join(f"{m}:{g['state']}" for m, g in sorted(guard.items()))


def node_row(
    cfg: ClusterConfig, name: str, before: NodeStatus, after: NodeStatus, seconds: float
) -> NodeRow:
    """``name``'s line from two samples ``seconds`` apart (the rates from their difference);
    a document without the fields a status has is a row saying so."""
    if not isinstance(after, str):
        try:
            return _answered_row(cfg, name, before, after, seconds)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            after = f"bad answer: not a node's status ({type(exc).__name__}: {exc})"[:160]
    state = after.partition(" (")[0].partition(":")[0]  # unreachable, HTTP 503, bad answer
    held = describe(cfg.held(name), cfg.cluster.partitions)
    return NodeRow(name, cfg.role(name), cfg.node(name).dc, held, None, None, None, None,
                   None, None, None, state, after)  # fmt: skip


def _partitions(cfg: ClusterConfig, name: str, doc: dict[str, Any]) -> str:
    """The partitions ``name`` holds (``all``, or their ids) and, partitioned, how many
    versions it lacks of each: ``0 (lag 12)``."""
    held = [int(p) for p in doc.get("partitions", cfg.held(name))]
    lags = doc.get("replica_lag", {}).get("partitions", {})
    if not cfg.partitioned or not lags:
        return describe(held, cfg.cluster.partitions)
    return ", ".join(
        f"{p} (lag {lags[str(p)]['versions_behind']})" if str(p) in lags else str(p) for p in held
    )


def _state(status: dict[str, Any]) -> str:
    """``ready``; ``down: NAMES`` for a node with background tasks down (one restarting
    after an error: ``/ready`` is 503 naming them); ``stopping`` for one shutting down;
    else ``starting``. Only a JSON ``true`` (or no field: a node from before readiness was in
    ``/v1/status``) is ready; a hostile ``"false"`` string is not."""
    if status.get("ready", True) is True:
        return "ready"
    down = status.get("down")
    if isinstance(down, dict) and down:
        return "down: " + ", ".join(sorted(str(k) for k in down))
    return "stopping" if status.get("why") == "stopping" else "starting"


def _answered_row(
    cfg: ClusterConfig, name: str, before: NodeStatus, after: dict[str, Any], seconds: float
) -> NodeRow:
    role, dc = cfg.role(name), cfg.node(name).dc
    lag = after.get("replica_lag", {}).get("tables", {})
    source = after.get("role") == "source"
    rates: list[float | None] = [None, None]
    b0, b1 = _bytes(before), _bytes(after)
    if b0 is not None and b1 is not None and seconds > 0:
        rates = [max(0, b1[i] - b0[i]) / seconds for i in (0, 1)]
    state = _state(after)
    if source and after.get("accepting_writes") is False:
        state = "recovering"
    return NodeRow(
        node=name,
        role=str(after.get("role", role)),
        dc=str(after.get("dc", dc)),
        partitions=_partitions(cfg, name, after),
        upstream=None if after.get("upstream") is None else str(after["upstream"]),
        lag_versions=0
        if source
        else sum(int(t["versions"]) for t in lag.values())
        if lag
        else None,
        lag_seconds=0.0
        if source
        else max(float(t["seconds"]) for t in lag.values())
        if lag
        else None,
        rows=sum(int(t["rows"]) for t in after.get("tables", {}).values()),
        in_bytes_per_s=rates[0],
        out_bytes_per_s=rates[1],
        guard=_guard(after),
        state=state,
    )


def frame(
    cfg: ClusterConfig,
    read: Callable[[], dict[str, NodeStatus]],
    interval: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[NodeRow]:
    """One table: every node read twice, ``interval`` apart."""
    t0, before = clock(), read()
    sleep(interval)
    t1, after = clock(), read()
    return [node_row(cfg, n.name, before[n.name], after[n.name], t1 - t0) for n in cfg.nodes]


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _rate(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def render(rows: list[NodeRow], title: str) -> RichTable:
    """The table of ``rows``. Every text is escaped: it comes from the nodes (task names, an
    HTTP error's body) and rich would read ``[/x]`` as markup (a closing tag without an
    opening one raises, and the whole table is lost)."""
    errors = "\n".join(escape(f"{r.node}: {r.error}") for r in rows if r.error)
    t = RichTable(title=escape(title), caption=errors or None, caption_justify="left")
    heads = ("node", "role", "dc", "partitions", "upstream", "lag v", "lag s", "rows",
             "in /s", "out /s", "guard", "state")  # fmt: skip
    for h in heads:
        t.add_column(
            h,
            overflow="fold",
            justify="right" if h.startswith(("lag", "rows", "in", "out")) else "left",
        )
    for r in rows:
        down = r.error is not None
        state = escape(r.state)
        t.add_row(
            *map(escape, (r.node, r.role, r.dc, r.partitions, r.upstream or "—")),
            _num(r.lag_versions, "d"), _num(r.lag_seconds, ".1f"), _num(r.rows, "d"),
            _rate(r.in_bytes_per_s), _rate(r.out_bytes_per_s), escape(r.guard or "—"),
            f"[red]{state}[/red]" if down else state,
        )  # fmt: skip
    return t


def as_json(rows: list[NodeRow]) -> str:
    return json.dumps({"at": time.time(), "nodes": [asdict(r) for r in rows]})


def frames(
    cfg: ClusterConfig, http: ClusterHttp, auth: httpx.Auth, interval: float, count: int
) -> Iterator[list[NodeRow]]:
    """``count`` frames (0: until interrupted), each ``interval`` long."""
    timeout = max(2.0, interval)
    n = 0
    while count <= 0 or n < count:
        yield frame(cfg, lambda: read_all(cfg, http, auth, timeout), interval)
        n += 1


def run_status(
    cfg: ClusterConfig,
    base_dir: Path,
    secret: bytes,
    *,
    watch: bool,
    interval: float,
    count: int,
    json_out: bool,
    console: Console,
) -> list[NodeRow]:
    """Print the table once, or per ``interval`` with ``watch`` (in place on a terminal, a
    frame after another otherwise; one JSON document per line with ``json_out``). Returns
    the last frame's rows."""
    http = ClusterHttp(cfg, base_dir)
    count = count if watch else 1
    last: list[NodeRow] = []
    it = frames(cfg, http, ClusterAuth(secret), interval, count)
    title = lambda: f"{cfg.cluster.name} · {time.strftime('%H:%M:%S')}"  # noqa: E731
    if watch and not json_out and console.is_terminal:
        with Live(console=console, auto_refresh=False) as live:
            for last in it:
                live.update(render(last, title()), refresh=True)
        return last
    for last in it:
        if json_out:
            print(as_json(last), file=console.file, flush=True)
        else:
            console.print(render(last, title()))
    return last
