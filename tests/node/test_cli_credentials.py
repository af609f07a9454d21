"""``ekko cluster keys`` and ``ekko sign``: credentials an operator can use from a shell."""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from ekko.cli import app as cli
from ekko.node.admin import admin_app
from ekko.ops.cluster_init import cluster_doc, write_cluster


async def _ok(request: Request) -> Response:
    return JSONResponse({"body": (await request.body()).decode()})


async def test_signed_from_the_shell_and_a_role_key_file(tmp_path: Path) -> None:
    config = write_cluster(cluster_doc(dcs=1, replicas=1), tmp_path / "cluster.toml")
    secret = (tmp_path / "cluster.secret").read_bytes().strip()
    routes = [Route("/v1/status", _ok), Route("/v1/snapshot", _ok),
              Route("/v1/tables/{table:path}/rows", _ok, methods=["POST"])]  # fmt: skip
    transport = httpx.ASGITransport(app=admin_app(routes, secret))
    runner = CliRunner()

    def sign(*args: str) -> dict[str, str]:
        res = runner.invoke(cli, ["sign", *args, "--config", str(config)])
        assert res.exit_code == 0, res.output
        name, value = res.stdout.strip().split(": ", 1)
        return {name: value}

    body = tmp_path / "body.json"
    body.write_bytes(b'{"keys": [1]}')
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/v1/status", headers=sign("GET", "http://t/v1/status"))
        assert r.status_code == 200, r.text
        h = sign("POST", "http://t/v1/tables/emb/rows", "--data", str(body))
        assert "role=writer" in h["x-ekko-signature"]
        r = await c.post("/v1/tables/emb/rows", content=body.read_bytes(), headers=h)
        assert r.status_code == 200 and r.json() == {"body": '{"keys": [1]}'}
        # a table named dense/x, its slash escaped: signed as the node reads the path
        url = "http://t/v1/tables/dense%2Fx/rows?v=1"
        h = sign("POST", url, "--data", str(body))
        r = await c.post(url, content=body.read_bytes(), headers=h)
        assert r.status_code == 200, r.text
        res = runner.invoke(
            cli, ["cluster", "keys", "--config", str(config), "--out", str(tmp_path / "k")]
        )
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
            "operator.key", "reader.key", "writer.key"]  # fmt: skip
        assert (tmp_path / "k" / "writer.key").stat().st_mode & 0o077 == 0
        writer = str(tmp_path / "k" / "writer.key")
        h = sign("GET", "http://t/v1/snapshot", "--role", "writer", "--key", writer)
        r = await c.get("/v1/snapshot", headers=h)
        assert r.status_code == 403  # a writer's key signs as writer only
        h = sign("GET", "http://t/v1/snapshot", "--role", "operator", "--key", writer)
        r = await c.get("/v1/snapshot", headers=h)
        assert r.status_code == 401 and "does not match" in r.json()["error"]
