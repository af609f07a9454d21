"""A new cluster config in an old data dir (issue 16): the source once restored the old
cluster's tables and rows under the new config without a word. Now the data dir records the
config's ``[cluster] id`` and a node refuses another's, naming the dir and the way out;
``--fresh`` sets the old dir aside (kept) and starts clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ekko.node.config import ClusterConfig, load_config
from ekko.node.core import NodeCore
from ekko.node.data_dir import DataDirMismatch, claim_data_dir
from ekko.ops.cluster_init import cluster_doc, new_cluster_id, write_cluster


def _config(tmp_path: Path, table: str, cluster_id: str | None) -> ClusterConfig:
    doc = cluster_doc(dcs=1, replicas=1, tables=[(table, 4, 2)], cluster_id=cluster_id,
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    return load_config(write_cluster(doc, tmp_path / "cluster.toml"))


def _old_cluster(tmp_path: Path) -> str:
    """A source of cluster A that wrote rows to table ``old`` and stopped cleanly."""
    cid = new_cluster_id()
    core = NodeCore(_config(tmp_path, "old", cid), "source", tmp_path)
    core.not_ready = None
    core.write("old", np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32))
    core.save_snapshot()
    core.close()
    return cid


def test_a_new_config_in_an_old_data_dir_is_refused_naming_the_dir_and_the_way_out(
    tmp_path: Path,
) -> None:
    old = _old_cluster(tmp_path)
    new = new_cluster_id()
    with pytest.raises(DataDirMismatch) as err:
        NodeCore(_config(tmp_path, "new", new), "source", tmp_path)
    data = tmp_path / "data" / "source"
    assert str(err.value) == (
        f"data dir {data} holds the data of another cluster (cluster id {old}; this config's "
        f"id is {new}), its tables and rows included; start with --fresh to set it aside and "
        "start clean (it is kept, renamed), or give this config another [cluster] data_dir"
    )
    assert (data / "store.snapshot").exists()  # nothing touched
    # the same cluster's config, edited (a new table), still opens its own data
    again = NodeCore(_config(tmp_path, "new", old), "source", tmp_path)
    assert set(again.store.tables) == {"old", "new"} and again.store.table("old").rows == 10
    again.close()


def test_fresh_sets_the_old_data_aside_and_starts_clean(tmp_path: Path) -> None:
    _old_cluster(tmp_path)
    new = new_cluster_id()
    core = NodeCore(_config(tmp_path, "new", new), "source", tmp_path, fresh=True)
    assert set(core.store.tables) == {"new"}  # nothing of the old cluster
    core.close()
    aside = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("source.set-aside-")]
    assert len(aside) == 1 and (aside[0] / "store.snapshot").exists()  # kept, not deleted
    assert (tmp_path / "data" / "source" / "cluster-id").read_text().strip() == new


def test_data_from_before_ids_is_refused_by_a_config_with_one_and_not_by_one_without(
    tmp_path: Path,
) -> None:
    data = tmp_path / "source"
    data.mkdir()
    (data / "store.snapshot").write_bytes(b"old")
    assert claim_data_dir(data, None) is None  # a hand-written config: not checked
    with pytest.raises(DataDirMismatch, match="a cluster from before cluster ids"):
        claim_data_dir(data, "abc")
    claim_data_dir(tmp_path / "empty", "abc")  # nothing there: claimed
    assert (tmp_path / "empty" / "cluster-id").read_text() == "abc\n"
    claim_data_dir(tmp_path / "empty", "abc")  # its own: fine
    claim_data_dir(tmp_path / "empty", "xyz")  # only another's marker, no data: claimed
    assert (tmp_path / "empty" / "cluster-id").read_text() == "xyz\n"
