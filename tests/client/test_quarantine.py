"""A write refused because the model was rolled back (409, the guard's quarantine) reaches a
``RemoteSink``'s caller as ``Quarantined`` with its epoch and end, holds the sink (the writes
queued behind it dropped and counted, never retried) until ``resume``, and does not fail it.

The sources here are fakes (the source side of the quarantine is another piece): a socket
speaking the write stream's frames that refuses from its second frame on, an HTTP answer
through ``calls.answer`` with the headers, and a gated client for the JSON lanes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from client_node import Source

from ekko.client import ClientError, Credentials, RemoteSink, SinkFailed, calls
from ekko.client.errors import Quarantined
from ekko.client.stream_frames import REQUEST, refused, written
from ekko.client.sync import Client
from ekko.schedule.quarantine import Quarantine, QuarantinedError
from ekko.train.sharded_quarantine import SourceReader

UNTIL = 1_900_000_000.25
# the source's own refusal text (the write port's), fields and all
REASON = str(QuarantinedError("emb", Quarantine("ctr", 3, UNTIL)))


def test_a_quarantine_is_read_from_headers_or_from_the_reason_the_source_wrote() -> None:
    head = {"X-Ekko-Quarantine-Until": str(UNTIL + 1), "x-ekko-rollback-epoch": "4"}
    q = Quarantined.parse(409, REASON, head)  # the headers first
    assert q is not None and (q.epoch, q.until, q.status) == (4, UNTIL + 1, 409)
    q = Quarantined.parse(409, "write stream at x: write 2: 409 " + REASON)
    assert q is not None and (q.epoch, q.until) == (3, UNTIL)
    assert str(q).startswith("write stream at x: write 2: 409 quarantined: model ctr rolled")
    # other refusals are not quarantines
    assert Quarantined.parse(503, REASON) is None
    assert Quarantined.parse(409, "table t exists with another spec") is None
    # a quarantine whose end cannot be read is an error naming it, never a guessed pause
    with pytest.raises(ClientError, match="cannot read"):
        Quarantined.parse(409, "quarantined: model ctr rolled back (epoch 2); writes refused")
    with pytest.raises(ClientError, match="cannot read"):
        Quarantined.parse(409, REASON, {"x-ekko-rollback-epoch": "2"})  # no until
    with pytest.raises(ClientError, match="cannot read"):
        Quarantined.parse(409, REASON, {"x-ekko-rollback-epoch": "2",
                                        "x-ekko-quarantine-until": "nan"})  # fmt: skip


def test_an_http_refusal_with_the_headers_raises_quarantined() -> None:
    call = calls.write("emb", np.arange(2), np.zeros((2, 4), np.float32), "json")
    body = b'{"error": "' + REASON.encode() + b'"}'
    head = {"x-ekko-quarantine-until": str(UNTIL), "x-ekko-rollback-epoch": "3"}
    with pytest.raises(Quarantined) as err:
        calls.answer(call, "http://src", 409, "application/json", body, head)
    assert (err.value.epoch, err.value.until) == (3, UNTIL)
    with pytest.raises(ClientError) as other:
        calls.answer(call, "http://src", 409, "application/json", b'{"error": "spec"}', head)
    assert isinstance(other.value, Quarantined)  # the headers alone say it
    with pytest.raises(ClientError) as plain:
        calls.answer(call, "http://src", 409, "application/json", b'{"error": "spec"}')
    assert not isinstance(plain.value, Quarantined)


class QuarantiningSource:
    """A write stream's far end on a socket: answers the upgrade, stores frame 1, refuses
    every later frame with the quarantine's 409 (``refuse_from``), counting the frames."""

    def __init__(self, refuse_from: int = 2) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.refuse_from = refuse_from
        self.frames: list[tuple[int, int]] = []  # (seq, rows)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                b"upgrade: ekko-rows/1\r\nekko-max-frame-bytes: 1048576\r\n\r\n"
            )
            try:
                while True:
                    _kind, _f, name_len, n, dim, seq = REQUEST.unpack(
                        self._read(conn, REQUEST.size)
                    )
                    self._read(conn, name_len + 8 * n + 4 * n * dim)
                    self.frames.append((seq, n))
                    if seq < self.refuse_from:
                        conn.sendall(b"".join(bytes(b) for b in written(seq, np.arange(n) + 1)))
                    else:
                        conn.sendall(refused(seq, 409, REASON))
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def quarantining() -> Iterator[QuarantiningSource]:
    source = QuarantiningSource()
    yield source
    source.close()


def _rows(first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(first, first + n, dtype=np.int64), np.ones((n, 4), np.float32)


def test_a_stream_refusal_holds_the_sink_and_drops_what_is_behind_it(
    quarantining: QuarantiningSource,
) -> None:
    client = Client.at(quarantining.url, Credentials(secret=b"s" * 32))
    sink = RemoteSink(client, depth=64, window=4)
    for i in range(6):  # frame 1 stored; 2.. refused: in flight or queued behind
        sink.write("emb", *_rows(10 * i, 10))
    with pytest.raises(Quarantined) as err:
        sink.flush()
    assert (err.value.epoch, err.value.until) == (3, UNTIL)
    assert "epoch 3" in str(err.value)
    stats = sink.statistics()
    assert stats.rows_acked == 10 and stats.rows_dropped == 50 and stats.quarantine_epoch == 3
    # held: the caller is told, and nothing it hands over is sent
    with pytest.raises(Quarantined):
        sink.write("emb", *_rows(100, 1))
    sent = len(quarantining.frames)
    sink.resume(2)  # an older epoch does not release it
    with pytest.raises(Quarantined):
        sink.write("emb", *_rows(100, 1))
    sink.resume(3)
    sink.write("emb", *_rows(100, 2))  # accepted again (this source refuses it: held again)
    with pytest.raises(Quarantined):
        sink.flush()
    assert len(quarantining.frames) == sent + 1
    assert sink.statistics().rows_dropped == 52
    assert sink.failure is None  # never failed: a quarantine is no broken sink
    with pytest.raises(Quarantined):
        sink.close()
    client.close()


class GatedQuarantine:
    """A JSON client whose first write waits for the gate, then every write is refused as
    quarantined; a ``ValueError`` once ``broken`` (an ordinary failure)."""

    def __init__(self) -> None:
        self.target = type("T", (), {"fmt": "json"})()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.written: list[int] = []
        self.refuse = True
        self.broken = False

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        if self.broken:
            raise ClientError("POST /v1/tables/emb/rows at x: 500 boom", 500)
        if self.refuse:
            raise Quarantined(7, UNTIL, "POST /v1/tables/emb/rows at x: 409 " + REASON)
        self.written += keys.tolist()
        return np.arange(1, keys.size + 1)

    def delete(self, table: str, keys: np.ndarray) -> np.ndarray:
        return self.write(table, keys, np.zeros((keys.size, 1), np.float32))


def test_json_lanes_drop_the_queued_writes_and_resume_after_the_reload() -> None:
    client = GatedQuarantine()
    sink = RemoteSink(client, lanes=1, depth=16)  # type: ignore[arg-type]
    sink.write("emb", *_rows(0, 3))
    client.entered.wait(timeout=10)
    for i in range(1, 4):  # queued behind the request the source holds
        sink.write("emb", *_rows(10 * i, 2))
    sink.delete("emb", np.array([1, 2], np.int64))
    client.gate.set()
    with pytest.raises(Quarantined) as err:
        sink.flush()
    assert err.value.epoch == 7
    stats = sink.statistics()
    assert (stats.rows_dropped, stats.batches_dropped, stats.rows_acked) == (3 + 6 + 2, 4, 0)
    client.refuse = False
    sink.resume(7)
    sink.write("emb", *_rows(50, 2))
    sink.flush()
    assert client.written == [50, 51]
    client.broken = True  # any other refusal still fails the sink for good
    sink.write("emb", *_rows(60, 1))
    with pytest.raises(SinkFailed, match="500 boom"):
        sink.flush()
    with pytest.raises(SinkFailed):
        sink.close()


def test_hold_from_outside_drops_writes_until_resumed() -> None:
    client = GatedQuarantine()
    client.refuse = False
    client.gate.set()
    sink = RemoteSink(client, lanes=2)  # type: ignore[arg-type]
    sink.hold(Quarantined(2, UNTIL, "rank 1 was refused: epoch 2"))
    with pytest.raises(Quarantined, match="rank 1"):
        sink.write("emb", *_rows(0, 2))
    sink.resume(2)
    sink.write("emb", *_rows(0, 2))
    sink.close()
    assert sorted(client.written) == [0, 1]
    assert sink.statistics().quarantine_epoch == 2


@pytest.mark.parametrize("fmt", ["binary", "json"])
def test_a_real_source_quarantined_at_its_write_port(source: Source, fmt: str) -> None:
    """The source's own refusal (its write port quarantined as a rollback does) reaches the
    sink as ``Quarantined``: over a write stream (the reason's fields) and over HTTP (the
    409's headers); lifted, ``resume`` writes again."""
    port = source.runner.core.port
    table = "emb"
    client = source.client(fmt=fmt)
    sink = RemoteSink(client, lanes=1)
    port.quarantine([table], Quarantine("ctr", 6, time.time() + 3600))
    try:
        sink.write(table, *_rows(0, 3))
        with pytest.raises(Quarantined) as err:
            sink.flush()
        assert err.value.epoch == 6 and err.value.until > time.time()
        assert "quarantined: model ctr rolled back (epoch 6)" in str(err.value)
        assert sink.statistics().rows_dropped == 3
    finally:
        port.quarantine([table], Quarantine("ctr", 6, 0.0))  # over: lifted at the next write
    sink.resume(6)
    sink.write(table, *_rows(0, 3))
    sink.close()
    assert sink.statistics().rows_acked == 3
    values, _, found = client.lookup(table, np.arange(3))
    assert found.all() and (values == 1).all()
    client.close()


def test_a_rank_reads_its_rows_back_from_a_real_source_in_chunks(source: Source) -> None:
    """``SourceReader`` (a rank's reload) over the source's multi-table lookup: answers cut
    under ``max_bytes`` (here 40 rows of ``emb`` each), every row in its key's place, rows
    the source lacks not found."""
    client = source.client()
    keys = np.arange(5_000, 5_300, dtype=np.int64)
    values = np.arange(keys.size * 4, dtype=np.float32).reshape(-1, 4)
    client.write("emb", keys[::2], values[::2])  # the odd keys were never written
    client.write("dense/bottom.0.weight", np.zeros(1, np.int64), np.full((1, 6), 7, np.float32))
    dims = {"emb": 4, "dense/bottom.0.weight": 6}
    reader = SourceReader({0: client}, None, dims, max_bytes=1024)
    got = reader.read({"emb": keys[::-1], "dense/bottom.0.weight": np.zeros(1, np.int64)})
    v, found = got["emb"]
    np.testing.assert_array_equal(found, (keys[::-1] % 2) == 0)
    np.testing.assert_array_equal(v[found], values[::-1][found])
    assert (v[~found] == 0).all()
    assert got["dense/bottom.0.weight"][1].all() and (got["dense/bottom.0.weight"][0] == 7).all()
    # 40 rows of 25 bytes in a 1 KiB answer: 8 lookups, the dense row in the last one's room
    assert reader.requests == 8
    client.close()
