"""``Client.from_config`` reads the cluster config without the node package, and finds
the same nodes the node's own config does: the source for writes, a replica for reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ekko.client import Client, ConfigError
from ekko.client.cluster import ClusterFile
from ekko.node.config import load_config
from ekko.node.http_client import ClusterHttp
from ekko.ops.cluster_init import cluster_doc, write_cluster


@pytest.mark.parametrize("tls", [False, True])
def test_the_client_finds_the_nodes_the_node_config_names(tmp_path: Path, tls: bool) -> None:
    doc = cluster_doc(dcs=2, replicas=2, checkpoint_every_s=60.0, tls=tls)
    doc["dcs"] = doc["dcs"][1:] + doc["dcs"][:1]  # the training DC need not come first
    path = write_cluster(doc, tmp_path / "cluster.toml")
    cfg = load_config(path)
    http = ClusterHttp(cfg, path.parent)
    mine = ClusterFile.read(path)
    assert mine.source == cfg.source.name
    for n in cfg.nodes:
        assert mine.nodes[n.name].url == http.url(n.name)
        role = cfg.role(n.name)
        assert mine.roles[n.name] == {"leader": "replica", "follower": "replica"}.get(role, role)
    assert mine.roles[mine.replica()] == "replica"
    assert (
        mine.secret_file.read_bytes().strip()
        == path.parent.joinpath("cluster.secret").read_bytes().strip()
    )
    with Client.from_config(path, node=cfg.nodes[-1].name) as c:
        assert c.target.writes.url == http.url(cfg.source.name)
        assert c.target.reads.url == http.url(cfg.nodes[-1].name)
        assert c.target.tls is tls


def test_a_config_the_client_cannot_use_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        ClusterFile.read(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[dcs]]\nname = "a"\n[[nodes]]\nname = "n"\ndc = "a"\nadmin_port = 1\n')
    with pytest.raises(ConfigError, match="no source"):
        ClusterFile.read(bad)
    path = write_cluster(cluster_doc(dcs=1, replicas=1), tmp_path / "ok.toml")
    with pytest.raises(ConfigError, match="unknown node 'nope'"):
        Client.from_config(path, node="nope")
