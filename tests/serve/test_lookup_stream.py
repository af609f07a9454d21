"""Lookup streams at a real node: lookups of many batches pipelined on one stream, answered
in order; a frame of the wrong kind refused with the stream going on; an unusable head
refused and the stream closed; no stream without a credential; a broken stream reopened by
the next lookup."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from test_scatter_route import node  # noqa: F401  (the fixture: a source with emb, dense/w)

from ekko.client import ClientError
from ekko.client.credentials import Credentials
from ekko.client.lookup_stream import LookupStream, _upgrade, _Waiting
from ekko.client.stream_frames import (
    ANSWER,
    FOUND,
    FOUND_TAIL,
    LOOKUP_PATH,
    REQUEST,
    lookup_frame,
    write_frame,
)
from ekko.node.access import ClusterAuth
from ekko.serve.scatter_fetch import FlatAsk, HolderFailed, start
from ekko.serve.scatter_http import HttpHolders


async def _switched(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fake holder's end of the opening: the request read, ``101`` sent, then the first
    byte of the first frame read (the client asked something)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
        b"upgrade: ekko-lookup/1\r\nekko-max-frame-bytes: 65536\r\n\r\n"
    )
    await reader.read(1)


async def test_concurrent_lookups_share_one_stream_in_order(node) -> None:  # noqa: F811
    runner, url = node
    stream = await LookupStream.open(url, Credentials(secret=runner.secret))
    try:
        batches = [np.array([k, 100 + k, (k + 3) % 10], np.int64) for k in range(40)]
        got = await asyncio.gather(*(stream.lookup({"emb": b}) for b in batches))
        for keys, rows in zip(batches, got, strict=True):
            want = runner.core.store.table("emb").lookup(keys)
            np.testing.assert_array_equal(rows["emb"].values, want[0])
            np.testing.assert_array_equal(rows["emb"].versions, want[1])
            assert rows["emb"].found.tolist() == want[2].astype(np.uint8).tolist()
        with pytest.raises(ClientError, match="404") as caught:
            await stream.lookup({"emb": batches[0], "nope": batches[0]})
        assert caught.value.status == 404 and "nope" in str(caught.value)
        two = await stream.lookup(
            {"emb": batches[2], "dense/w": np.zeros(1, np.int64)},
            {"dense/w": runner.core.store.table("dense/w").lookup(np.zeros(1, np.int64))[1]},
        )
        assert two["emb"].values.shape == (3, 4) and two["dense/w"].values.shape == (0, 6)
        with pytest.raises(ValueError, match=r"known\['emb'\]: expected 3 versions"):
            await stream.lookup({"emb": batches[2]}, {"emb": np.zeros(2, np.int64)})
        assert (await stream.lookup({"emb": batches[1]}))["emb"].found.sum() == 2  # goes on
    finally:
        await stream.close()
    async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as c:
        text = (await c.get("/metrics")).text
    assert "ekko_lookup_stream_frames_total" in text or "ekko_lookup_stream_frames " in text


async def test_wrong_frames_are_refused_and_a_bad_head_closes_the_stream(node) -> None:  # noqa: F811
    runner, url = node
    stream = await LookupStream.open(url, Credentials(secret=runner.secret))
    try:
        keys = np.arange(3, dtype=np.int64)
        stream._seq += 1  # a write frame on a lookup stream: refused, the stream goes on
        fut = asyncio.get_running_loop().create_future()
        stream._waiting.append(_Waiting(stream._seq, "emb", np.array([3]), fut))
        stream._writer.writelines(
            write_frame(stream._seq, b"emb", keys, np.ones((3, 4), np.float32))
        )
        with pytest.raises(ClientError, match="400 frame kind 1: a lookup stream takes"):
            await fut
        assert (await stream.lookup({"emb": keys}))["emb"].found.all()
        bad = asyncio.get_running_loop().create_future()
        stream._waiting.append(_Waiting(99, "emb", np.array([1]), bad))
        stream._writer.write(REQUEST.pack(9, 0, 3, 1, 0, 99))  # kind 9: the head is unusable
        with pytest.raises(ClientError, match="400 frame kind: 9"):
            await bad
        for _ in range(50):  # the node closes the stream after that answer
            if stream.closed:
                break
            await asyncio.sleep(0.02)
        assert stream.closed
        with pytest.raises(ClientError, match="is closed"):
            await stream.lookup({"emb": keys})
    finally:
        await stream.close()


async def test_no_stream_without_a_credential_and_a_broken_one_reopens(node) -> None:  # noqa: F811
    runner, url = node
    with pytest.raises(ClientError, match="401"):
        await LookupStream.open(url, Credentials(secret=b"wrong"))
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.post(LOOKUP_PATH, headers={"upgrade": "ekko-lookup/1"})
    assert r.status_code == 401
    fetch = HttpHolders(Credentials(secret=runner.secret))
    try:
        keys = {"emb": np.arange(4, dtype=np.int64)}
        assert (await fetch(url, keys, {}))["emb"].found.all()
        first = fetch._streams[url].result()
        pending = asyncio.ensure_future(first.lookup(keys))
        first._writer.transport.abort()  # the connection drops under a lookup in flight
        with pytest.raises(HolderFailed, match=r"broke|closed"):  # the fetch's streams' error
            await pending
        assert first.closed
        assert (await fetch(url, keys, {}))["emb"].found.all()  # on a new stream
        assert fetch._streams[url].result() is not first
    finally:
        await fetch.close()


@pytest.mark.parametrize(
    ("names", "counts", "n"),
    [(b"emb", [1, 1], 2), (b"emb\ndense/w", [2, 0], 2), (b"emb\ndense/w", [1, 1], 3)],
    ids=["fewer-names", "a-table-of-no-keys", "counts-not-summing-to-n"],
)
async def test_a_lookup_that_does_not_add_up_is_refused_and_the_stream_goes_on(
    node,  # noqa: F811
    names: bytes,
    counts: list[int],
    n: int,
) -> None:
    runner, url = node
    stream = await LookupStream.open(url, Credentials(secret=runner.secret))
    try:
        stream._seq += 1
        fut = asyncio.get_running_loop().create_future()
        stream._waiting.append(_Waiting(stream._seq, "emb", np.array([3]), fut))
        body = np.array(counts, "<i8").tobytes() + np.arange(n, dtype="<i8").tobytes()
        stream._writer.write(REQUEST.pack(3, 0, len(names), n, len(counts), stream._seq))
        stream._writer.write(names + body)
        with pytest.raises(ClientError, match="400 a lookup of 2 tables needs"):
            await fut
        assert (await stream.lookup({"emb": np.arange(2, dtype=np.int64)}))["emb"].found.all()
    finally:
        await stream.close()


@pytest.mark.parametrize(
    "answer",
    [
        ANSWER.pack(3, 0, 0, 1, 1) + FOUND_TAIL.pack(1, 0) + np.array([-4, 1], "<i8").tobytes(),
        ANSWER.pack(3, 0, 0, 1, 1) + FOUND_TAIL.pack(1 << 30, 0),
        ANSWER.pack(9, 0, 0, 4, 1),
        ANSWER.pack(2, 0, 400, 1 << 30, 1),
    ],
    ids=["negative-dims", "absurd-table-count", "unknown-kind", "absurd-reason"],
)
async def test_a_hostile_answer_breaks_the_stream_and_every_waiting_lookup_hears_it(
    answer: bytes,
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _switched(reader, writer)  # the first frame arrived: answer it badly
        writer.write(answer + bytes(64))
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    stream = await LookupStream.open(url, Credentials(secret=b"s"))
    try:
        with pytest.raises(ClientError, match="broke"):
            await asyncio.wait_for(stream.lookup({"emb": np.arange(1, dtype=np.int64)}), 5)
        assert stream.closed
    finally:
        await stream.close()
        server.close()
        await server.wait_closed()


def _found(seq: int, dims: list[int], rows: list[int], versions: list[int], floats: int) -> bytes:
    """A found answer as a node sends it, with ``floats`` values after the versions."""
    return (
        ANSWER.pack(3, 0, 0, len(versions), seq)
        + FOUND_TAIL.pack(len(dims), 0)
        + np.array([*dims, *rows], "<i8").tobytes()
        + np.array(versions, "<i8").tobytes()
        + np.ones(floats, "<f4").tobytes()
    )


@pytest.mark.parametrize(
    "answer",
    [
        _found(1, [2, 2], [1, 1], [1, 1], 4),
        _found(1, [1 << 62], [4], [1, 1, 1, 1], 0),
        _found(1, [1 << 40], [0], [1, 1, 1, 1], 0),
        _found(1, [2], [1], [1, 1, 1], 2),
        _found(1, [2], [1], [1, 1, 1, 1, 1], 2),
    ],
    ids=[
        "two-tables-for-one",
        "dims-times-rows-overflowing",
        "dim-past-max-dim",
        "fewer-versions-than-keys",
        "more-versions-than-keys",
    ],
)
async def test_an_answer_that_does_not_fit_its_lookup_is_a_holder_failure(answer: bytes) -> None:
    """A holder's answer naming other tables or keys than its lookup asked breaks the stream
    and fails the lookup as the holder's fault (the scatter tries the next holder): a table
    count or a product of sizes that did not add up escaped as a ValueError (a 500 at the
    serving node, no retry), and a key count that did not was returned as it came."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _switched(reader, writer)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    fetch = HttpHolders(Credentials(secret=b"s"))
    try:
        with pytest.raises(HolderFailed, match="broke"):
            await asyncio.wait_for(fetch(url, {"emb": np.arange(4, dtype=np.int64)}, {}), 5)
        assert fetch._streams[url].result().closed
    finally:
        await fetch.close()
        server.close()
        await server.wait_closed()


async def test_a_lookup_whose_answer_would_pass_the_frame_limit_is_refused(node) -> None:  # noqa: F811
    """A small frame may ask for an answer without end: a key costs 8 bytes of the frame
    and 8 + 4 x dim of the answer, and keys may repeat (a 1-row dense table of 23 488 floats
    asked 1 M times is 94 GB). ``POST /v1/lookup`` refuses an answer over its body limit;
    the stream answered whatever it was asked. Now refused (413) alike; the stream goes on."""
    runner, url = node
    stream = await LookupStream.open(url, Credentials(secret=runner.secret))
    try:
        n = stream.max_frame // 8 // 2  # a frame of half the limit, its answer 1.5 x it
        with pytest.raises(ClientError, match=r"413 .*would answer") as caught:
            await stream.lookup({"emb": np.zeros(n, np.int64)})
        assert caught.value.status == 413 and "split the lookup" in str(caught.value)
        assert runner.core.store.table("emb").dim == 4
        assert (await stream.lookup({"emb": np.arange(3, dtype=np.int64)}))["emb"].found.all()
    finally:
        await stream.close()


async def test_a_client_that_sends_without_reading_is_held_back_then_answered_in_order(
    node,  # noqa: F811
) -> None:
    """A lookup stream answers a frame as soon as it is read, unless answers are queued or
    its transport is paused: a client that sends without reading fills the socket buffers,
    the node queues answers up to its window and stops reading; every answer then comes,
    in order, and the stream goes on."""
    runner, url = node
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    await _upgrade(url, u.netloc, Credentials(secret=runner.secret), "reader", reader, writer)
    keys = np.arange(4000, dtype=np.int64) % 12  # 2 of 12 missing; 96 kB an answer
    want = runner.core.store.table("emb").lookup(keys)
    sent, held_back = 0, False
    try:
        while sent < 3000:
            sent += 1
            writer.writelines(lookup_frame(sent, ["emb"], [keys]))
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:  # the node stopped reading
                held_back = True
                break
        assert held_back, f"{sent} frames sent, none held back"
        for seq in [*range(1, sent + 1), sent + 1]:
            if seq > sent:  # the stream goes on
                writer.writelines(lookup_frame(seq, ["emb"], [keys]))
            kind, _, _, n, got_seq = ANSWER.unpack(await reader.readexactly(ANSWER.size))
            assert (kind, got_seq, n) == (FOUND, seq, keys.size)
            tables, _ = FOUND_TAIL.unpack(await reader.readexactly(FOUND_TAIL.size))
            dims, rows = np.frombuffer(await reader.readexactly(16 * tables), "<i8").reshape(2, 1)
            versions = np.frombuffer(await reader.readexactly(8 * n), "<i8")
            values = np.frombuffer(await reader.readexactly(4 * int(dims[0] * rows[0])), "<f4")
            np.testing.assert_array_equal(versions, want[1])
            np.testing.assert_array_equal(values.reshape(-1, 4), want[0])
    finally:
        writer.close()


@pytest.mark.parametrize("cut", [1, 7, 1 << 20], ids=["byte-by-byte", "7-byte-pieces", "whole"])
async def test_answers_read_in_any_pieces_resolve_their_lookups_in_order(cut: int) -> None:
    """Answers are parsed as their bytes arrive: two answers (one found, one refused) sent
    in pieces of any size — an answer cut anywhere, or two in one piece — each resolve
    their own lookup, whole."""
    found = _found(1, [2], [2], [5, 0], 4)
    why = b"no such table"
    refused = ANSWER.pack(2, 0, 404, len(why), 2) + why
    wire = found + refused

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _switched(reader, writer)
        for at in range(0, len(wire), cut):
            writer.write(wire[at : at + cut])
            await writer.drain()
            await asyncio.sleep(0)
        while await reader.read(65536):  # until the client closes
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    stream = await LookupStream.open(url, Credentials(secret=b"s"))
    try:
        first = asyncio.ensure_future(stream.lookup({"emb": np.arange(2, dtype=np.int64)}))
        second = asyncio.ensure_future(stream.lookup({"nope": np.arange(1, dtype=np.int64)}))
        rows = (await asyncio.wait_for(first, 5))["emb"]
        assert rows.versions.tolist() == [5, 0] and rows.values.tolist() == [[1, 1], [1, 1]]
        with pytest.raises(ClientError, match="404 no such table"):
            await asyncio.wait_for(second, 5)
        assert not stream.closed
    finally:
        await stream.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("mode", ["silent", "half-an-answer"])
async def test_a_holder_that_stops_answering_gets_a_new_stream_after_stall_s(mode: str) -> None:
    """A holder answers its stream's first frame, then keeps the stream open and answers
    nothing more (or half an answer): its lookups lose to other holders (here: time out),
    and once they waited ``stall_s`` without a byte the next lookup breaks that stream —
    every lookup waiting on it fails, none is left behind — and goes out on a new one,
    which this holder answers. Before, the stream was kept for good: each lookup of the
    holder waited there until its deadline, and stayed waiting."""
    conns: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        first = len(conns) == 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
            b"upgrade: ekko-lookup/1\r\nekko-max-frame-bytes: 65536\r\n\r\n"
        )
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(REQUEST.size)
                _, _, name_len, n, tables, seq = REQUEST.unpack(head)
                await reader.readexactly(name_len + 8 * tables + 8 * n)
                answer = _found(seq, [2], [1], [7], 2)
                if first and seq > 1:  # the first stream goes quiet after one answer
                    if mode == "half-an-answer" and seq == 2:
                        writer.write(answer[:20])
                    continue
                writer.write(answer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    fetch = HttpHolders(Credentials(secret=b"s"), stall_s=0.2)
    ask = FlatAsk(["emb"], np.array([1], np.int64), np.array([3], np.int64), None)
    try:
        assert (await asyncio.wait_for(fetch.lookup(url, ask), 5)).versions.tolist() == [7]
        old = fetch._streams[url].result()
        for _ in range(2):  # lost: the holder is silent
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(start(fetch, url, ask), 0.15)
        assert len(old._waiting) == 2 and not old.closed
        await asyncio.sleep(0.1)  # 0.25 s without a byte since the first lost lookup
        got = await asyncio.wait_for(start(fetch, url, ask), 5)
        assert got[2].tolist() == [7] and len(conns) == 2
        assert old.closed and not old._waiting
    finally:
        await fetch.close()
        server.close()
        await server.wait_closed()


def test_stall_s_is_checked() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        HttpHolders(Credentials(secret=b"s"), stall_s=0)
    with pytest.raises(ValueError, match="stall_s"):
        HttpHolders(Credentials(secret=b"s"), stall_s=float("nan"))
