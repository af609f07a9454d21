"""A real source node, in this process (its own event loop on a thread), for the client's
tests: its HTTP port, its store (to check what a refused request left), its secret. (Not
named conftest: tests import ``Source`` from it, and ``conftest`` is another directory's
module when the whole suite runs.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ekko.client import Client, Credentials
from ekko.node.config import load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster

MAX_BODY = 1 << 20  # the rows routes' limit in these tests: small, to test it cheaply
TABLES = [("emb", 4, 4), ("dense/bottom.0.weight", 6, 1)]


@dataclass
class Source:
    runner: NodeRunner
    config: Path
    url: str
    secret: bytes

    def digests(self) -> dict[str, int]:
        return self.runner.core.store.digests()

    def client(self, **kwargs) -> Client:
        return Client.at(self.url, Credentials(secret=self.secret), **kwargs)


def source_node(
    tmp_path_factory: pytest.TempPathFactory, http: dict | None = None
) -> Iterator[Source]:
    """Run the source (``http``: its ``[http]`` settings beside the body limit) until the
    generator is closed."""
    doc = cluster_doc(dcs=1, replicas=1, tables=TABLES, sync={"snapshot_interval_s": 0})
    doc["durability"] = {"recovery_timeout_s": 0.2}  # run alone: no replica to recover from
    doc["http"] = {"max_body_bytes": MAX_BODY, **(http or {})}
    path = write_cluster(doc, tmp_path_factory.mktemp("client") / "cluster.toml")
    runner = NodeRunner(load_config(path), "source", path.parent)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(runner.run(),), daemon=True)
    thread.start()
    url = f"http://{runner.core.node.host}:{runner.core.node.admin_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert thread.is_alive(), "the source stopped while starting"
        assert time.monotonic() < deadline, "the source never became ready"
        time.sleep(0.05)  # polling a real process's port, bounded by the deadline
    yield Source(runner, path, url, runner.secret)
    loop.call_soon_threadsafe(runner.stop)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the source did not stop"
