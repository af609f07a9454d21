"""``WriteStream``: rows to a cluster's source over one connection, frames pipelined."""

from __future__ import annotations

import socket
import ssl
from collections import deque
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from ekko.client.base import MAX_RESIGNS, Target
from ekko.client.calls import _keys, _values
from ekko.client.errors import ClientError, Quarantined
from ekko.client.stream_frames import (
    ANSWER,
    STREAM_PATH,
    UPGRADE,
    WRITTEN,
    delete_frame,
    write_frame,
)
from ekko.client.upgrade import Resign, Upgrade
from ekko.net.signed_requests import host_of

DEFAULT_WINDOW = 32
"""Frames a stream sends before it waits for an answer: enough to keep the source busy
through a group commit's fsync with small frames (1 k rows: 8 frames made 1 M rows/s)."""


class WriteStream:
    """A write stream to the source (``ekko.client.stream_frames``): ``send`` a write and go
    on, the source answers each in order once it is on disk.

    Why: a training process publishing millions of rows a second cannot afford a signed
    HTTP request per batch; a stream is signed once (the writer role) and then sends each
    batch's arrays as they are. At most ``window`` writes are unanswered: ``send`` reads
    answers as it must to stay within it, so the source's answers never back up. One thread
    at a time (``RemoteSink`` gives it one of its own).

    Use::

        with WriteStream(Target.from_config("cluster.toml")) as s:
            for keys, values in batches:
                s.send("emb", keys, values)
            s.drain()                       # every write acknowledged (durable) or raised
    """

    def __init__(
        self, target: Target, *, timeout: float = 60.0, window: int = DEFAULT_WINDOW
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.node = target.writes.url
        self.window = window
        self._seq = 0
        self.acked_rows = 0  # rows of the answers read so far
        self.acked_frames = 0
        self.refused_rows = 0  # rows of the frames the source refused
        self._unanswered: deque[tuple[int, int]] = deque()  # (frame number, its rows)
        self._names: dict[str, bytes] = {}
        self._head = bytearray(ANSWER.size)
        self._early = b""  # bytes that came with the upgrade's answer
        self._sock: socket.socket | None = None
        for _ in range(MAX_RESIGNS):
            self._sock = self._connect(target, timeout)
            try:
                self.max_body = self._upgrade(target)
                break
            except Resign:
                self._sock.close()
        else:
            raise ClientError(f"write stream at {self.node}: signature refused as too old", 401)

    # -- writes -----------------------------------------------------------------------------

    def rows_per_frame(self, dim: int) -> int:
        """Rows of ``dim`` in the largest frame the source takes."""
        return max(1, self.max_body // (8 + 4 * dim))

    def send(self, table: str, keys: Any, values: Any) -> int:
        """Send a write (split into frames the source takes); its last frame's number.
        ``ClientError`` if an earlier write was refused."""
        k = _keys(keys)
        v = _values(values, k.shape[0])
        if not k.shape[0]:
            raise ValueError("keys: a write holds at least one row")
        name = self._name(table)
        step = self.rows_per_frame(v.shape[1])
        for start in range(0, k.shape[0], step):
            end = start + step
            part = k[start:end]
            self._frame(write_frame(self._seq + 1, name, part, v[start:end]), part.shape[0])
        return self._seq

    def _name(self, table: str) -> bytes:
        name = self._names.get(table)
        if name is None:
            name = self._names[table] = table.encode("utf-8")
        return name

    def _frame(self, buffers: list[bytes | memoryview], rows: int) -> None:
        """Send the frame numbered ``self._seq + 1`` (of ``rows`` rows) once the window has
        room for it."""
        while len(self._unanswered) >= self.window:
            self.receive()
        self._send(buffers)
        self._seq += 1
        self._unanswered.append((self._seq, rows))

    def send_delete(self, table: str, keys: Any) -> int:
        """Send a delete of ``keys`` (in frames the source takes), in order with the writes
        sent before and after it; its last frame's number."""
        k = _keys(keys)
        if not k.shape[0]:
            raise ValueError("keys: a delete holds at least one key")
        name = self._name(table)
        step = max(1, self.max_body // 8)
        for start in range(0, k.shape[0], step):
            part = k[start : start + step]
            self._frame(delete_frame(self._seq + 1, name, part), part.shape[0])
        return self._seq

    def delete(self, table: str, keys: Any) -> np.ndarray:
        """Delete and wait: the versions of the tombstones, once on disk."""
        first = self._seq + 1
        return self._answers_from(first, self.send_delete(table, keys))

    def write(self, table: str, keys: Any, values: Any) -> np.ndarray:
        """Write and wait: the versions of the rows, once on disk (answers of writes sent
        before are read first and dropped)."""
        first = self._seq + 1
        return self._answers_from(first, self.send(table, keys, values))

    def _answers_from(self, first: int, last: int) -> np.ndarray:
        """Read answers up to frame ``last``: the versions of frames ``first``..``last``."""
        parts = []
        while self._unanswered:
            seq, versions = self.receive()
            if seq >= first:
                parts.append(versions)
            if seq == last:
                break
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @property
    def unanswered(self) -> int:
        """Frames sent whose answer has not been read."""
        return len(self._unanswered)

    def receive(self) -> tuple[int, np.ndarray]:
        """The next answer: (frame number, versions of its rows); ``ClientError`` naming the
        source's reason if it refused the frame (``Quarantined`` if it refused it because
        the model was rolled back: read on, the later frames' answers follow)."""
        if not self._unanswered:
            raise RuntimeError("receive: no frame is waiting for its answer")
        self._recv_into(memoryview(self._head))
        kind, _flags, status, n, seq = ANSWER.unpack(self._head)
        expected, rows = self._unanswered.popleft()
        if seq != expected:
            raise ClientError(f"write stream at {self.node}: answer to {seq}, expected {expected}")
        if kind == WRITTEN:
            versions = np.empty(n, dtype="<i8")
            self._recv_into(memoryview(versions).cast("B"))
            self.acked_rows += n
            self.acked_frames += 1
            return seq, versions
        reason = bytearray(n)
        self._recv_into(memoryview(reason))
        why = reason.decode("utf-8", "replace")
        self.refused_rows += rows
        message = f"write stream at {self.node}: write {seq}: {status} {why}"
        raise Quarantined.parse(status, message) or ClientError(message, status)

    def drain(self) -> int:
        """Read every answer due: returns how many rows they acknowledged."""
        rows = 0
        while self._unanswered:
            rows += self.receive()[1].shape[0]
        return rows

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> WriteStream:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the socket -------------------------------------------------------------------------

    def _connect(self, target: Target, timeout: float) -> socket.socket:
        url = httpx.URL(self.node)
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        try:
            sock = socket.create_connection((url.host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if https:
                sock = _tls_context(target.verify).wrap_socket(
                    sock, server_hostname=target.writes.name
                )
        except (OSError, ssl.SSLError) as exc:
            raise ClientError(f"write stream at {self.node}: {exc!r}") from exc
        return sock

    def _upgrade(self, target: Target) -> int:
        """Open the stream (a signed ``POST`` asking to switch protocols); the source's
        largest frame body."""
        host = host_of(self.node)
        sign = target.credentials.headers("writer", "POST", STREAM_PATH, b"", host)
        headers = {"host": host, "connection": "upgrade", "upgrade": UPGRADE,
                   "content-length": "0", **sign}  # fmt: skip
        up = Upgrade(f"write stream at {self.node}", STREAM_PATH, headers)
        self._sendall(up.request())
        while (limit := up.receive(self._recv_some())) is None:
            pass
        self._early = up.early
        return limit

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        sock = self._sock
        assert sock is not None
        try:
            if isinstance(sock, ssl.SSLSocket):  # no sendmsg through TLS
                for b in buffers:
                    sock.sendall(b)
                return
            views = [memoryview(b).cast("B") for b in buffers]
            while views:
                sent = sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            raise ClientError(f"write stream at {self.node}: send failed: {exc!r}") from exc

    def _sendall(self, data: bytes) -> None:
        self._send([data])

    def _recv_some(self) -> bytes:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except OSError as exc:
            raise ClientError(f"write stream at {self.node}: {exc!r}") from exc
        if not data:
            raise ClientError(f"write stream at {self.node}: the source closed the stream")
        return data

    def _recv_into(self, view: memoryview) -> None:
        if self._early:
            n = min(len(view), len(self._early))
            view[:n] = self._early[:n]
            self._early = self._early[n:]
            view = view[n:]
        sock = self._sock
        assert sock is not None
        while view:
            try:
                got = sock.recv_into(view)
            except OSError as exc:
                raise ClientError(f"write stream at {self.node}: {exc!r}") from exc
            if not got:
                raise ClientError(f"write stream at {self.node}: the source closed the stream")
            view = view[got:]


def _tls_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
