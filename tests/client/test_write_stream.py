"""Write streams against a real source: rows acknowledged in order once durable, every
refusal named with the stream going on, a frame that cannot be read refused and the stream
closed with nothing stored, and no stream without the writer role."""

from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from client_node import MAX_BODY, Source, source_node

from ekko.client import ClientError, Credentials
from ekko.client.base import Target
from ekko.client.stream import WriteStream
from ekko.client.stream_frames import (
    ANSWER,
    REFUSED,
    REQUEST,
    STREAM_PATH,
    UPGRADE,
    WRITTEN,
    write_frame,
)
from ekko.net.signed_requests import auth_headers, host_of, role_key


def _stream(source: Source, **kwargs) -> WriteStream:
    return WriteStream(Target.at(source.url, Credentials(secret=source.secret)), **kwargs)


def _rows(n: int, start: int, fill: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    keys = np.arange(start, start + n, dtype=np.int64)
    rng = np.random.default_rng(start)
    values = rng.standard_normal((n, 4)).astype(np.float32)
    if fill is not None:
        values[:] = fill
    return keys, values


def test_pipelined_writes_are_answered_in_order_and_the_last_write_of_a_key_wins(
    source: Source,
) -> None:
    keys, _ = _rows(300, 50_000)
    with _stream(source, window=3) as s, source.client() as c:
        assert s.max_body == MAX_BODY
        for step in range(40):  # more frames than the window: send reads answers as it goes
            s.send("emb", keys, np.full((keys.size, 4), step, np.float32))
            assert s.unanswered <= 3
        assert s.acked_frames == 40 - 3  # send read the answers the window needed, no more
        assert s.drain() == 300 * 3 and s.unanswered == 0  # the last three, all acknowledged
        assert s.acked_rows == 300 * 40 and s.acked_frames == 40
        rows = c.lookup("emb", keys)
        versions = s.write("emb", keys[:5], np.full((5, 4), 99, np.float32))
        after = c.lookup("emb", keys[:5])
    assert (rows.values == 39).all() and rows.found.all()
    assert (versions > rows.versions[:5]).all()
    np.testing.assert_array_equal(after.versions, versions)


def test_a_write_over_the_frame_limit_is_split_into_frames_the_source_takes(
    source: Source,
) -> None:
    keys, values = _rows(3 * (MAX_BODY // (8 + 16)) + 7, 200_000)
    with _stream(source) as s, source.client() as c:
        versions = s.write("emb", keys, values)
        frames = s.acked_frames
        got = c.lookup("emb", keys[::97])
    assert frames == 4 and versions.shape == keys.shape
    np.testing.assert_array_equal(got.values, values[::97])


@pytest.mark.parametrize(
    ("table", "values", "status", "reason"),
    [
        ("nope", np.zeros((3, 4), np.float32), 404, "unknown table 'nope'"),
        ("emb", np.zeros((3, 6), np.float32), 400, "table 'emb' has rows of dim 4"),
        ("emb", np.full((3, 4), np.nan, np.float32), 400, "NaN or inf"),
        ("emb", np.full((3, 4), 1e30, np.float32), 400, "within"),
    ],
)
def test_a_refused_write_is_named_nothing_of_it_is_stored_and_the_stream_goes_on(
    source: Source, table: str, values: np.ndarray, status: int, reason: str
) -> None:
    keys = np.arange(900_000, 900_003, dtype=np.int64)
    before = source.digests()
    with _stream(source) as s:
        with pytest.raises(ClientError, match=reason) as err:
            s.write(table, keys, values)
        assert err.value.status == status
        assert source.digests() == before
        s.write("emb", keys, np.ones((3, 4), np.float32))  # the same stream goes on
    assert source.digests() != before


def _upgrade(source: Source, role: str = "writer", after: bytes = b"") -> socket.socket:
    """A connection that has sent a signed upgrade, and ``after`` in the same send."""
    host = host_of(source.url)
    url = httpx.URL(source.url)
    sock = socket.create_connection((url.host, url.port), timeout=10)
    sign = auth_headers(source.secret, role, "POST", STREAM_PATH, b"", host=host)
    head = [f"POST {STREAM_PATH} HTTP/1.1", f"host: {host}", "connection: upgrade",
            f"upgrade: {UPGRADE}", "content-length: 0"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in sign.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + after)
    return sock


def _upgraded(source: Source, role: str = "writer") -> socket.socket:
    sock = _upgrade(source, role)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer[:200]
    return sock


def _answer(sock: socket.socket) -> tuple[int, int, bytes]:
    data = b""
    while len(data) < ANSWER.size:
        data += sock.recv(ANSWER.size - len(data))
    kind, _, status, n, _seq = ANSWER.unpack(data)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return kind, status, body


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread bytes in its buffer
        return True


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (REQUEST.pack(7, 0, 3, 1, 4, 1), "frame kind: 7"),
        (REQUEST.pack(1, 2, 3, 1, 4, 1), "frame flags"),
        (REQUEST.pack(1, 0, 0, 1, 4, 1), "name_len: 0"),
        (REQUEST.pack(1, 0, 3, 0, 4, 1), "n: 0 rows"),
        (REQUEST.pack(1, 0, 3, 1, 0, 1), "dim: 0"),
        (REQUEST.pack(1, 0, 3, 1 << 30, 4, 1), f"at most {MAX_BODY}"),
        (REQUEST.pack(2, 0, 3, 1, 4, 1), "a delete carries no values"),
        (REQUEST.pack(3, 0, 3, 1, 0, 1), "tables: 0, a lookup names 1..4096 tables"),
        (REQUEST.pack(3, 2, 3, 1, 1, 1), "frame flags: 0x2"),
        (REQUEST.pack(1, 1, 3, 1, 4, 1), "not defined for a frame of kind 1"),
    ],
)
def test_a_frame_whose_head_cannot_be_used_is_refused_and_the_stream_closed(
    source: Source, head: bytes, reason: str
) -> None:
    before = source.digests()
    sock = _upgraded(source)
    sock.sendall(head + b"emb" + bytes(48))
    kind, status, why = _answer(sock)
    assert (kind, status) == (REFUSED, 400) and reason in why.decode()
    assert _closed(sock) and source.digests() == before


def test_a_stream_cut_inside_a_frame_stores_nothing_of_it(source: Source) -> None:
    keys, values = _rows(100, 700_000)
    before = source.digests()
    sock = _upgraded(source)
    frame = b"".join(bytes(b) for b in write_frame(1, b"emb", keys, values))
    sock.sendall(frame[: len(frame) - 5])
    sock.close()
    with _stream(source) as s:  # the node still takes streams, and had nothing of that one
        s.write("emb", keys[:1], values[:1])
    with source.client() as c:
        assert not c.lookup("emb", keys[1:]).found.any()
    assert source.digests() != before


@pytest.mark.parametrize(("role", "status"), [("reader", 403), ("operator", 101)])
def test_only_a_writer_or_operator_opens_a_stream(source: Source, role: str, status: int) -> None:
    creds = Credentials(key=role_key(source.secret, role), role=role)
    if status == 101:
        WriteStream(Target.at(source.url, creds)).close()
        return
    with pytest.raises(ClientError, match=f"{status}") as err:
        WriteStream(Target.at(source.url, creds))
    assert err.value.status == status


def test_an_unsigned_upgrade_is_refused_before_anything_switches(source: Source) -> None:
    r = httpx.post(source.url + STREAM_PATH,
                   headers={"connection": "upgrade", "upgrade": UPGRADE})  # fmt: skip
    assert r.status_code == 401


def test_a_signed_request_without_the_upgrade_is_told_what_to_ask(source: Source) -> None:
    host = host_of(source.url)
    sign = auth_headers(source.secret, "writer", "POST", STREAM_PATH, b"", host=host)
    r = httpx.post(source.url + STREAM_PATH, headers=sign)
    assert r.status_code == 426 and UPGRADE in r.json()["error"]


def test_the_streams_figures_are_in_metrics(source: Source) -> None:
    keys, values = _rows(10, 800_000)
    with _stream(source) as s:
        s.write("emb", keys, values)
    with source.client() as c:
        text = c._http.get(source.url + "/metrics").text
    rows = [ln for ln in text.splitlines() if ln.startswith("ekko_write_stream_rows_total")]
    assert rows and float(rows[0].split()[-1]) >= 10


def test_a_frame_dripped_slower_than_its_deadline_closes_the_stream(
    source: Source, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ekko.node.write_stream.FRAME_TIMEOUT_S", 0.3)
    keys, values = _rows(10, 600_000)
    frame = b"".join(bytes(b) for b in write_frame(1, b"emb", keys, values))
    sock = _upgraded(source)
    sock.sendall(frame[:40])  # the head and a little: then nothing
    assert _closed(sock)  # within the deadline, not the 10 s of _closed's own timeout
    with source.client() as c:
        assert not c.lookup("emb", keys).found.any()
    idle = _upgraded(source)  # a stream idle between frames is not closed
    idle.settimeout(1.0)
    with pytest.raises(TimeoutError):
        idle.recv(1)
    idle.sendall(frame)
    assert _answer(idle)[0] == WRITTEN


def test_a_stream_reset_with_answers_due_writes_none_to_the_dead_connection(
    source: Source, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends without reading until the node stops reading, then resets the
    connection: the node answered each of the frames it had taken into the dead transport,
    and asyncio logged a warning for each (252 lines from one stream)."""
    keys, values = _rows(1000, 1_000_000)
    frame = b"".join(bytes(b) for b in write_frame(1, b"emb", keys, values))
    sock = _upgraded(source)
    sock.settimeout(1.0)  # a send blocked this long: the node has stopped reading
    with pytest.raises(TimeoutError):
        for _ in range(5000):
            sock.sendall(frame)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        sock.close()  # a reset: the node's answers due go nowhere
        deadline = time.monotonic() + 10
        while _open_streams(source):
            assert time.monotonic() < deadline, "the stream never ended"
            time.sleep(0.02)  # polling the node's count, bounded by the deadline
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text[:500]


def _open_streams(source: Source) -> float:
    with source.client() as c:
        text = c._http.get(source.url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("ekko_write_streams_open{"))
    return float(line.split()[-1])


def test_deletes_on_the_stream_keep_their_place_among_the_writes(source: Source) -> None:
    keys, values = _rows(40, 1_000_000)
    with _stream(source, window=4) as s, source.client() as c:
        s.send("emb", keys, values)
        s.send_delete("emb", keys[::2])
        s.send("emb", keys[:4], values[:4] + 1)  # written again after its delete
        written = s.delete("emb", keys[-2:])  # waits for every answer before its own
        got = c.lookup("emb", keys)
        with pytest.raises(ClientError, match="unknown table 'nope'") as err:
            s.delete("nope", keys[:1])
        assert err.value.status == 404
        s.delete("emb", keys[1:2])  # the stream goes on
    live = np.ones(40, bool)
    live[::2] = False
    live[:4] = True
    live[-2:] = False
    np.testing.assert_array_equal(got.found, live)
    np.testing.assert_array_equal(got.values[:4], values[:4] + 1)
    np.testing.assert_array_equal(got.values[5:37:2], values[5:37:2])
    assert written.shape == (2,) and (written > 0).all()


def test_streams_take_at_most_half_the_connections_and_the_port_stays_reachable(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A stream holds its connection for as long as its client likes (idle between frames
    too): streams up to ``max_connections`` took every connection and the node answered
    503 to everything else, ``/ready`` and a rollback included."""
    nodes = source_node(tmp_path_factory, http={"max_connections": 8})
    small = next(nodes)
    try:
        held = [_upgraded(small) for _ in range(4)]
        host = host_of(small.url)
        sign = auth_headers(small.secret, "writer", "POST", STREAM_PATH, b"", host=host)
        r = httpx.post(small.url + STREAM_PATH,
                       headers={"connection": "upgrade", "upgrade": UPGRADE, **sign})  # fmt: skip
        assert r.status_code == 503 and "4 streams are open" in r.json()["error"]
        assert httpx.get(small.url + "/ready").status_code == 200
        for sock in held:
            sock.close()
        with _stream(small) as s:  # a closed stream's place is free again
            s.write("emb", np.arange(3, dtype=np.int64), np.ones((3, 4), np.float32))
    finally:
        nodes.close()


def test_a_bad_head_sent_with_the_upgrade_is_refused_and_the_node_goes_on(
    source: Source,
) -> None:
    """Bytes sent with the upgrade reach the stream before it reads the socket; a bad head
    there and a byte more: the stream stopped taking bytes, the node kept offering it the
    rest, and its event loop spun on it for ever (every route dead, SIGTERM ignored)."""
    sock = _upgrade(source, after=REQUEST.pack(9, 0, 3, 1, 4, 1) + b"x" * 100)
    data = b""
    while chunk := sock.recv(65536):  # the 101, the refusal, then closed (10 s timeout)
        data += chunk
    answer = data[data.index(b"\r\n\r\n") + 4 :]
    kind, _, status, _, _ = ANSWER.unpack(answer[: ANSWER.size])
    assert (kind, status) == (REFUSED, 400) and b"frame kind: 9" in answer[ANSWER.size :]
    with _stream(source) as s:
        s.write("emb", np.arange(2, dtype=np.int64), np.ones((2, 4), np.float32))


def test_a_stream_probes_a_silent_client_so_a_vanished_one_frees_its_place(
    source: Source,
) -> None:
    """A stream idle between frames stays open as long as its client is there; a client
    whose machine vanished (no FIN, no RST) held its stream, and its place among the
    streams, for ever: nothing probed it. Now TCP keepalive does (the kernel's timer on the
    node's socket: ``tr`` 2 in /proc/net/tcp)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc/net/tcp to read the node's socket timers from")
    sock = _upgraded(source)
    node_port = httpx.URL(source.url).port
    client_port = sock.getsockname()[1]

    def node_side() -> list[str]:
        rows = [ln.split() for ln in table.read_text().splitlines()[1:]]
        ours = [r for r in rows if r[1].endswith(f":{node_port:04X}")
                and r[2].endswith(f":{client_port:04X}")]  # fmt: skip
        assert len(ours) == 1, ours
        return ours[0]

    # The 101 can reach us before the node's loop has switched the socket to the stream
    # (and turned keepalive on): read the kernel's table until the timer shows, 5 s at most.
    deadline = time.monotonic() + 5.0
    row = node_side()
    while row[5].split(":")[0] != "02" and time.monotonic() < deadline:
        time.sleep(0.02)
        row = node_side()
    assert row[5].split(":")[0] == "02", row  # the keepalive timer runs
    sock.close()


def test_a_lookup_frame_on_a_write_stream_is_refused_and_the_stream_goes_on(
    source: Source,
) -> None:
    from ekko.client.stream_frames import lookup_frame

    sock = _upgraded(source)
    keys = np.arange(3, dtype=np.int64)
    sock.sendall(b"".join(bytes(b) for b in lookup_frame(1, ["emb"], [keys])))
    kind, status, why = _answer(sock)
    assert (kind, status) == (REFUSED, 400) and b"lookups go to /v1/streams/lookup" in why
    sock.sendall(b"".join(bytes(b) for b in write_frame(2, b"emb", keys, np.ones((3, 4), "f4"))))
    assert _answer(sock)[0] == WRITTEN
    sock.close()
