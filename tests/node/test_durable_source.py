"""The source's durability contract (issue 13 §2): an acknowledged write survives a crash
(no snapshot taken), counters resume above every version issued, and a corrupt data file is
refused by name instead of silently starting empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.node.access import ClusterAuth
from ekko.node.config import ClusterConfig, load_config
from ekko.node.core import NodeCore, NotReadyError
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store import SnapshotError, WalError, wal_format
from ekko.store.spec import TableSpec


def _config(tmp_path: Path, **durability) -> ClusterConfig:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0})
    if durability:
        doc["durability"] = durability
    return load_config(write_cluster(doc, tmp_path / "cluster.toml"))


def _crash_after_writes(cfg: ClusterConfig, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write at a source and wait for durability, then drop it without a snapshot or close
    (what SIGKILL leaves on disk)."""
    core = NodeCore(cfg, "source", tmp_path)
    core.not_ready = None
    keys = np.arange(100, dtype=np.int64)
    versions = np.zeros(0, dtype=np.int64)
    for step in range(5):
        versions = core.write("emb", keys, np.full((100, 4), step, np.float32))
    asyncio.run(core.wait_durable())
    assert core.journal is not None
    core.journal.wal.close()  # stop the writer thread; nothing else is flushed or saved
    return keys, versions


def test_acknowledged_writes_survive_a_crash_without_snapshot(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    keys, versions = _crash_after_writes(cfg, tmp_path)
    assert not (tmp_path / "data" / "source" / "store.snapshot").exists()
    again = NodeCore(cfg, "source", tmp_path)
    values, got, found = again.store.table("emb").lookup(keys)
    assert found.all()
    np.testing.assert_array_equal(got, versions)
    np.testing.assert_array_equal(values, np.full((100, 4), 4, np.float32))
    again.not_ready = None
    newer = again.write("emb", keys[:10], np.ones((10, 4), np.float32))
    assert (newer > versions[:10]).all(), "a restarted source reissued versions"
    again.close()


def test_writes_refused_while_recovering(tmp_path: Path) -> None:
    core = NodeCore(_config(tmp_path), "source", tmp_path)
    with pytest.raises(NotReadyError, match="takes no writes yet: recovering"):
        core.write("emb", np.array([1]), np.ones((1, 4), np.float32))
    core.close()


def test_a_write_after_the_log_is_closed_is_refused_not_acknowledged(tmp_path: Path) -> None:
    """A stopping source saves its snapshot and closes its log while its HTTP port still
    takes writes: a write then went to memory only and ``wait_durable`` returned at once (no
    log), so it was acknowledged and lost on restart (found streaming rows at a source
    stopped by SIGTERM: the last frames acknowledged were missing after the restart)."""
    cfg = _config(tmp_path)
    core = NodeCore(cfg, "source", tmp_path)
    core.not_ready = None
    keys = np.arange(10, dtype=np.int64)
    core.write("emb", keys, np.ones((10, 4), np.float32))
    core.save_snapshot()
    core.close()
    with pytest.raises(NotReadyError, match="takes no writes: it is stopping"):
        core.write("emb", keys + 10, np.ones((10, 4), np.float32))
    with pytest.raises(NotReadyError, match="it is stopping"):
        asyncio.run(core.create_table(TableSpec("late", 4, 1), initial_rows=0))
    again = NodeCore(cfg, "source", tmp_path)
    assert again.store.table("emb").lookup(keys)[2].all()
    assert "late" not in again.store.tables
    again.close()


def test_corrupt_snapshot_refused_then_rebuild_sets_it_aside(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    core = NodeCore(cfg, "source", tmp_path)
    core.not_ready = None
    core.write("emb", np.array([1, 2]), np.ones((2, 4), np.float32))
    core.save_snapshot()
    core.close()
    snap = tmp_path / "data" / "source" / "store.snapshot"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=str(snap)):
        NodeCore(cfg, "source", tmp_path)
    rebuilt = NodeCore(cfg, "source", tmp_path, rebuild=True)
    assert rebuilt.store.table("emb").rows == 0
    assert list(snap.parent.glob("store.snapshot.set-aside-*"))
    rebuilt.close()


@pytest.mark.parametrize(
    ("byte", "flip"),
    [(100, 0xFF), (wal_format._HEADER.size + 3, 0x10)],
    ids=["payload", "length-past-the-end"],
)
def test_corrupt_log_record_refused_by_name(tmp_path: Path, byte: int, flip: int) -> None:
    """A damaged record with records after it stops the source, naming file and offset, and
    changes nothing; a flipped length bit (pointing past the end) once passed as a torn tail
    and the source started empty."""
    cfg = _config(tmp_path)
    _crash_after_writes(cfg, tmp_path)
    wal_dir = tmp_path / "data" / "source" / "wal"
    seg = sorted(wal_dir.glob("*.wal"))[-1]
    data = bytearray(seg.read_bytes())
    data[byte] ^= flip  # inside the first record, four more follow
    seg.write_bytes(bytes(data))
    with pytest.raises(WalError, match=rf"{seg.name}.*offset {wal_format._HEADER.size}"):
        NodeCore(cfg, "source", tmp_path)
    assert seg.read_bytes() == bytes(data) and not list(wal_dir.glob("*.torn"))


async def test_http_write_answered_after_fsync_and_503_while_recovering(tmp_path: Path) -> None:
    cfg = _config(tmp_path, wal_window_ms=2.0, recovery_timeout_s=0.2)  # no replica runs
    runner = NodeRunner(cfg, "source", tmp_path)
    port = runner.core.node.admin_port
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.ready.wait(), 30)
    wal = runner.core.journal.wal
    auth = ClusterAuth(runner.secret)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", auth=auth) as client:
        body = {"keys": [1, 2, 3], "values": [[1.0] * 4] * 3}
        r = await client.post("/v1/tables/emb/rows", json=body)
        assert r.status_code == 200, r.text
        assert wal.durable_seq == wal.last_seq  # answered only once its record was fsynced
        runner.core.not_ready = "recovering: test"
        r = await client.post("/v1/tables/emb/rows", json=body)
        assert r.status_code == 503 and "recovering" in r.json()["error"]
    runner.stop()
    await asyncio.wait_for(task, 30)


def test_a_failed_log_refuses_writes_until_a_snapshot_restarts_it(
    tmp_path: Path, monkeypatch
) -> None:
    from prometheus_client import generate_latest

    from ekko.node.metrics import node_registry
    from ekko.store import wal as wal_mod

    core = NodeCore(_config(tmp_path), "source", tmp_path)
    core.not_ready = None

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_mod.os, "fsync", broken)
    core.write("emb", np.array([1]), np.ones((1, 4), np.float32))
    with pytest.raises(WalError, match="No space left"):
        asyncio.run(core.wait_durable())  # the admin route answers this 503: not acknowledged
    with pytest.raises(NotReadyError, match="write-ahead log failed"):
        core.write("emb", np.array([2]), np.ones((1, 4), np.float32))
    assert core.store.table("emb").rows == 1  # the refused write changed nothing
    text = generate_latest(node_registry(core)).decode()
    assert 'ekko_wal_failed{dc="train",node="source",role="source"} 1.0' in text
    assert core.status()["wal"]["appended"] == 1
    assert "No space left" in core.down()["wal"]  # /ready answers 503 naming it
    # The disk has room again: the next snapshot restarts the log and the source recovers
    # (it used to refuse writes and answer /ready 503 until it was restarted).
    monkeypatch.undo()
    core.save_snapshot()
    assert core.down() == {}
    core.write("emb", np.array([2]), np.ones((1, 4), np.float32))
    asyncio.run(core.wait_durable())
    text = generate_latest(node_registry(core)).decode()
    assert 'ekko_wal_failed{dc="train",node="source",role="source"} 0.0' in text
    core.close()


async def test_a_created_table_survives_a_crash_without_snapshot(tmp_path: Path) -> None:
    """``POST /v1/tables`` answered 201 is as durable as an acknowledged write: the source
    crashing before any snapshot (and before any replica pulled the table) keeps it. It was
    lost: only row writes reached the write-ahead log."""
    from starlette.applications import Starlette

    from ekko.node.table_routes import table_routes

    cfg = _config(tmp_path)
    core = NodeCore(cfg, "source", tmp_path)
    core.not_ready = None
    app = Starlette(routes=table_routes(core, max_body=1 << 20))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/v1/tables", json={"name": "user/made", "dim": 8, "shards": 2})
        assert r.status_code == 201, r.text
    assert core.journal is not None
    core.journal.wal.close()  # SIGKILL: no snapshot, no close
    assert not (tmp_path / "data" / "source" / "store.snapshot").exists()
    again = NodeCore(cfg, "source", tmp_path)
    table = again.store.table("user/made")
    assert (table.dim, table.num_shards, table.rows) == (8, 2, 0)
    again.close()


def test_no_table_is_created_while_the_source_recovers(tmp_path: Path) -> None:
    core = NodeCore(_config(tmp_path), "source", tmp_path)
    with pytest.raises(NotReadyError, match="takes no writes yet: recovering"):
        asyncio.run(core.create_table(TableSpec("user/made", 8, 2), initial_rows=16))
    assert "user/made" not in core.store.tables
    core.close()


async def test_no_full_copy_while_the_source_recovers(tmp_path: Path) -> None:
    """A recovering source holds only part of its rows (it is still pulling them from its
    replicas), so ``GET /v1/snapshot`` then would hand a checkpoint replica, or ``ekko
    export``, a partial model as if whole: 503 naming the recovery instead (the checkpoint
    replica keeps its previous copy, export says to retry). It answered 200."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from ekko.node.admin import admin_routes

    core = NodeCore(_config(tmp_path), "source", tmp_path)
    app = Starlette(routes=admin_routes(core, CollectorRegistry()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/v1/snapshot")
        assert r.status_code == 503, r.status_code
        assert "gives no full copy yet: recovering" in r.json()["error"], r.text
        assert r.headers["retry-after"] == "1"
        core.not_ready = None
        r = await c.get("/v1/snapshot")
        assert r.status_code == 200 and r.content
    core.close()
