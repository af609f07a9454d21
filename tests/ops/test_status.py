"""``ekko status`` against running nodes: a row per node with its role, DC, rows and lag, a
node that is down as a row saying so, and ``--watch`` printing a frame per interval when its
output is not a terminal (``--json``: one document per frame)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from ekko.cli import app
from ekko.node.access import ClusterAuth
from ekko.node.config import load_config
from ekko.node.http_client import ClusterHttp
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.status import frame, read_all, render

ROWS = 40


async def _until(cond, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_status_lists_every_node_and_one_that_is_down(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=2, tables=[("emb", 4, 2)],
                      sync={"snapshot_interval_s": 0, "failover_probe_s": 0.2})  # fmt: skip
    doc["durability"] = {"recovery_timeout_s": 0.5}  # dc1-r1 never starts
    path = write_cluster(doc, tmp_path / "cluster.toml")
    cfg = load_config(path)
    source, replica = NodeRunner(cfg, "source", tmp_path), NodeRunner(cfg, "dc1-r0", tmp_path)
    assert replica.lag_probe is not None
    replica.lag_probe.interval_s = 0.05
    tasks = [asyncio.create_task(r.run()) for r in (replica, source)]
    try:
        for r in (source, replica):
            await asyncio.wait_for(r.ready.wait(), 30)
        source.core.write("emb", np.arange(ROWS), np.ones((ROWS, 4), np.float32))
        table = lambda: replica.core.store.tables.get("emb")  # noqa: E731
        await _until(lambda: table() is not None and table().rows == ROWS, "replicated")

        def lag_seen() -> bool:
            lag = replica._status_extra()["replica_lag"]["tables"]
            return lag.get("emb") == {"versions": 0, "seconds": 0.0}

        await _until(lag_seen, "lag probed")
        http = ClusterHttp(cfg, tmp_path)
        secret = (tmp_path / "cluster.secret").read_bytes().strip()

        def one_frame():
            return frame(cfg, lambda: read_all(cfg, http, ClusterAuth(secret), 5.0), 0.2)

        rows = {r.node: r for r in await asyncio.to_thread(one_frame)}
        assert list(rows) == ["source", "dc1-r0", "dc1-r1"]
        src, rep, down = rows["source"], rows["dc1-r0"], rows["dc1-r1"]
        assert (src.role, src.dc, src.rows, src.lag_versions, src.state) == (
            "source",
            "train",
            ROWS,
            0,
            "ready",
        )
        assert (rep.role, rep.dc, rep.upstream, rep.rows) == ("leader", "dc1", "source", ROWS)
        assert (rep.lag_versions, rep.lag_seconds, rep.partitions) == (0, 0.0, "all")
        assert rep.in_bytes_per_s is not None and rep.in_bytes_per_s >= 0
        assert down.state == "unreachable"
        assert down.error is not None and down.error.startswith("unreachable (ConnectError")
        assert (down.role, down.dc, down.rows, down.lag_versions) == ("follower", "dc1", None, None)
        render(list(rows.values()), "t")  # a down node renders (no None formatted as a number)

        cli = CliRunner()
        args = ["status", "--config", str(path), "--interval", "0.1"]
        out = await asyncio.to_thread(cli.invoke, app, [*args, "--json", "--watch", "--count", "2"])
        assert out.exit_code == 0, out.output
        docs = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(docs) == 2
        assert [n["node"] for n in docs[1]["nodes"]] == ["source", "dc1-r0", "dc1-r1"]
        assert docs[1]["nodes"][1]["rows"] == ROWS
        out = await asyncio.to_thread(cli.invoke, app, [*args, "--json"])
        assert out.exit_code == 1, out.output  # one frame; a node did not answer
        assert json.loads(out.stdout)["nodes"][2]["state"] == "unreachable"
        out = await asyncio.to_thread(cli.invoke, app, [*args, "--watch", "--count", "2"])
        assert out.exit_code == 0, out.output
        assert out.stdout.count("ekko-local ·") == 2  # a frame per interval, not a live view
        assert "dc1-r1: unreachable (ConnectError" in out.stdout  # the reason, on a line
    finally:
        for r in (source, replica):
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


def test_a_node_with_a_task_down_reads_down_naming_it_not_starting() -> None:
    from ekko.ops.status import _state

    assert _state({"ready": True, "down": {}}) == "ready"
    assert _state({}) == "ready"  # a node from before readiness was in /v1/status
    down = {"upstream": "ValueError: budget", "driver/purge": "OSError"}
    assert _state({"ready": False, "down": down, "why": "down: ..."}) == (
        "down: driver/purge, upstream"
    )
    assert _state({"ready": False, "down": {}, "why": "starting"}) == "starting"
    assert _state({"ready": False, "down": "junk"}) == "starting"  # a hostile answer
    for not_true in ("false", "true", 1, [], None):  # only JSON true is ready
        assert _state({"ready": not_true, "down": {}}) == "starting", not_true


def test_a_stopping_node_reads_stopping_not_starting() -> None:
    from ekko.ops.status import _state

    assert _state({"ready": False, "down": {}, "why": "stopping"}) == "stopping"
    assert _state({"ready": False, "down": {}, "why": ["stopping"]}) == "starting"  # hostile


def test_text_from_a_node_renders_as_is_never_as_markup(tmp_path: Path) -> None:
    """Whatever a node answers (task names in ``down``, its dc, an HTTP error body) is shown
    as text: ``[/v1/status]`` read as a closing markup tag crashed the whole table
    (MarkupError, no node shown) and ``[bold]`` vanished into styling."""
    from rich.console import Console

    from ekko.ops.status import node_row

    cfg = load_config(write_cluster(cluster_doc(dcs=1, replicas=1), tmp_path / "cluster.toml"))
    hostile = {"ready": False, "down": {"[/v1/status]": "x", "[bold]task": "y"}, "dc": "[/]"}
    rows = [
        node_row(cfg, "source", "unreachable", hostile, 1.0),
        node_row(cfg, "dc1-r0", "x", "HTTP 503: proxy could not reach [/v1/status]", 1.0),
    ]
    console = Console(width=400, record=True)
    console.print(render(rows, "[red]ekko-local"))
    text = console.export_text()
    assert "down: [/v1/status], [bold]task" in text and "[/]" in text
    assert "dc1-r0: HTTP 503: proxy could not reach [/v1/status]" in text
