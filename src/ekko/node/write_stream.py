"""A node's end of streams (``ekko.client.stream_frames``): at the source, write streams — a
client's frames in, their rows through the write port, an answer for each once it is on
disk; at any node, lookup streams — a serving node's lookups answered at once."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass

import numpy as np

from ekko.client.stream_frames import (
    FLAG_KNOWN,
    FOUND_HEAD,
    KIND_DELETE,
    KIND_LOOKUP,
    LOOKUP_PATH,
    MAX_NAME_BYTES,
    REQUEST,
    FrameError,
    WriteHead,
    found_head,
    parse_head,
    refused,
    written,
)
from ekko.net.httpkit import BODY_TIMEOUT_S
from ekko.node.core import NodeCore
from ekko.node.table_routes import ROW_ERRORS
from ekko.store import Store
from ekko.store.table_frames import (
    FRAME_BAD_COUNTS,
    FRAME_NOT_HELD,
    FRAME_TOO_BIG,
    frame_plan,
)

log = logging.getLogger(__name__)

_HEAD, _NAME, _BODY = range(3)
STAGE_BYTES = 16 * 1024
"""Bytes a stream reads at once between frames: a small frame (a lookup's) arrives whole in
one read, where its head, names and body took one read and one turn of the loop each."""
FRAME_TIMEOUT_S = BODY_TIMEOUT_S
"""A frame begun must be complete within this long (as a body on the HTTP port)."""
KEEPALIVE_IDLE_S = 60
"""A stream silent this long is probed (TCP keepalive, every 10 s, 6 times): a client that
vanished without closing (its machine gone, a NAT's state dropped) frees its place."""
MAX_UNANSWERED = 256
"""Frames a stream holds unanswered before it stops reading (a client that sends without
reading answers is held there, by TCP, not in memory)."""


Answer = bytes | memoryview | list
"""An answer as it is sent: one buffer, or several (``writelines``)."""


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
        self._stage = bytearray(STAGE_BYTES)  # read into between frames (``_staged``)
        self._name = bytearray(MAX_NAME_BYTES)
        self._body = np.empty(0, dtype=np.uint8)
        self._phase, self._need, self._got = _HEAD, REQUEST.size, 0
        self._frame: WriteHead | None = None
        self._answers: deque[tuple[int, np.ndarray | None, Answer]] = deque()
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
            return memoryview(self._stage)[self._got :]
        if self._phase == _NAME:
            return memoryview(self._name)[self._got : self._need]
        return memoryview(self._body)[self._got : self._need]

    def buffer_updated(self, nbytes: int) -> None:
        if self._last:
            return
        self._got += nbytes
        if self._phase == _HEAD:
            self._staged()
            return
        if self._got < self._need:
            return
        self._got = 0
        if self._phase == _NAME:
            self._to_body()
        else:
            self._disarm()
            self._write_frame()
            self._phase, self._need = _HEAD, REQUEST.size

    def _to_body(self) -> None:
        self._phase, self._need = _BODY, self._frame.body_bytes  # type: ignore[union-attr]
        if self._body.shape[0] < self._need:
            self._body = np.empty(self._need, dtype=np.uint8)

    def _staged(self) -> None:
        """The frames in the bytes read between frames (``_stage[:_got]``): each whole one
        written, in order; of one cut short, its names and body so far copied where the rest
        is read to (``_deadline`` armed from here). Stops while reading is paused (the
        window is full): ``_resume_reading`` goes on from what is left."""
        stage, end, at = self._stage, self._got, 0
        while end - at >= REQUEST.size and not self._last and not self._reading_paused:
            if not self._read_head(memoryview(stage)[at : at + REQUEST.size]):
                return
            at += REQUEST.size
            f = self._frame
            assert f is not None
            m = min(f.name_len, end - at)
            self._name[:m] = stage[at : at + m]
            at += m
            if m < f.name_len:
                self._got = m
                self._arm()
                return
            self._to_body()
            m = min(f.body_bytes, end - at)
            self._body[:m] = np.frombuffer(stage, np.uint8, m, at)
            at += m
            if m < f.body_bytes:
                self._got = m
                self._arm()
                return
            self._phase, self._need = _HEAD, REQUEST.size
            self._write_frame()
        stage[: end - at] = stage[at:end]  # a head cut short, or frames held back
        self._got = end - at

    def _arm(self) -> None:
        self._deadline = asyncio.get_running_loop().call_later(self.frame_timeout_s, self._expire)

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

    def _read_head(self, head: memoryview) -> bool:
        """Whether ``head`` begins a frame (``_frame``); if not, it is refused and the
        stream ends."""
        seq = REQUEST.unpack(head)[-1]
        try:
            self._frame = parse_head(head, self.max_body)
        except FrameError as exc:
            self.stats.broken += 1
            self._answer(seq, None, refused(seq, 400, str(exc)))
            self._end()  # what follows cannot be found: answer, then close
            return False
        self._phase, self._need = _NAME, self._frame.name_len
        return True

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
            if f.kind == KIND_LOOKUP:
                self._lookup(f, bytes(self._name[: f.name_len]))
                return
            name = self._name[: f.name_len].decode("utf-8")
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

    def _lookup(self, f: WriteHead, names: bytes) -> None:
        """Answer a lookup frame now (its answer still waits for any write before it)."""
        named = names.count(b"\n") + 1
        if named != f.dim:
            self._bad_counts(f, named)
            return
        store = self.store if self.store is not None else self.core.store
        holding = self.core.store.holding  # a baseline holds the node's partitions too
        plan = frame_plan(store, names, holding)
        out, status, detail = plan.answer(
            self._body[: f.body_bytes], f.n, bool(f.flags & FLAG_KNOWN), FOUND_HEAD,
            self.max_body,
        )  # fmt: skip
        if status == FRAME_BAD_COUNTS:
            self._bad_counts(f, f.dim, plan.tables, detail)
            return
        if status == FRAME_TOO_BIG:  # keys may repeat: a small frame must not answer without end
            self._refuse(f.seq, 413, f"tables: {f.n} keys would answer {detail} bytes; the "
                                     f"limit is {self.max_body}: split the lookup")  # fmt: skip
            return
        if status == FRAME_NOT_HELD:  # another partition's key: 421, never "not found"
            t = plan.tables[detail]
            keys = self._body[8 * f.dim : 8 * (f.dim + f.n)].view("<i8")
            counts = self._body[: 8 * f.dim].view("<i8")
            start = int(counts[:detail].sum())
            assert holding is not None
            holding.check_held(t, keys[start : start + int(counts[detail])])
            raise AssertionError(f"table {t.name!r}: a key held elsewhere passed")
        found_head(out, f.seq, f.n, f.dim)
        self.stats.frames += 1
        self.stats.rows += f.n
        self._answer(f.seq, None, memoryview(out)[:detail])

    def _bad_counts(
        self, f: WriteHead, names: int, tables: list | None = None, bad: int = -1
    ) -> None:
        """Refuse the frame, naming the count at fault (``bad``, of ``tables``) when known."""
        why = ""
        if tables is not None:
            counts = self._body[: 8 * f.dim].view("<i8")
            if bad < len(tables):
                left = f.n - int(counts[:bad].sum())  # each of them was 1..the keys left
                why = (f": count {bad} (table {tables[bad].name!r}) is {int(counts[bad])}, "
                       f"expected 1..{left}, the keys left")  # fmt: skip
            else:
                why = f": they sum to {int(counts.sum())}"
        self._refuse(f.seq, 400, f"a lookup of {f.dim} tables needs as many names "
                                 f"(got {names}) and counts of at least 1 key "
                                 f"summing to n = {f.n}{why}")  # fmt: skip

    def _refuse(self, seq: int, status: int, reason: str) -> None:
        self.stats.refused += 1
        self._answer(seq, None, refused(seq, status, reason))

    def _end(self) -> None:
        """Take no more frames: ``run`` sends what is queued, then closes the stream."""
        self._last = True
        self._wake.set()
        self._pause_reading()

    def _answer(self, seq: int, versions: np.ndarray | None, refusal: Answer) -> None:
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
            if self._phase == _HEAD:
                self._staged()  # the frames read and held back first
            if not self._reading_paused and not self._last:
                self.transport.resume_reading()

    # -- answers --------------------------------------------------------------------------

    def _send(self, answer: Answer) -> None:
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
