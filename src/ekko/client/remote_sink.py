"""``RemoteSink``: a training process's ``EmbeddingPublisher`` writing into a cluster's
source over the network."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from ekko.client.errors import ClientError, Quarantined, SinkFailed
from ekko.client.stream import DEFAULT_WINDOW, WriteStream
from ekko.client.sync import Client
from ekko.store.spec import TableSpec

log = logging.getLogger(__name__)

_STOP = object()
_DRAIN = object()  # a stream lane reads every answer due


@dataclass(frozen=True)
class SinkStatistics:
    """Counters since construction: rows and requests the source acknowledged; rows and
    batches dropped because the source refused them or the writes before them as
    quarantined (a rollback), and the highest rollback epoch the sink was held by (-1:
    none)."""

    rows_acked: int
    requests: int
    queued_batches: int
    rows_dropped: int = 0
    batches_dropped: int = 0
    quarantine_epoch: int = -1


class _Lane:
    """One sender thread and its bounded queue; the keys it carries are the ones whose
    ``key mod lanes`` is its index, so two writes of a key are sent in order."""

    def __init__(self, sink: RemoteSink, index: int, depth: int) -> None:
        self.sink = sink
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self.run, name=f"remote-sink-{index}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                self.queue.task_done()
                return
            taken = [item]
            try:
                if self.sink.dropping(item):
                    continue
                if item[2] is None:  # a delete: alone, in its place among the writes
                    if self.sink.failure is None:
                        self.sink.send_delete(item[0], item[1])
                    continue
                taken += self._more(item[0])
                if self.sink.failure is None:
                    self.sink.send(item[0], *_merge(taken))
            except Quarantined as q:  # its rows are counted; the ones queued behind dropped
                self.sink.hold(q)
            except BaseException as exc:  # handed to the caller's next write or flush
                self.sink.fail(exc)
            finally:
                for _ in taken:
                    self.queue.task_done()

    def _more(self, table: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Batches of ``table`` queued behind the first, up to the request's row budget:
        one request instead of many small ones."""
        more: list = []
        rows = 0
        budget = self.sink.rows_per_request(table)
        while rows < budget:
            try:
                nxt = self.queue.queue[0]  # peek: another table's batch stays for its turn
            except IndexError:
                break
            if nxt is _STOP or nxt[0] != table or nxt[2] is None:
                break
            more.append(self.queue.get_nowait())
            rows += nxt[1].shape[0]
        return more


class _StreamLane:
    """One sender thread that owns a ``WriteStream``: batches go out in the order written,
    pipelined (the stream reads answers as its window needs); a flush reads every answer."""

    def __init__(self, sink: RemoteSink, stream: WriteStream, depth: int) -> None:
        self.sink = sink
        self.stream = stream
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._refused_counted = 0  # the stream's refused rows already counted as dropped
        self.thread = threading.Thread(target=self.run, name="remote-sink-stream", daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                unsent = 0  # rows of the item not yet handed to the stream
                try:
                    if item is _STOP:
                        return
                    if self.sink.failure is not None:
                        continue
                    if item is _DRAIN and self.sink.quarantine is not None:
                        self._settle()
                    elif item is _DRAIN:
                        self.stream.drain()
                    elif self.sink.dropping(item):
                        continue
                    elif item[2] is None:
                        unsent = item[1].shape[0]
                        self.stream.send_delete(item[0], item[1])
                    else:
                        table, keys, values = item
                        step = self.sink.rows_per_request(table)
                        for start in range(0, keys.shape[0], step):
                            unsent = keys.shape[0] - start
                            end = start + step
                            self.stream.send(table, keys[start:end], values[start:end])
                    self._acked()
                except Quarantined as q:  # the frames behind it are read and dropped
                    self.sink.hold(q, unsent)
                    self._settle_or_fail()
                except BaseException as exc:  # handed to the caller's next write or flush
                    self.sink.fail(exc)
                finally:
                    self.queue.task_done()
        finally:
            self.stream.close()

    def _settle_or_fail(self) -> None:
        try:
            self._settle()
        except BaseException as exc:
            self.sink.fail(exc)

    def _settle(self) -> None:
        """Read the answers of every frame sent: those refused as quarantined count as
        dropped (another refusal fails the sink)."""
        while self.stream.unanswered:
            try:
                self.stream.receive()
            except Quarantined as q:
                self.sink.hold(q)
        self._acked()

    def _acked(self) -> None:
        refused = self.stream.refused_rows
        self.sink.drop(refused - self._refused_counted, 0)
        self._refused_counted = refused
        with self.sink._lock:
            self.sink._rows_acked = self.stream.acked_rows
            self.sink._requests = self.stream.acked_frames


def _merge(batches: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One batch of ``batches`` of one table; a key in several keeps its latest row."""
    if len(batches) == 1:
        return batches[0][1], batches[0][2]
    keys = np.concatenate([b[1] for b in batches])
    values = np.concatenate([b[2] for b in batches])
    _, last = np.unique(keys[::-1], return_index=True)
    keep = keys.shape[0] - 1 - last
    return keys[keep], values[keep]


class RemoteSink:
    """A ``Sink`` (``ekko.store.spec``) whose rows go to a cluster's source through a
    ``Client``: ``EmbeddingPublisher(model, RemoteSink(client))`` publishes from any
    training process.

    Why threads and a bounded queue: a training step must not wait for the network, yet
    rows must never be dropped. ``write`` hands the rows to a sender thread's queue of at
    most ``depth`` batches; a full queue blocks ``write`` until the source catches up.
    With the binary format (the client's default) one thread sends every batch, in order,
    on a ``WriteStream`` (at most ``window`` frames unanswered). With JSON, ``lanes``
    threads send requests (each key always to the same one, so a key's writes arrive in
    order), batches of one table queued together merged into one request.
    Either way a request or frame holds at most ``max_request_bytes`` of rows (and no more
    than the node takes: its stream says its limit; a request it refuses as too large, 413,
    is sent again in halves). ``flush`` returns once the source has acknowledged (durably)
    every row handed over. A failed write fails the sink: the next ``write``,
    ``create_table`` or ``flush`` raises ``SinkFailed`` with it as the cause, and so does
    every later one — the caller decides (rows of that write and any after it were not
    acknowledged).

    A write refused because the model was rolled back (``Quarantined``: 409, its rollback
    epoch and the end of the quarantine) does not fail the sink: it holds it. The rows
    queued behind the refusal are dropped, never retried (they are the poisoned steps'),
    and counted (``statistics``); ``write``, ``delete``, ``flush`` raise ``Quarantined``
    until the caller, having reloaded the restored rows, calls ``resume``. ``hold`` does the
    same when the caller learned of the rollback elsewhere (another rank's refusal).
    """

    def __init__(
        self,
        client: Client,
        *,
        lanes: int = 4,
        depth: int = 8,
        max_request_bytes: int = 8 << 20,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if lanes < 1 or depth < 1 or window < 1 or max_request_bytes < 1024:
            raise ValueError(
                f"lanes, depth and window must be >= 1 and max_request_bytes >= 1024, got "
                f"{lanes}, {depth}, {window}, {max_request_bytes}"
            )
        self.client = client
        self.max_request_bytes = max_request_bytes
        self._binary = client.target.fmt == "binary"
        self._cut: dict[str, int] = {}  # rows per request a node's body limit allowed (413)
        self.failure: BaseException | None = None
        self.quarantine: Quarantined | None = None
        self._rows_dropped = 0
        self._batches_dropped = 0
        self._epoch = -1
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()
        self._rows_acked = 0
        self._requests = 0
        self._closed = False
        self._stream: _StreamLane | None = None
        self._lanes: list[_Lane] = []
        if self._binary:
            self._stream = _StreamLane(self, client.write_stream(window=window), depth)
        else:
            self._lanes = [_Lane(self, i, depth) for i in range(lanes)]

    # -- the Sink ---------------------------------------------------------------------------

    def create_table(self, spec: TableSpec) -> None:
        """Create ``spec`` at the source now (idempotent; a conflicting spec raises)."""
        self._check()
        self.client.create_table(spec)
        self._dims[spec.name] = spec.dim

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Queue the rows (blocks while the queues are full); ``SinkFailed`` if an earlier
        request failed."""
        self._check()
        keys = np.asarray(keys, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        if keys.ndim != 1 or values.ndim != 2 or values.shape[0] != keys.shape[0]:
            raise ValueError(
                f"{table}: keys [n] and values [n, dim] expected, got {list(keys.shape)} "
                f"and {list(values.shape)}"
            )
        self._dims.setdefault(table, values.shape[1])
        if not keys.shape[0]:
            return
        if self._stream is not None:
            self._stream.queue.put((table, keys, values))
            return
        n = len(self._lanes)
        if n == 1:
            self._lanes[0].queue.put((table, keys, values))
            return
        # one gather in lane order, then a contiguous slice per lane (masks cost a pass each)
        lane = (keys.view(np.uint64) % np.uint64(n)).astype(np.intp)
        order = np.argsort(lane, kind="stable")
        keys, values = keys[order], values[order]
        bounds = np.concatenate(([0], np.cumsum(np.bincount(lane, minlength=n))))
        for i in range(n):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                self._lanes[i].queue.put((table, keys[lo:hi], values[lo:hi]))

    def delete(self, table: str, keys: np.ndarray) -> None:
        """Queue a delete of ``keys``: it reaches the source after every write of them
        queued before it and before every one queued after (an evicted id written again)."""
        self._check()
        keys = np.asarray(keys, dtype=np.int64)
        if keys.ndim != 1:
            raise ValueError(f"{table}: keys [n] expected, got {list(keys.shape)}")
        if not keys.shape[0]:
            return
        if self._stream is not None:
            self._stream.queue.put((table, keys, None))
            return
        lane = keys.view(np.uint64) % np.uint64(len(self._lanes))
        for i, sender in enumerate(self._lanes):
            mine = keys[lane == i]
            if mine.shape[0]:
                sender.queue.put((table, mine, None))

    # -- flushing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Return once the source acknowledged every row written so far; ``SinkFailed``
        if a request failed."""
        if self._stream is not None:
            self._stream.queue.put(_DRAIN)
        for q in self._queues():
            q.join()
        self._check()

    def close(self) -> None:
        """Flush, then stop the sender threads (the client stays open: it is the caller's)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            senders = [*self._lanes, *([self._stream] if self._stream is not None else [])]
            for sender in senders:
                sender.queue.put(_STOP)
            for sender in senders:
                sender.thread.join()

    def statistics(self) -> SinkStatistics:
        with self._lock:
            rows, requests = self._rows_acked, self._requests
            dropped = (self._rows_dropped, self._batches_dropped, self._epoch)
        return SinkStatistics(rows, requests, sum(q.qsize() for q in self._queues()), *dropped)

    # -- a rollback's quarantine ------------------------------------------------------------

    def hold(self, quarantine: Quarantined, unsent_rows: int = 0) -> None:
        """Hold the sink for ``quarantine`` (a refusal, or a rollback the caller learned of
        elsewhere): writes queued now are dropped, and later calls raise it, until
        ``resume``. ``unsent_rows``: rows of a refused write, counted as dropped. An
        older epoch than the one held changes nothing but the count."""
        with self._lock:
            self._rows_dropped += unsent_rows
            if self.quarantine is None or quarantine.epoch >= self.quarantine.epoch:
                if self.quarantine is None or quarantine.epoch > self.quarantine.epoch:
                    log.warning("remote sink: %s; dropping the writes queued behind it", quarantine)
                self.quarantine = quarantine
                self._epoch = max(self._epoch, quarantine.epoch)

    def resume(self, epoch: int) -> None:
        """Accept writes again once every write queued before is dropped or answered, if
        the sink is held by rollback ``epoch`` or an older one (a newer one keeps it
        held: the caller has not reloaded its rows)."""
        if self._stream is not None:
            self._stream.queue.put(_DRAIN)
        for q in self._queues():
            q.join()
        with self._lock:
            if self.quarantine is not None and self.quarantine.epoch <= epoch:
                self.quarantine = None

    def dropping(self, item: tuple) -> bool:
        """A sender thread's check before it sends ``item``: True (and counted) while the
        sink is held."""
        if self.quarantine is None:
            return False
        self.drop(item[1].shape[0], 1)
        return True

    def drop(self, rows: int, batches: int) -> None:
        with self._lock:
            self._rows_dropped += rows
            self._batches_dropped += batches

    def send_delete(self, table: str, keys: np.ndarray) -> None:
        """Delete ``keys`` (a sender thread); a quarantine refusal counts them dropped."""
        try:
            self.client.delete(table, keys)
        except Quarantined as q:
            self.hold(q, keys.shape[0])
            raise

    def _queues(self) -> list[queue.Queue]:
        return [lane.queue for lane in self._lanes] + (
            [self._stream.queue] if self._stream is not None else []
        )

    # -- the sender threads' side -----------------------------------------------------------

    def rows_per_request(self, table: str) -> int:
        """Rows of ``table`` in one request of at most ``max_request_bytes``: a binary row is
        its key and dim float32s; a JSON one up to ~24 characters a number."""
        dim = self._dims.get(table, 1)
        per_row = 8 + 4 * dim if self._binary else 24 * (1 + dim)
        cut = self._cut.get(table, 1 << 62)
        if self._stream is not None:
            cut = min(cut, self._stream.stream.rows_per_frame(dim))
        return min(max(1, self.max_request_bytes // per_row), cut)

    def send(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Write the rows in requests of at most ``rows_per_request``; a request over the
        node's body limit (413) is sent again in halves, and the table's requests stay that
        small (a node's ``[http] max_body_bytes`` may be below ``max_request_bytes``)."""
        start = 0
        while start < keys.shape[0]:
            step = self.rows_per_request(table)
            k, v = keys[start : start + step], values[start : start + step]
            try:
                self.client.write(table, k, v)
            except Quarantined as q:
                self.hold(q, keys.shape[0] - start)
                raise
            except ClientError as exc:
                if exc.status != 413 or k.shape[0] == 1:
                    raise
                with self._lock:
                    self._cut[table] = max(1, k.shape[0] // 2)
                continue
            start += k.shape[0]
            with self._lock:
                self._rows_acked += k.shape[0]
                self._requests += 1

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = exc
                log.warning("remote sink: a write failed, the sink stops sending: %s", exc)

    def _check(self) -> None:
        if self._closed:
            raise SinkFailed("the remote sink is closed")
        if self.failure is not None:
            raise SinkFailed(f"an earlier write failed: {self.failure}") from self.failure
        held = self.quarantine
        if held is not None:
            raise Quarantined(held.epoch, held.until, str(held))

    def __enter__(self) -> RemoteSink:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
