from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator:
    clusters: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        doc = cluster_doc(**kwargs)
        path = write_cluster(doc, tmp_path / f"c{len(clusters)}" / "cluster.toml")
        cluster = LocalCluster(path)
        clusters.append(cluster)
        return cluster

    yield make
    for c in clusters:
        c.stop_all()
