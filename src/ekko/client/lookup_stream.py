"""``LookupStream``: one asyncio lookup stream to a node (``ekko.client.stream_frames``).

Why asyncio: its caller is a serving node scattering each predict batch over partition
holders on its event loop; lookups of several batches share one stream, pipelined — frames
go out as they are asked for and answers come back in the same order, each resolving the
future of its frame, so a batch never waits for a connection and a lost hedge costs nothing
but an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np

from ekko.client.credentials import Credentials
from ekko.client.errors import ClientError
from ekko.client.stream_frames import (
    ANSWER,
    FOUND,
    FOUND_TAIL,
    LOOKUP_PATH,
    LOOKUP_UPGRADE,
    MAX_DIM,
    MAX_REASON_BYTES,
    REFUSED,
    VARIANT_HEADER,
    VARIANTS,
    flat_lookup_frame,
)
from ekko.client.upgrade import Resign, Upgrade
from ekko.client.wire import TableRows

MAX_HEAD_BYTES = 64 * 1024
MAX_VALUES = 1 << 28
"""Floats one answer may carry (1 GiB): a bigger count is a broken or hostile node."""

log = logging.getLogger(__name__)


class _Waiting(NamedTuple):
    """A lookup sent and not answered yet: its frame's seq, first table (for errors), the
    keys of each table (what its answer must fit) and the future its answer resolves."""

    seq: int
    name: str
    counts: np.ndarray
    fut: asyncio.Future

    @property
    def keys(self) -> int:
        return int(self.counts.sum())


class LookupStream:
    """Lookups of several tables at a node over one stream (the reader role).

    Open with :meth:`open`; :meth:`lookup` may be called concurrently. A broken stream fails
    every lookup waiting on it with ``ClientError`` (or what ``failure`` makes of it) and
    stays broken (``closed``): open a new one.

    Why answers are read by a protocol and not a task: an answer is parsed as its bytes
    arrive and resolves its lookup's future there; a reader task cost, per answer, a wake-up
    of its own and an ``await`` per part of the answer, on every partition of every predict
    batch a serving node scatters.

    ``stall_s``: a lookup sent while lookups have waited that long without a byte of answer
    breaks the stream instead (the caller opens a new one). Why: a node that stopped
    answering on a stream it keeps open (hung, or a half answer and nothing more) never
    breaks it; its lookups lost to hedges to other holders, but their entries stayed here
    for good, one more each time the node was asked, and the stream was never opened again
    (a fake holder that answers 3 frames, then hangs).
    None: never."""

    def __init__(
        self,
        url: str,
        writer: asyncio.StreamWriter,
        max_frame: int,
        failure: Callable[[ClientError], Exception] | None = None,
        stall_s: float | None = None,
    ) -> None:
        self.url = url
        self.max_frame = max_frame
        self.stall_s = stall_s
        self._writer = writer
        self._failure = failure
        self._loop = asyncio.get_running_loop()
        self._heard = 0.0  # loop time of the last answer's bytes, or of a send none waited on
        self._seq = 0
        self._waiting: deque[_Waiting] = deque()
        self._broken: str | None = None
        self._buf = bytearray()
        writer.transport.set_protocol(_Answers(self))

    @classmethod
    async def open(
        cls,
        url: str,
        credentials: Credentials,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        role: str = "reader",
        resigns: int = 3,
        variant: str = "online",
        failure: Callable[[ClientError], Exception] | None = None,
        stall_s: float | None = None,
    ) -> LookupStream:
        """Connect to ``url`` (``http(s)://host:port``) and switch to a lookup stream that
        reads ``variant``: ``online`` (the node's store) or ``baseline`` (the guard's lagged
        store; ``ClientError`` of status 409 naming the node where it keeps none).
        ``failure``: what a lookup raises instead of a ``ClientError`` (a caller's own
        error naming the node, say), once the stream is open. ``stall_s``: see the class."""
        if stall_s is not None and not (math.isfinite(stall_s) and stall_s > 0):
            raise ValueError(f"stall_s: expected a finite number > 0 or None, got {stall_s!r}")
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ClientError(f"lookup stream at {url}: not an http(s)://host:port URL")
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        for _ in range(max(1, resigns)):
            if u.scheme == "https":
                ctx = tls or ssl.create_default_context()
                reader, writer = await asyncio.open_connection(
                    u.hostname, u.port or 443, ssl=ctx,
                    server_hostname=server_name or u.hostname, limit=MAX_HEAD_BYTES,
                )  # fmt: skip
            else:
                reader, writer = await asyncio.open_connection(
                    u.hostname, u.port or 80, limit=MAX_HEAD_BYTES
                )
            try:
                max_frame = await _upgrade(
                    url, u.netloc, credentials, role, reader, writer, variant
                )
            except Resign:
                writer.close()
                continue
            except BaseException:
                writer.close()
                raise
            return cls(url, writer, max_frame, failure, stall_s)
        raise ClientError(f"lookup stream at {url}: its signature was refused {resigns} times")

    @property
    def closed(self) -> bool:
        return self._broken is not None

    async def lookup(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, TableRows]:
        """Each table's rows for its keys (int64), in one frame; ``known`` (int64 per key,
        the versions the caller holds) leaves the values of rows at that version out.
        ``ClientError`` naming the node's reason for a refused frame, or why the stream
        broke."""
        names = list(tables)
        keys = [np.ascontiguousarray(tables[n], dtype="<i8") for n in names]
        counts = np.array([k.shape[0] for k in keys], dtype=np.int64)
        ends = np.cumsum(counts).tolist()
        held = None
        if known:  # one array of -1 (none held), the known tables' versions copied in
            held = np.full(ends[-1], -1, np.int64)
            at = 0
            for n, k, end in zip(names, keys, ends, strict=True):
                v = known.get(n)
                if v is not None:
                    if np.shape(v) != k.shape:
                        raise ValueError(
                            f"known[{n!r}]: expected {k.shape[0]} versions, one per key, got "
                            f"shape {np.shape(v)}"
                        )
                    held[at:end] = v
                at = end
        flat = keys[0] if len(keys) == 1 else np.concatenate(keys)
        dims, rows, versions, values = await self.lookup_flat(names, counts, flat, held)
        found = (versions > 0).view(np.uint8)  # once for the frame, sliced per table
        out = {}
        at = vat = 0
        for name, end, dim, m in zip(names, ends, dims.tolist(), rows.tolist(), strict=True):
            vend = vat + m * dim
            out[name] = TableRows(
                name, versions[at:end], found[at:end], values[vat:vend].reshape(m, dim)
            )
            at, vat = end, vend
        return out

    async def lookup_flat(
        self, names: list[str], counts: np.ndarray, keys: np.ndarray, known: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One frame's lookup as it goes out and comes back: tables ``names``, ``counts``
        (int64, each >= 1) of the ``keys`` (int64 [n], table after table) each, ``known``
        (int64 [n], -1: none held) if given; returns each table's row length and rows of
        values sent (int64 [tables] each), each key's version (int64 [n]) and the values
        (float32, table after table, row after row). Errors as :meth:`lookup`'s."""
        return await self.send_flat(names, counts, keys, known)

    def send_flat(
        self, names: list[str], counts: np.ndarray, keys: np.ndarray, known: np.ndarray | None
    ) -> asyncio.Future[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`lookup_flat` without a coroutine: the frame goes out now, the future
        resolves as its answer is read."""
        if self.stall_s is not None:
            now = self._loop.time()
            if not self._waiting:
                self._heard = now
            elif now - self._heard > self.stall_s:
                self._fail(
                    f"no answer for {now - self._heard:.1f} s (stall_s {self.stall_s:g}) with "
                    f"{len(self._waiting)} lookups waiting"
                )
        if self._broken is not None:
            raise self._error(ClientError(f"lookup stream at {self.url} is closed: {self._broken}"))
        frame = flat_lookup_frame(self._seq + 1, names, counts, keys, known)
        self._seq += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(self._seq, names[0], counts, fut))
        self._writer.writelines(frame)
        return fut

    def _error(self, exc: ClientError) -> Exception:
        return exc if self._failure is None else self._failure(exc)

    def _received(self, data: bytes) -> None:
        """Bytes of answers: each answer read whole resolves its lookup; a broken one breaks
        the stream."""
        if self._broken is not None:
            return
        if self.stall_s is not None:
            self._heard = self._loop.time()
        buf = self._buf
        buf += data
        at = 0
        try:
            while used := self._answer(buf, at):
                at += used
        except ClientError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # ours: the stream is unusable, and says so
            log.exception("lookup stream at %s: reading an answer failed", self.url)
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if at:
            del buf[:at]

    def _answer(self, buf: bytearray, at: int) -> int:
        """The answer at ``buf[at:]`` given to its lookup: its size in bytes, 0 while it is
        not all there."""
        have = len(buf) - at
        if have < ANSWER.size:
            return 0
        kind, _flags, status, n, seq = ANSWER.unpack_from(buf, at)
        if not self._waiting or self._waiting[0].seq != seq:
            raise ClientError(f"an answer to frame {seq}, none such was waiting")
        asked = self._waiting[0]  # popped once its answer is read whole
        if kind == FOUND:
            head = ANSWER.size + FOUND_TAIL.size
            if have < head:
                return 0
            t, _ = FOUND_TAIL.unpack_from(buf, at + ANSWER.size)
            if t != asked.counts.shape[0] or n != asked.keys:
                raise ClientError(
                    f"an answer to frame {seq} of {t} tables and {n} keys; it asked "
                    f"{asked.counts.shape[0]} tables and {asked.keys} keys"
                )
            if have < head + 16 * t:
                return 0
            meta = np.frombuffer(buf, "<i8", 2 * t, at + head).copy()
            dims, rows = meta[:t], meta[t:]
            bad = (dims < 0) | (dims > MAX_DIM) | (rows < 0) | (rows > asked.counts)
            if bad.any():  # bounded dims: dims * rows cannot overflow
                raise ClientError(f"an answer to frame {seq} of sizes out of bounds")
            total = int((dims * rows).sum())
            if total > MAX_VALUES:
                raise ClientError(f"an answer to frame {seq} of {total} values")
            size = head + 16 * t + 8 * n + 4 * total
            if have < size:
                return 0
            at += head + 16 * t
            versions = np.frombuffer(buf, "<i8", n, at).copy()
            values = np.frombuffer(buf, "<f4", total, at + 8 * n).copy()
            self._waiting.popleft()
            if not asked.fut.done():
                asked.fut.set_result((dims, rows, versions, values))
            return size
        if kind != REFUSED or n > MAX_REASON_BYTES:
            raise ClientError(f"an answer to frame {seq} of kind {kind}, {n} bytes")
        if have < ANSWER.size + n:
            return 0
        why = bytes(buf[at + ANSWER.size : at + ANSWER.size + n]).decode("utf-8", "replace")
        self._waiting.popleft()
        if not asked.fut.done():
            what = f"lookup of {asked.name!r}... at {self.url}: {status} {why}"
            asked.fut.set_exception(self._error(ClientError(what, status)))
        return ANSWER.size + n

    def _fail(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
        while self._waiting:
            fut = self._waiting.popleft().fut
            if not fut.done():
                fut.set_exception(
                    self._error(ClientError(f"lookup stream at {self.url} broke: {why}"))
                )
        self._buf.clear()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        self._fail("closed")


class _Answers(asyncio.Protocol):
    """The stream's transport after the switch: its bytes to the stream's answers."""

    def __init__(self, stream: LookupStream) -> None:
        self.stream = stream

    def data_received(self, data: bytes) -> None:
        self.stream._received(data)

    def eof_received(self) -> bool:
        self.stream._fail("the node closed the stream")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "the connection closed"
        self.stream._fail(why)


async def _upgrade(
    url: str,
    host: str,
    credentials: Credentials,
    role: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    variant: str = "online",
) -> int:
    sign = credentials.headers(role, "POST", LOOKUP_PATH, b"", host)
    headers = {"host": host, "connection": "upgrade", "upgrade": LOOKUP_UPGRADE,
               "content-length": "0", **sign}  # fmt: skip
    if variant != "online":  # an older node ignores the header: only sent when needed
        headers[VARIANT_HEADER] = variant
    up = Upgrade(f"lookup stream at {url}", LOOKUP_PATH, headers)
    writer.write(up.request())
    while (limit := up.receive(await reader.read(MAX_HEAD_BYTES))) is None:
        pass
    if up.early:
        raise ClientError(f"lookup stream at {url}: bytes before any frame was sent")
    return limit
