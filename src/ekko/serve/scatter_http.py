"""``HttpHolders``: the scatter's ``Fetch`` over the nodes' HTTP ports: a lookup stream per
holder (``ekko.client.lookup_stream``, the default), or ``POST /v1/lookup`` requests.

Why streams: a batch scattered over 4 partitions costs 4 lookups, and a lookup of 26 tables x
8 keys cost its holder 0.54 ms of CPU as a ``POST`` (the ASGI server, routing, the signature,
msgpack) against 0.22 ms as one frame on a lookup stream (medians of 3 alternated blocks of
1 000 lookups, /proc CPU of the holder, loaded machine:
``/work/briefs/s12scripts/lookup_cpu.py``; one frame per table had cost 1.02 ms).

Why a small HTTP/1.1 client of its own and not httpx: a predict batch costs one request per
partition, and on this machine an httpx request costs its caller ~1.1 ms of CPU against
~0.35 ms for a pre-formatted request on a kept-alive asyncio stream (measured on a quiet
node, 26 tables of 32 keys); with 4 partitions that difference alone is most of a batch's
serving time. It speaks only what the node answers this route with: a status line, headers
and a ``content-length`` body on a keep-alive connection (anything else is a
``HolderFailed``, and the connection is dropped).

Why here and not in the node: the serving node, the integration tests and ``ekko bench
scale`` reach holders the same way; the node hands over what only it knows — its cluster's
TLS context and node names (``ClusterHttp``) and the credentials it signs with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import ssl
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import numpy as np

from ekko.client import calls
from ekko.client.base import MAX_RESIGNS
from ekko.client.credentials import Credentials
from ekko.client.errors import ClientError
from ekko.client.lookup_stream import LookupStream
from ekko.client.stream_frames import VARIANT_HEADER, VARIANTS
from ekko.client.wire import TableRows, WireError
from ekko.net.signed_requests import RESIGN_HEADER
from ekko.serve.scatter_fetch import Fetch, FlatAsk, FlatRows, HolderFailed, flat_rows, tables_of
from ekko.store import Store, UnknownTableError
from ekko.store.table_frames import lookup_tables

MAX_HEAD_BYTES = 64 * 1024
STALL_S = 5.0
"""Seconds a holder's stream may keep lookups waiting without a byte of answer before the
next lookup opens a new one: several scatter deadlines (1 s by default), so a holder that is
merely slow keeps its stream; a hung one is dropped after a few lookups lost to hedges."""


class _BadAnswer(Exception):
    """An answer this client does not read (no content-length, a broken head)."""


class _Conn:
    """One keep-alive connection to a holder."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise _BadAnswer(f"status line {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is None or not length.isdigit():
            raise _BadAnswer("an answer without content-length")
        body = await self.reader.readexactly(int(length))
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        return int(parts[1]), headers, body

    def close(self) -> None:
        self.reusable = False
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpHolders:
    """Asks one holder (a node's base URL, ``http(s)://host:port``) for rows of several
    tables in one signed binary request, as a reader, on kept-alive connections.

    Why a class: the idle connections of every holder are shared by every batch (a batch
    costs a request per partition, not a TCP handshake).

    Args:
        credentials: what the requests are signed with (the cluster secret at a node).
        tls: the context https holders are checked with (the cluster CA's).
        server_name: a holder URL's TLS server name (the node's name, as ``ClusterHttp``
            checks it); None: the URL's host.
        idle: idle connections kept per holder.
        streams: look up over one lookup stream per holder (pipelined: batches share it);
            False: one ``POST /v1/lookup`` per lookup.
        variant: what the holders read: ``online`` (their store) or ``baseline`` (the
            guard's lagged store: a holder keeping none refuses, 409, and the scatter fails
            over to the partition's next holder).
        stall_s: a holder's stream is opened again once its lookups waited that long
            without a byte of answer (``LookupStream``): a hung holder is asked on a new
            stream after it, not on its old one for good.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: Callable[[str], str | None] | None = None,
        idle: int = 16,
        streams: bool = True,
        variant: str = "online",
        stall_s: float = STALL_S,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"HttpHolders.variant: expected one of {VARIANTS}, got {variant!r}")
        if not (isinstance(stall_s, int | float) and math.isfinite(stall_s) and stall_s > 0):
            raise ValueError(f"HttpHolders.stall_s: expected a finite number > 0, got {stall_s!r}")
        self.variant = variant
        self.stall_s = stall_s
        self.streams = streams
        self._streams: dict[str, asyncio.Task[LookupStream]] = {}
        self.credentials = credentials
        self.tls = tls
        self.server_name = server_name or (lambda url: None)
        self.idle = idle
        self._idle: dict[str, list[_Conn]] = {}
        self.closed = False

    async def _connect(self, holder: str) -> _Conn:
        u = urlsplit(holder)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise HolderFailed(holder, "not an http(s)://host:port URL")
        if u.scheme == "https":
            ctx = self.tls or ssl.create_default_context()
            name = self.server_name(holder) or u.hostname
            reader, writer = await asyncio.open_connection(
                u.hostname, u.port or 443, ssl=ctx, server_hostname=name, limit=MAX_HEAD_BYTES
            )
        else:
            reader, writer = await asyncio.open_connection(
                u.hostname, u.port or 80, limit=MAX_HEAD_BYTES
            )
        return _Conn(reader, writer)

    async def lookup(self, holder: str, ask: FlatAsk) -> FlatRows:
        """The scatter's ``Fetch``: ``ask`` as one frame on ``holder``'s stream (its answer
        as it comes), or as one ``POST /v1/lookup`` (its tables' rows then packed)."""
        if self.closed:  # a predict still in flight as the node stops: open nothing new
            raise HolderFailed(holder, "this node's scatter client is closed (it is stopping)")
        if self.streams:
            stream = await self._stream(holder)
            try:
                dims, rows, versions, values = await stream.lookup_flat(*ask)
            except (ClientError, OSError, ssl.SSLError) as exc:
                raise _failed(holder, exc) from exc
            return FlatRows(dims, rows, versions, values)
        tables, known = tables_of(ask)
        return flat_rows(holder, ask, await self(holder, tables, known))

    def send(self, holder: str, ask: FlatAsk) -> asyncio.Future | None:
        """``ask`` as one frame on ``holder``'s open stream, now, and the future of its
        answer (``Fetch.send``); None without an open stream (``lookup`` opens one)."""
        if self.closed or not self.streams:
            return None
        opening = self._streams.get(holder)
        if opening is None or not opening.done() or _broken(opening):
            return None
        try:
            return opening.result().send_flat(*ask)
        except HolderFailed:  # broke since _broken looked: lookup opens a new one
            return None

    async def __call__(
        self, holder: str, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray]
    ) -> Mapping[str, TableRows]:
        """The rows of each of ``tables`` at ``holder`` (``known``: the versions held of
        some), in one request; ``HolderFailed`` for anything but an answer."""
        if self.closed:  # a predict still in flight as the node stops: open nothing new
            raise HolderFailed(holder, "this node's scatter client is closed (it is stopping)")
        if self.streams:
            stream = await self._stream(holder)
            try:
                return await stream.lookup(tables, known)
            except (ClientError, OSError, ssl.SSLError) as exc:
                raise _failed(holder, exc) from exc
        call = calls.lookup_many(tables, known)
        host = urlsplit(holder).netloc
        assert call.content_type is not None
        fixed = (
            f"{call.method} {call.url_path} HTTP/1.1\r\nhost: {host}\r\n"
            f"content-type: {call.content_type}\r\naccept: {call.accept}\r\n"
            f"content-length: {len(call.body)}\r\n"
        )
        if self.variant != "online":
            fixed += f"{VARIANT_HEADER}: {self.variant}\r\n"
        for _ in range(MAX_RESIGNS):
            sig = self.credentials.headers(call.role, call.method, call.path, call.body, host)
            head = fixed + "".join(f"{k}: {v}\r\n" for k, v in sig.items()) + "\r\n"
            status, headers, body = await self._send(holder, head.encode("latin-1") + call.body)
            if not (status == 401 and RESIGN_HEADER in headers):
                break
        if status >= 300:
            why = str(calls.refusal(call, holder, status, body))
            raise HolderFailed(holder, why.partition(f"at {holder}: ")[2] or why, status)
        try:
            return call.read(body, headers.get("content-type", ""))
        except (WireError, ValueError, KeyError, TypeError) as exc:
            raise HolderFailed(holder, f"unreadable answer: {exc}") from exc

    async def _stream(self, holder: str) -> LookupStream:
        """``holder``'s stream (opened once, by the first caller; a broken one is opened
        again by the next)."""
        opening = self._streams.get(holder)
        if opening is None or (opening.done() and _broken(opening)):
            u = urlsplit(holder)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise HolderFailed(holder, "not an http(s)://host:port URL")
            opening = asyncio.ensure_future(
                LookupStream.open(
                    holder,
                    self.credentials,
                    tls=self.tls,
                    server_name=self.server_name(holder),
                    variant=self.variant,
                    failure=functools.partial(_failed, holder),
                    stall_s=self.stall_s,
                )
            )
            self._streams[holder] = opening
        try:
            return await asyncio.shield(opening)
        except (ClientError, OSError, ssl.SSLError) as exc:
            raise _failed(holder, exc) from exc

    async def _send(self, holder: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """``raw`` on an idle connection (a fresh one when it was closed under us)."""
        for attempt in range(2):
            pool = self._idle.setdefault(holder, [])
            reused = bool(pool)
            try:
                conn = pool.pop() if pool else await self._connect(holder)
            except OSError as exc:
                raise HolderFailed(holder, f"{type(exc).__name__}: {exc}") from exc
            try:
                got = await conn.send(raw)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                conn.close()
                if reused and attempt == 0:
                    # The holder closed an idle connection (its keep-alive timeout), and so
                    # likely every other idle one: drop them, send once more on a new one.
                    for stale in pool:
                        stale.close()
                    pool.clear()
                    continue
                raise HolderFailed(holder, f"{type(exc).__name__}: {exc}") from exc
            except _BadAnswer as exc:
                conn.close()
                raise HolderFailed(holder, f"unreadable answer: {exc}") from exc
            except BaseException:  # cancelled mid-request (a lost hedge): never reuse it
                conn.close()
                raise
            if conn.reusable and len(pool) < self.idle:
                pool.append(conn)
            else:
                conn.close()
            return got
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every stream and idle connection; later lookups fail (``HolderFailed``)."""
        self.closed = True
        for opening in self._streams.values():
            if opening.done() and not _broken(opening):
                await opening.result().close()
            else:
                opening.cancel()
        self._streams.clear()
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()


def _failed(holder: str, exc: Exception) -> HolderFailed:
    """A stream's failure as the holder's (its status, if the holder answered one)."""
    status = getattr(exc, "status", None)
    why = str(exc).partition(f"at {holder}: ")[2] or str(exc)
    return HolderFailed(holder, why, status)


def _broken(opening: asyncio.Task[LookupStream]) -> bool:
    """An opening that failed, or a stream that broke since."""
    if opening.cancelled() or opening.exception() is not None:
        return True
    return opening.result().closed


LOCAL = "local"
"""The holder name ``LocalFirst`` answers from the serving node's own store."""


class LocalFirst:
    """A ``Fetch`` that answers holder ``LOCAL`` from the serving node's own store, without
    I/O, and every other holder through ``remote``.

    Why: a serving node that holds some partitions itself should read them as its local
    replica does; naming ``LOCAL`` first among a partition's holders does that, and a table
    the store lacks yet (still syncing) fails over to the next holder like any failure.

    Call it on the event loop that applies the store's rows (``Table`` allows no lookup
    concurrent with a write).
    """

    def __init__(self, store: Store, remote: Fetch) -> None:
        self.store = store
        self.remote = remote

    def send(self, holder: str, ask: FlatAsk) -> asyncio.Future | None:
        """``remote``'s ``send`` for a remote holder (``Fetch.send``); None for ``LOCAL``."""
        send = getattr(self.remote, "send", None)
        return None if holder == LOCAL or send is None else send(holder, ask)

    async def lookup(self, holder: str, ask: FlatAsk) -> FlatRows:
        if holder != LOCAL:
            return await self.remote.lookup(holder, ask)
        tables = []
        for name in ask.names:
            try:
                tables.append(self.store.table(name))
            except UnknownTableError as exc:
                raise HolderFailed(
                    holder, f"table {name!r} is not in this node's store", 404
                ) from exc
        starts = np.zeros(len(tables) + 1, np.int64)
        np.cumsum(ask.counts, out=starts[1:])
        got = lookup_tables(tables, ask.keys, starts, ask.known)
        dims = np.array([t.dim for t in tables], np.int64)
        return FlatRows(dims, got.rows, got.versions, got.values)

    async def close(self) -> None:
        """Close ``remote``'s connections, if it keeps any."""
        close = getattr(self.remote, "close", None)
        if close is not None:
            await close()
