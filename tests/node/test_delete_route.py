"""``POST /v1/tables/{table}/delete`` (issue 18): keys deleted at the source in JSON or the
binary ``LookupFrame``, answered with their tombstones' versions once durable; refusals name
the problem and change nothing; it needs a writer's credential and is in ``/openapi.json``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.client.wire import ROWS_MEDIA_TYPE, LookupFrame, WrittenFrame, decode, encode
from ekko.net.signed_requests import auth_headers, host_of
from ekko.node.access import ClusterAuth
from ekko.node.config import load_config
from ekko.node.core import NodeCore, NotReadyError, NotSourceError
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster

BINARY = {"content-type": ROWS_MEDIA_TYPE, "accept": ROWS_MEDIA_TYPE}


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[NodeRunner, httpx.AsyncClient]]:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0})
    doc["durability"] = {"recovery_timeout_s": 0.2}  # run alone: no replica to recover from
    runner = NodeRunner(load_config(write_cluster(doc, tmp_path / "cluster.toml")), "source",
                        tmp_path)  # fmt: skip
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.ready.wait(), 30)
    url = f"http://127.0.0.1:{runner.core.node.admin_port}"
    async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as client:
        body = {"keys": [1, 2, 3, 4], "values": [[1.0] * 4] * 4}
        assert (await client.post("/v1/tables/emb/rows", json=body)).status_code == 200
        yield runner, client
    runner.stop()
    await asyncio.wait_for(task, 30)


async def test_json_and_binary_deletes_are_answered_with_versions_once_durable(source) -> None:
    runner, client = source
    table, wal = runner.core.store.table("emb"), runner.core.journal.wal
    r = await client.post("/v1/tables/emb/delete", json={"keys": [1, 99]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["table"] == "emb" and len(doc["versions"]) == 2
    assert wal.durable_seq == wal.last_seq  # answered only once its record was fsynced
    body = encode(LookupFrame(np.array([2], np.int64)))
    r = await client.post("/v1/tables/emb/delete", content=body, headers=BINARY)
    assert r.status_code == 200 and r.headers["content-type"] == ROWS_MEDIA_TYPE
    frame = decode(r.content, WrittenFrame, "WrittenFrame")
    assert frame.table == "emb" and frame.versions.shape == (1,)
    assert table.lookup(np.array([1, 2, 3, 4, 99]))[2].tolist() == [False, False, True, True, False]
    assert (table.rows, table.tombstones) == (2, 3)
    _, versions = table.deleted()
    assert sorted(versions.tolist()) == sorted([*doc["versions"], int(frame.versions[0])])


BAD = [
    ("/v1/tables/emb/delete", {"json": {"keys": "x"}}, 400, "keys: expected a non-empty list"),
    ("/v1/tables/emb/delete", {"json": {"keys": [1.5]}}, 400, "every key must be an integer"),
    ("/v1/tables/emb/delete", {"json": {"ids": [1]}}, 400, '{"keys": [...]}'),
    ("/v1/tables/emb/delete", {"content": b"{", "headers": {}}, 400, "body"),
    ("/v1/tables/nope/delete", {"json": {"keys": [1]}}, 404, "nope"),
    (
        "/v1/tables/emb/delete",
        {"content": encode(LookupFrame(np.array([1], np.int32))), "headers": BINARY},
        400,
        "keys: dtype must be int64",
    ),
]


async def test_a_bad_delete_is_refused_by_name_and_changes_nothing(source) -> None:
    runner, client = source
    table = runner.core.store.table("emb")
    before = (table.digest(), table.tombstones, table.counter.copy())
    for path, kwargs, status, why in BAD:
        r = await client.post(path, **kwargs)
        assert r.status_code == status, (path, kwargs, r.text)
        assert why in r.json()["error"], (kwargs, r.text)
        assert (table.digest(), table.tombstones) == before[:2]
        np.testing.assert_array_equal(table.counter, before[2])


async def test_a_delete_needs_a_writers_credential(source) -> None:
    runner, client = source
    url = str(client.base_url) + "/v1/tables/emb/delete"
    r = await asyncio.to_thread(httpx.post, url, json={"keys": [1]}, timeout=10)
    assert r.status_code == 401, r.text
    body = b'{"keys": [1]}'
    path = "/v1/tables/emb/delete"
    signed = auth_headers(runner.secret, "reader", "POST", path, body, host=host_of(url))
    headers = {"content-type": "application/json", **signed}
    async with httpx.AsyncClient() as plain:
        r = await plain.post(url, content=body, headers=headers)
    assert r.status_code == 403, r.text
    assert runner.core.store.table("emb").tombstones == 0
    doc = (await client.get("/openapi.json")).json()
    assert "post" in doc["paths"]["/v1/tables/{table}/delete"]


def test_a_delete_is_refused_while_recovering_once_stopping_and_at_a_replica(
    tmp_path: Path,
) -> None:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0})
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    keys = np.array([1], np.int64)
    core = NodeCore(cfg, "source", tmp_path)
    with pytest.raises(NotReadyError, match="takes no writes yet: recovering"):
        core.delete("emb", keys)
    core.not_ready = None
    core.close()
    with pytest.raises(NotReadyError, match="stopping"):
        core.delete("emb", keys)
    assert core.store.table("emb").tombstones == 0
    replica = NodeCore(cfg, "dc1-r0", tmp_path)
    with pytest.raises(NotSourceError, match="delete at the source"):
        replica.delete("emb", keys)
    replica.close()
