"""``POST /v1/lookup`` and lookup streams at a real node through ``HttpHolders``: several
tables in one request, ``known`` versions leave unchanged rows out, refusals name the
problem (and say whether another holder could answer), a reader's credential is needed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.client.credentials import Credentials
from ekko.client.wire import ROWS_MEDIA_TYPE, LookupManyFrame, encode
from ekko.node.access import ClusterAuth
from ekko.node.config import load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.serve.scatter_fetch import HolderFailed
from ekko.serve.scatter_http import HttpHolders

BINARY = {"content-type": ROWS_MEDIA_TYPE, "accept": ROWS_MEDIA_TYPE}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[NodeRunner, str]]:
    doc = cluster_doc(
        dcs=1, replicas=1, tables=[("emb", 4, 4), ("dense/w", 6, 1)],
        sync={"snapshot_interval_s": 0},
    )  # fmt: skip
    doc["durability"] = {"recovery_timeout_s": 0.2}  # run alone: no replica to recover from
    runner = NodeRunner(load_config(write_cluster(doc, tmp_path / "cluster.toml")), "source",
                        tmp_path)  # fmt: skip
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.ready.wait(), 30)
    url = f"http://127.0.0.1:{runner.core.node.admin_port}"
    async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as client:
        rows = {"keys": list(range(10)), "values": [[float(k)] * 4 for k in range(10)]}
        assert (await client.post("/v1/tables/emb/rows", json=rows)).status_code == 200
        dense = {"keys": [0], "values": [[0.5] * 6]}
        assert (await client.post("/v1/tables/dense%2Fw/rows", json=dense)).status_code == 200
    yield runner, url
    runner.stop()
    await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("streams", [True, False], ids=["stream", "http"])
async def test_one_request_answers_several_tables_and_skips_known_rows(node, streams) -> None:
    runner, url = node
    fetch = HttpHolders(Credentials(secret=runner.secret), streams=streams)
    try:
        keys = np.array([3, 42, 1], np.int64)  # 42: not in the table
        _, versions, _ = runner.core.store.table("emb").lookup(keys)
        dense_v = runner.core.store.table("dense/w").lookup(np.zeros(1, np.int64))[1]
        got = await fetch(url, {"emb": keys, "dense/w": np.zeros(1, np.int64)}, {})
        assert list(got) == ["emb", "dense/w"]
        np.testing.assert_array_equal(got["emb"].versions, versions)
        assert got["emb"].found.tolist() == [1, 0, 1]
        np.testing.assert_array_equal(got["emb"].values[:, 0], [3.0, 0.0, 1.0])
        assert got["dense/w"].values.shape == (1, 6)
        known = {"emb": versions - np.array([0, 0, 1]), "dense/w": dense_v}
        again = await fetch(url, {"emb": keys, "dense/w": np.zeros(1, np.int64)}, known)
        assert again["emb"].values.tolist() == [[1.0] * 4]  # key 1 only: the others are known
        assert again["dense/w"].values.shape == (0, 6)
        with pytest.raises(HolderFailed, match="nope") as caught:
            await fetch(url, {"nope": keys}, {})
        assert caught.value.status == 404 and caught.value.retriable
    finally:
        await fetch.close()
    nobody = HttpHolders(Credentials(secret=runner.secret), streams=streams)
    with pytest.raises(HolderFailed) as down:  # unreachable: another holder may answer
        await nobody("http://127.0.0.1:9", {"emb": keys}, {})
    await nobody.close()
    assert down.value.status is None and down.value.retriable


def _body(tables: list[str], counts: list[int], keys: list[int], known=None, dtype=np.int64):
    k = np.array(known, np.int64) if known is not None else None
    return encode(LookupManyFrame(tables, np.array(counts, np.int64), np.array(keys, dtype), k))


BAD = [
    (b'{"tables": []}', {"content-type": "application/json"}, 415, "x-ekko-rows only"),
    (_body([], [], []), BINARY, 400, "tables: empty"),
    (_body(["emb", "emb"], [1, 1], [1, 2]), BINARY, 400, "'emb' is named twice"),
    (_body(["emb"], [1, 1], [1, 2]), BINARY, 400, "counts: expected int64 [1]"),
    (_body(["emb", "dense/w"], [2, 0], [1, 2]), BINARY, 400, "'dense/w' needs at least one"),
    (_body(["emb"], [3], [1, 2]), BINARY, 400, "keys: expected 3 (the sum of counts)"),
    (_body(["emb"], [2], [1, 2], known=[1]), BINARY, 400, "known: expected 2 versions"),
    (_body(["emb"], [1], [1], dtype=np.int32), BINARY, 400, "keys: dtype must be int64"),
    (_body(["nope"], [1], [1]), BINARY, 404, "nope"),
    (b"\x81\xa1x\x01", BINARY, 400, "body"),
]


async def test_refusals_name_the_problem_and_an_unsigned_lookup_is_refused(node) -> None:
    runner, url = node
    async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as client:
        for body, headers, status, says in BAD:
            r = await client.post("/v1/lookup", content=body, headers=headers)
            assert r.status_code == status, (says, r.text)
            assert says in r.json()["error"]
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/lookup", content=_body(["emb"], [1], [1]), headers=BINARY)
    assert r.status_code == 401


class _Scripted:
    """A raw HTTP server answering each request with the next of ``answers`` (bytes), then
    closing the connection when the answer says ``connection: close`` or is followed by
    ``None`` (closed silently, as a node drops an idle keep-alive connection)."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))  # fmt: skip
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                assert answer is not None
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer:
                    break
                if self.answers and self.answers[0] is None:
                    self.answers.pop(0)
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()


def _answer(status: str, body: bytes, *extra: str, media: str = ROWS_MEDIA_TYPE) -> bytes:
    head = [f"HTTP/1.1 {status}", f"content-type: {media}", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_the_client_signs_again_reconnects_and_refuses_what_it_cannot_read() -> None:
    from ekko.client.wire import RowsManyFrame, TableRows

    rows = TableRows(
        "emb", np.array([7], np.int64), np.ones(1, np.uint8), np.ones((1, 2), np.float32)
    )
    ok = encode(RowsManyFrame.of([rows]))
    resign = _answer("401 Unauthorized", b'{"error": "signed before start"}',
                     "x-ekko-resign: 1", media="application/json")  # fmt: skip
    script = _Scripted([
        resign, _answer("200 OK", ok, "connection: close"),  # signed again; then closed
        _answer("200 OK", ok), None,  # on a new connection, which the server then drops
        _answer("200 OK", ok),  # so the idle one fails at once: sent again on a new one
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ])  # fmt: skip
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    fetch = HttpHolders(Credentials(secret=b"s"), streams=False)
    keys = {"emb": np.array([1], np.int64)}
    try:
        for _ in range(3):
            got = await fetch(url, keys, {})
            assert got["emb"].versions.tolist() == [7] and got["emb"].values.shape == (1, 2)
        with pytest.raises(HolderFailed, match="without content-length") as bad:
            await fetch(url, keys, {})
        assert bad.value.retriable
    finally:
        await fetch.close()
        server.close()
        await server.wait_closed()
    assert script.connections == 3  # resign kept the connection; each close forced a new one
    sigs = [r.split(b"x-ekko-signature: ")[1].split(b"\r\n")[0] for r in script.requests]
    assert len(set(sigs)) == len(sigs) == 5  # every attempt signed anew
    assert all(r.startswith(b"POST /v1/lookup HTTP/1.1\r\n") for r in script.requests)
