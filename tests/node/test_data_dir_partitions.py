"""A source's data dir records the partitions it is the source of, and a config that makes it
the source of a partition its dir never held is refused (attack2's find: the partition began
empty under this source's history and every replica dropped its 500 rows of it, silently)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ekko.node.config import ClusterConfig, load_config
from ekko.node.core import NodeCore
from ekko.node.data_dir import SOURCED, DataDirMismatch
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store import shard_of


def _config(tmp_path: Path, p1_holds: list[int]) -> ClusterConfig:
    """Sources source-p0 (partition 0, unless source-p1 takes it) and source-p1."""
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, tables=[("emb", 4, 4)],
                      cluster_id="c1", sync={"snapshot_interval_s": 0})  # fmt: skip
    src = next(n for n in doc["nodes"] if n["name"] == "source-p1")
    src["partitions"] = p1_holds
    if 0 in p1_holds:
        doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "source-p0"]
    return load_config(write_cluster(doc, tmp_path / "cluster.toml"))


def _write_p1(tmp_path: Path) -> Path:
    core = NodeCore(_config(tmp_path, [1]), "source-p1", tmp_path)
    core.not_ready = None
    keys = np.arange(200, dtype=np.int64)
    parts = core.config.placement().partitions_of("emb", 4)[shard_of(keys, 4)]
    mine = keys[parts == 1]
    core.write("emb", mine, np.ones((mine.size, 4), np.float32))
    core.save_snapshot()
    core.close()
    return tmp_path / "data" / "source-p1"


def test_a_source_given_a_partition_its_dir_never_held_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    data = _write_p1(tmp_path)
    assert (data / SOURCED).read_text() == "1\n"
    with pytest.raises(DataDirMismatch) as err:
        NodeCore(_config(tmp_path, [0, 1]), "source-p1", tmp_path)
    assert str(err.value) == (
        f"data dir {data} holds this source's rows of partitions [1]; the config makes it the "
        "source of partitions [0] too, which it never held: started so, [0] would begin empty "
        "under this source's history and every replica would drop its rows of them. Keep [0] "
        "at the source that held them, or move their rows first"
    )
    assert (data / SOURCED).read_text() == "1\n" and (data / "store.snapshot").exists()


def test_the_same_partitions_restart_and_a_dir_from_before_the_record_is_taken(
    tmp_path: Path,
) -> None:
    data = _write_p1(tmp_path)
    again = NodeCore(_config(tmp_path, [1]), "source-p1", tmp_path)
    assert again.store.table("emb").rows > 0
    again.close()
    (data / SOURCED).unlink()  # written before sources recorded their partitions
    again = NodeCore(_config(tmp_path, [1]), "source-p1", tmp_path)
    again.close()
    assert (data / SOURCED).read_text() == "1\n"


def test_fresh_sets_the_dir_aside_and_takes_the_new_partitions(tmp_path: Path) -> None:
    data = _write_p1(tmp_path)
    core = NodeCore(_config(tmp_path, [0, 1]), "source-p1", tmp_path, fresh=True)
    core.close()
    assert (data / SOURCED).read_text() == "0 1\n"
    assert list(tmp_path.glob("data/source-p1.set-aside-*"))  # the old rows kept
