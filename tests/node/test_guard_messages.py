"""Guard messages and the operator's rollback with hostile bodies: each is a 400 naming the
field, and no guard moves. Found by the HTTP fuzz: ``{"epoch": Infinity}`` (``json`` reads
``Infinity``, ``1e400`` too) was a 500 from ``int(inf)`` at a replica and at the source; a
corrupted report with ``"at": []`` a 500 from ``float([])``; a rollback ``to`` NaN passed the
"earliest restorable point" comparison (NaN compares false). The bodies are typed now
(``ekko.guard.routes``), every number finite, every count a non-negative int64."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from node_apps import cluster_config, node_app

from ekko.net.signed_requests import auth_headers
from ekko.node.config import load_config
from ekko.node.runner import NodeRunner

M = "/v1/models/ctr"
SOURCE_CASES = [
    ("/guard/report", '{"node": "dc1-r0", "epoch": Infinity}', "epoch: expected `int`"),
    ("/guard/report", '{"node": "dc1-r0", "epoch": 1e400}', "epoch: expected `int`"),
    ("/guard/report", '{"node": "dc1-r0", "epoch": -1}', "epoch: expected `int` >= 0"),
    ("/guard/report", '{"node": "dc1-r0", "state": "corrupted", "at": []}', "at: expected"),
    ("/guard/report", '{"node": "dc1-r0", "at": NaN}', "at: expected a finite number"),
    ("/guard/report", '{"node": ["dc1-r0"]}', "node: expected `str`"),
    ("/guard/report", "[]", "body: expected a JSON object"),
    ("/guard/report", "{}", 'missing required field `node` (expected {"node", '),
    (
        "/guard/report",
        '{"node": "dc1-r0", "state": "corupted"}',
        "state: 'corupted' is not a guard state (one of healthy, uncertain, corrupted, recovering)",
    ),
    (
        "/guard/restored",
        '{"node": "dc1-r0", "digests": {"t": "nothex"}}',
        "digests.t: 'nothex' is not a digest (16 lowercase hex digits",
    ),
    ("/guard/restored", '{"node": "dc1-r0", "at": "x"}', "at: expected"),
    ("/guard/restored", '{"node": {}}', "node: expected `str`"),
    ("/rollback", '{"to": NaN}', "to: expected a finite number"),
    ("/rollback", '{"to": -Infinity}', "to: expected a finite number"),
    ("/rollback", '{"to": 1e999}', "to: expected a finite number"),
    ("/rollback", '{"why": 5}', "why: expected `str`, got `int`"),
    ("/rollback", '{"ot": 1}', "unknown field `ot`"),
]
REPLICA_CASES = [
    ("/guard/redirect", '{"epoch": Infinity}', "epoch: expected `int | null`, got `float`"),
    ("/guard/redirect", '{"epoch": "1"}', "epoch: expected `int | null`, got `str`"),
    ("/guard/redirect", '{"automatic": "yes"}', "automatic: expected `bool`"),
    ("/guard/rolled_back", '{"healthy_wall": NaN, "watermark": {}}', "healthy_wall: expected a"),
    (
        "/guard/rolled_back",
        '{"healthy_wall": 1, "watermark": {"t": [[1.5]]}}',
        "watermark[...][0][0]: expected `int`",
    ),
    ("/guard/rolled_back", '{"healthy_wall": 1}', "missing required field `watermark`"),
]


async def _refused(client: httpx.AsyncClient, host: str, role: str, cases: list) -> None:
    secret = client.secret  # type: ignore[attr-defined]
    for path, body, needle in cases:
        raw = body.encode()
        headers = auth_headers(secret, role, "POST", M + path, raw, host=host)
        r = await client.post(M + path, content=raw, headers=headers)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        assert needle in r.json()["error"], (path, body, r.text)


async def test_hostile_guard_messages_are_400_naming_the_field_and_nothing_moves(
    tmp_path: Path,
) -> None:
    config = cluster_config(tmp_path)
    cfg = load_config(config)
    runner = NodeRunner(cfg, "source", tmp_path)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.ready.wait(), 60)
    node = cfg.node("source")
    host = f"{node.host}:{node.admin_port}"
    try:
        async with httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as client:
            client.secret = runner.secret  # type: ignore[attr-defined]
            await _refused(client, host, "node", [c for c in SOURCE_CASES if "guard" in c[0]])
            await _refused(
                client, host, "operator", [c for c in SOURCE_CASES if "guard" not in c[0]]
            )
            guard = runner.models.source_guards["ctr"]
            assert guard.incident is None and not guard.incidents
            assert str(guard.health.state) == "healthy" and guard.reports == {}
            # A well-formed report is still taken, its untyped fields kept as sent.
            doc = {"node": "dc1-r0", "state": "healthy", "judging": "judging", "epoch": 0,
                   "at": time.time(), "score": None}  # fmt: skip
            raw = json.dumps(doc).encode()
            path = M + "/guard/report"
            headers = auth_headers(runner.secret, "node", "POST", path, raw, host=host)
            r = await client.post(path, content=raw, headers=headers)
            assert r.status_code == 200, r.text
            assert guard.reports["dc1-r0"]["judging"] == "judging"
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)

    replica = node_app(config, "dc1-r0")
    transport = httpx.ASGITransport(app=replica)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        client.secret = runner.secret  # type: ignore[attr-defined]
        await _refused(client, "test", "node", REPLICA_CASES)
