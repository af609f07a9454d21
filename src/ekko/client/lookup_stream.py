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
import ssl
from collections import deque
from collections.abc import Mapping
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
    every lookup waiting on it with ``ClientError`` and stays broken (``closed``): open a
    new one."""

    def __init__(
        self, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self.url = url
        self.max_frame = max_frame
        self._reader = reader
        self._writer = writer
        self._seq = 0
        self._waiting: deque[_Waiting] = deque()
        self._broken: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_answers())

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
    ) -> LookupStream:
        """Connect to ``url`` (``http(s)://host:port``) and switch to a lookup stream that
        reads ``variant``: ``online`` (the node's store) or ``baseline`` (the guard's lagged
        store; ``ClientError`` of status 409 naming the node where it keeps none)."""
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
            return cls(url, reader, writer, max_frame)
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
        if self._broken is not None:
            raise ClientError(f"lookup stream at {self.url} is closed: {self._broken}")
        frame = flat_lookup_frame(self._seq + 1, names, counts, keys, known)
        self._seq += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(self._seq, names[0], counts, fut))
        self._writer.writelines(frame)
        return await fut

    async def _read_answers(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(ANSWER.size)
                kind, _flags, status, n, seq = ANSWER.unpack(head)
                if not self._waiting or self._waiting[0].seq != seq:
                    raise ClientError(f"an answer to frame {seq}, none such was waiting")
                asked = self._waiting[0]  # popped once its answer is read whole
                name, fut = asked.name, asked.fut
                if kind == FOUND:
                    t, _ = FOUND_TAIL.unpack(await self._reader.readexactly(FOUND_TAIL.size))
                    if t != asked.counts.shape[0] or n != asked.keys:
                        raise ClientError(
                            f"an answer to frame {seq} of {t} tables and {n} keys; it asked "
                            f"{asked.counts.shape[0]} tables and {asked.keys} keys"
                        )
                    meta = np.frombuffer(await self._reader.readexactly(16 * t), "<i8")
                    dims, rows = meta[:t], meta[t:]
                    bad = (dims < 0) | (dims > MAX_DIM) | (rows < 0) | (rows > asked.counts)
                    if bad.any():  # bounded dims: dims * rows cannot overflow
                        raise ClientError(f"an answer to frame {seq} of sizes out of bounds")
                    total = int((dims * rows).sum())
                    if total > MAX_VALUES:
                        raise ClientError(f"an answer to frame {seq} of {total} values")
                    versions = np.frombuffer(await self._reader.readexactly(8 * n), "<i8")
                    values = np.frombuffer(await self._reader.readexactly(4 * total), "<f4")
                    self._waiting.popleft()
                    if not fut.done():
                        fut.set_result((dims, rows, versions, values))
                    continue
                if kind != REFUSED or n > MAX_REASON_BYTES:
                    raise ClientError(f"an answer to frame {seq} of kind {kind}, {n} bytes")
                why = (await self._reader.readexactly(n)).decode("utf-8", "replace")
                self._waiting.popleft()
                if not fut.done():
                    fut.set_exception(
                        ClientError(f"lookup of {name!r}... at {self.url}: {status} {why}", status)
                    )
        except (OSError, asyncio.IncompleteReadError, ClientError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            self._fail("closed")
            raise
        except Exception as exc:  # ours: the stream is unusable, and says so
            log.exception("lookup stream at %s: reading an answer failed", self.url)
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, why: str) -> None:
        self._broken = why
        while self._waiting:
            fut = self._waiting.popleft().fut
            if not fut.done():
                fut.set_exception(ClientError(f"lookup stream at {self.url} broke: {why}"))
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._fail("closed")


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
