"""A node's end of streams (``ekko.client.stream_frames``): at the source, write streams — a
client's frames in, their rows through the write port, an answer for each once it is on
disk; at any node, lookup streams — a serving node's lookups answered at once."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.client.stream_frames import (
    FLAG_KNOWN,
    KIND_DELETE,
    KIND_LOOKUP,
    LOOKUP_PATH,
    LOOKUP_UPGRADE,
    MAX_FRAME_HEADER,
    MAX_NAME_BYTES,
    REQUEST,
    STREAM_PATH,
    UPGRADE,
    FrameError,
    WriteHead,
    found,
    parse_head,
    refused,
    written,
)
from ekko.net.httpkit import BODY_TIMEOUT_S, error_response
from ekko.node.core import NodeCore
from ekko.node.http_server import UPGRADE_KEY, DeadlineProtocol
from ekko.node.lookup_variant import Baseline, lookup_store
from ekko.node.table_routes import ROW_ERRORS, guarded
from ekko.store import Store
from ekko.store.table_frames import lookup_tables

log = logging.getLogger(__name__)

_HEAD, _NAME, _BODY = range(3)
FRAME_TIMEOUT_S = BODY_TIMEOUT_S
"""A frame begun must be complete within this long (as a body on the HTTP port)."""
KEEPALIVE_IDLE_S = 60
"""A stream silent this long is probed (TCP keepalive, every 10 s, 6 times): a client that
vanished without closing (its machine gone, a NAT's state dropped) frees its place."""
MAX_UNANSWERED = 256
"""Frames a stream holds unanswered before it stops reading (a client that sends without
reading answers is held there, by TCP, not in memory)."""


@dataclass
class StreamStats:
    """What every write stream of this node did, for ``/metrics``."""

    opened: int = 0
    open: int = 0
    frames: int = 0
    rows: int = 0
    refused: int = 0
    broken: int = 0  # streams closed on a frame whose head could not be used


def _status_of(exc: BaseException) -> int | None:
    for kind, status in ROW_ERRORS.items():
        if isinstance(exc, kind):
            return status if isinstance(status, int) else status[0]
    return None


class WriteStreamProtocol(asyncio.BufferedProtocol):
    """One client's write stream at the source, after the upgrade.

    Why a buffered protocol: the kernel copies each frame's keys and values straight into a
    buffer this stream reuses for every frame (``recv_into``), and the store copies them from
    there; nothing else touches them. Frames are written in order as they arrive, on the
    loop; answers go out in the same order once the write-ahead log has them on disk (one
    fsync for every frame of a group commit). At most ``window`` frames wait for their
    answer: beyond that the stream stops reading, and the client's sends block (back-pressure
    by TCP, as the queue of an HTTP server would give).
    """

    def __init__(
        self,
        core: NodeCore,
        max_body: int,
        stats: StreamStats,
        window: int = MAX_UNANSWERED,
        frame_timeout_s: float | None = None,
        *,
        lookups: bool = False,
        store: Store | None = None,
    ):
        self.core = core
        self.lookups = lookups  # a lookup stream: lookup frames only, answered at once
        self.store = store  # what lookups read (None: the node's; the baseline's lagged one)
        self.frame_timeout_s = FRAME_TIMEOUT_S if frame_timeout_s is None else frame_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self.max_body = max_body
        self.stats = stats
        self.window = window
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(REQUEST.size)
        self._name = bytearray(MAX_NAME_BYTES)
        self._body = np.empty(0, dtype=np.uint8)
        self._phase, self._need, self._got = _HEAD, REQUEST.size, 0
        self._frame: WriteHead | None = None
        self._answers: deque[tuple[int, np.ndarray | None, bytes | list]] = deque()
        self._wake = asyncio.Event()
        self._reading_paused = False
        self._writing = asyncio.Event()
        self._writing.set()
        self._last = False  # the stream ends after the answers queued so far
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio's side -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _probe_when_silent(sock)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._last = True
        self._answers.clear()  # no one to answer: writing them to a dead transport logs each
        self._wake.set()
        self._writing.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing.clear()

    def resume_writing(self) -> None:
        self._writing.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._last:  # the stream takes no more frames: what still arrives is dropped
            return memoryview(self._name)
        if self._phase == _HEAD:
            return memoryview(self._head)[self._got :]
        if self._phase == _NAME:
            return memoryview(self._name)[self._got : self._need]
        return memoryview(self._body)[self._got : self._need]

    def buffer_updated(self, nbytes: int) -> None:
        if self._last:
            return
        self._got += nbytes
        if self._got < self._need:
            return
        self._got = 0
        if self._phase == _HEAD:
            self._read_head()
        elif self._phase == _NAME:
            self._phase, self._need = _BODY, self._frame.body_bytes  # type: ignore[union-attr]
            if self._body.shape[0] < self._need:
                self._body = np.empty(self._need, dtype=np.uint8)
        else:
            self._disarm()
            self._write_frame()
            self._phase, self._need = _HEAD, REQUEST.size

    def _expire(self) -> None:
        self._deadline = None
        self.stats.broken += 1
        log.warning("write stream closed: a frame took over %.0f s to arrive", self.frame_timeout_s)
        self._end()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def eof_received(self) -> bool:
        self._last = True  # answer what was written, then close
        self._wake.set()
        return True

    # -- frames ---------------------------------------------------------------------------

    def _read_head(self) -> None:
        seq = REQUEST.unpack(self._head)[-1]
        try:
            self._frame = parse_head(self._head, self.max_body)
        except FrameError as exc:
            self.stats.broken += 1
            self._answer(seq, None, refused(seq, 400, str(exc)))
            self._end()  # what follows cannot be found: answer, then close
            return
        self._phase, self._need = _NAME, self._frame.name_len
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.frame_timeout_s, self._expire)

    def _write_frame(self) -> None:
        f = self._frame
        assert f is not None
        keys = self._body[: 8 * f.n].view("<i8")
        if self.lookups != (f.kind == KIND_LOOKUP):
            why = (
                "a lookup stream takes lookup frames only"
                if self.lookups
                else f"a write stream takes writes and deletes; lookups go to {LOOKUP_PATH}"
            )
            self._refuse(f.seq, 400, f"frame kind {f.kind}: {why}")
            return
        try:
            name = self._name[: f.name_len].decode("utf-8")
            if f.kind == KIND_LOOKUP:
                self._lookup(f, name)
                return
            if f.kind == KIND_DELETE:
                versions = self.core.delete(name, keys)
            else:
                dim = self.core.store.table(name).dim
                if f.dim != dim:
                    self._refuse(f.seq, 400, f"dim: table {name!r} has rows of dim {dim}, "
                                             f"the frame's are of dim {f.dim}")  # fmt: skip
                    return
                values = self._body[8 * f.n : f.body_bytes].view("<f4").reshape(f.n, dim)
                versions = self.core.write(name, keys, values)
        except UnicodeDecodeError:
            self._refuse(f.seq, 400, "table name: not utf-8")
            return
        except Exception as exc:
            status = _status_of(exc)
            if status is None:  # ours, not the frame's: said to the client, then closed
                log.exception("write stream: frame %d failed", f.seq)
                self.stats.broken += 1
                self._refuse(f.seq, 500, f"internal error: {exc!r}")
                self._end()
                return
            self._refuse(f.seq, status, str(exc))
            return
        self.stats.frames += 1
        self.stats.rows += f.n
        self._answer(f.seq, versions, b"")

    def _lookup(self, f: WriteHead, names: str) -> None:
        """Answer a lookup frame now (its answer still waits for any write before it)."""
        tables = names.split("\n")
        body = self._body
        counts = body[: 8 * f.dim].view("<i8")
        if len(tables) != f.dim or int(counts.min()) < 1 or int(counts.sum()) != f.n:
            self._refuse(f.seq, 400, f"a lookup of {f.dim} tables needs as many names "
                                     f"(got {len(tables)}) and counts of at least 1 key "
                                     f"summing to n = {f.n}")  # fmt: skip
            return
        keys = body[8 * f.dim : 8 * (f.dim + f.n)].view("<i8")
        known = body[8 * (f.dim + f.n) : f.body_bytes].view("<i8") if f.flags & FLAG_KNOWN else None
        store = self.store if self.store is not None else self.core.store
        asked = [store.table(name) for name in tables]
        starts = np.zeros(f.dim + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        holding = self.core.store.holding  # a baseline holds the node's partitions too
        if holding is not None:  # another partition's key: 421, never "not found"
            holding.check_held_many(asked, keys, starts)
        dims = np.array([t.dim for t in asked], np.int64)
        answer = int((counts * (8 + 4 * dims)).sum())
        if answer > self.max_body:  # keys may repeat: a small frame must not answer without end
            self._refuse(f.seq, 413, f"tables: {f.n} keys would answer {answer} bytes; the "
                                     f"limit is {self.max_body}: split the lookup")  # fmt: skip
            return
        got = lookup_tables(asked, keys, starts, known)
        self.stats.frames += 1
        self.stats.rows += f.n
        self._answer(f.seq, None, found(f.seq, dims, got.rows, got.versions, [got.values]))

    def _refuse(self, seq: int, status: int, reason: str) -> None:
        self.stats.refused += 1
        self._answer(seq, None, refused(seq, status, reason))

    def _end(self) -> None:
        """Take no more frames: ``run`` sends what is queued, then closes the stream."""
        self._last = True
        self._wake.set()
        self._pause_reading()

    def _answer(self, seq: int, versions: np.ndarray | None, refusal: bytes | list) -> None:
        if (
            self.lookups
            and not self._answers
            and self._writing.is_set()
            and not self.closed.done()
            and self.transport is not None
        ):  # a lookup stream's answer waits for no write: with none queued before it, it
            # goes now, in order, without waking ``run`` (a task step a frame cost CPU)
            self._send(refusal)
            return
        self._answers.append((seq, versions, refusal))
        self._wake.set()
        if len(self._answers) >= self.window:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._last and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- answers --------------------------------------------------------------------------

    def _send(self, answer: bytes | list) -> None:
        if isinstance(answer, list):
            self.transport.writelines(answer)  # type: ignore[union-attr]
        else:
            self.transport.write(answer)  # type: ignore[union-attr]

    async def run(self) -> None:
        """Answer frames as their writes become durable, until the stream ends."""
        assert self.transport is not None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._answers:
                    await self._send_answers()
                    self._resume_reading()
                if self._last and not self._answers:
                    break
        finally:
            self.transport.close()
            await self.closed

    async def _send_answers(self) -> None:
        batch = list(self._answers)
        self._answers.clear()
        failure: str | None = None
        if any(v is not None for _, v, _ in batch):
            try:
                await self.core.wait_durable()  # every write so far, so all of ``batch``
            except Exception as exc:
                status = _status_of(exc)
                if status is None:
                    raise
                failure = f"write not durable: {exc}"
        if self.closed.done():
            return  # the client went while the batch became durable
        for seq, versions, refusal in batch:
            if versions is not None and failure is not None:
                self.stats.refused += 1
                self._send(refused(seq, 503, failure))
            else:
                self._send(refusal if versions is None else written(seq, versions))
        await self._writing.wait()  # a client that reads no answers gets no more frames in


def _probe_when_silent(sock: socket.socket) -> None:
    """TCP keepalive on a stream's socket: an idle stream stays open (its client may pause
    between frames for as long as it likes), so only the kernel can tell a client gone."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", 10),
                        ("TCP_KEEPCNT", 6)):  # fmt: skip
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


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
