"""The HTTP apps of a small cluster's nodes, built in-process without running them.

A node's route table is fixed when its ``NodeWeb`` is built (its models, trainers and guards
are known from the config), so these apps mount exactly what a running node mounts: the
source (model trained, guard on), a serving replica and a checkpoint replica.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from ekko.node.config import load_config
from ekko.node.runner import NodeRunner
from ekko.node.web import NodeWeb
from ekko.ops.cluster_init import cluster_doc, write_cluster

MODEL = {"name": "ctr", "rows_per_table": 200, "embedding_dim": 4, "num_sparse": 2}
NODES = ("source", "dc1-r0", "ckpt-r0")


def cluster_config(tmp: Path) -> Path:
    """A source training ``ctr`` with the guard on, a serving replica, a checkpoint replica."""
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], checkpoint_every_s=300.0,
                      tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = {"enabled": True}
    doc["durability"] = {"recovery_timeout_s": 0.5}  # run alone: no replica to recover from
    return write_cluster(doc, tmp / "cluster.toml")


def node_app(config: Path, name: str) -> Starlette:
    """``name``'s HTTP app, as its runner would serve it."""
    cfg = load_config(config)
    runner = NodeRunner(cfg, name, config.parent)
    refresh = runner.refresher.routes() if runner.refresher is not None else []
    web = NodeWeb(
        runner.core, runner.models, runner.supervisor, runner.secret,
        routes=refresh, collectors=[], status=dict,
        started=lambda: True, stopping=lambda: False,
    )  # fmt: skip
    return web.app
