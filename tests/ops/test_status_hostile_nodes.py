"""``ekko status`` against nodes that answer badly: one dripping its answer a byte at a
time, one stalled after accepting the connection, one answering a JSON list, one a status
whose fields have the wrong types. Each is a row naming what went wrong (``bad answer``, or
no whole answer within the timeout), the command ends, and the nodes are read at once, so
one slow node does not make a frame wait for each of the others in turn."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from typer.testing import CliRunner

from ekko.cli import app
from ekko.node.config import load_config
from ekko.ops.cluster_init import cluster_doc, write_cluster

STATUS_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"


def _answer(body: bytes) -> bytes:
    return STATUS_HEAD % len(body) + body


async def _serve(port: int, behaviour: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if behaviour == "drip":  # a valid answer, a byte every 0.2 s: never a read timeout
                for b in _answer(b'{"role": "leader"' + b" " * 10_000 + b"}"):
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(0.2)
            elif behaviour == "stall":
                await asyncio.Event().wait()
            elif behaviour == "list":
                writer.write(_answer(b"[1, 2]"))
            elif behaviour == "wrong types":
                doc = {"role": "leader", "tables": {"emb": {"rows": "many"}}}
                writer.write(_answer(json.dumps(doc).encode()))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_status_names_each_node_that_answers_badly_and_ends(tmp_path: Path) -> None:
    path = write_cluster(cluster_doc(dcs=1, replicas=3), tmp_path / "cluster.toml")
    cfg = load_config(path)
    kinds = dict(zip([n.name for n in cfg.nodes], ["drip", "stall", "list", "wrong types"],
                     strict=True))  # fmt: skip
    servers = [await _serve(cfg.node(n).admin_port, k) for n, k in kinds.items()]
    try:
        args = ["status", "--config", str(path), "--json", "--interval", "0.5"]
        t0 = time.monotonic()
        out = await asyncio.wait_for(asyncio.to_thread(CliRunner().invoke, app, args), 20)
        took = time.monotonic() - t0
    finally:
        for s in servers:
            s.close()
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert out.exit_code == 1, out.output  # some node did not answer
    rows = {r["node"]: r for r in json.loads(out.stdout)["nodes"]}
    for name in ("source", "dc1-r0"):  # dripping, stalled: no whole answer in time
        assert rows[name]["state"] == "unreachable", rows[name]
        assert rows[name]["error"] == "unreachable (no whole answer within 2 s)"
    assert rows["dc1-r1"]["state"] == "bad answer"
    assert rows["dc1-r1"]["error"] == "bad answer: a JSON list, not a status document"
    assert rows["dc1-r2"]["state"] == "bad answer"
    assert "not a node's status (ValueError" in rows["dc1-r2"]["error"]
    # Two reads of 2 s at most (all nodes at once) and the interval between them.
    assert took < 8.0, took
