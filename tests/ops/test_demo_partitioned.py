"""``ekko demo --partitions P``: its cluster (a source per partition, a serving holder of each
partition per DC, the model hashed and trained with Adagrad, the guard on, no checkpoint
replica), what it refuses by name before anything starts, and the AUC phases its summary
gives of a poison run. The run itself: tests/integration/test_partitioned_demo_poison.py and
README "What `make demo` shows"."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ekko.cli import app
from ekko.demo.partitioned import ShardedFeed
from ekko.demo.report import auc_phases
from ekko.demo.setup import DemoSpec, cluster_config
from ekko.node.config import load_config

runner = CliRunner()


def test_the_partitioned_demo_cluster(tmp_path: Path) -> None:
    cfg = load_config(cluster_config(DemoSpec(partitions=2).validate(), tmp_path))
    assert cfg.cluster.partitions == 2 and DemoSpec(partitions=2).ranks == 2
    assert [s.name for s in cfg.sources] == ["source-p0", "source-p1"]
    serving = [n.name for n in cfg.nodes if n.serve]
    assert serving == [f"dc{i}-p{p}-r0" for i in (1, 2, 3) for p in (0, 1)]
    assert all(n.refresh == "sync" for n in cfg.nodes) and cfg.guard.enabled
    model = cfg.model("ctr")
    assert model.optimizer == "adagrad" and model.row_budget is None  # what the ranks train
    assert model.baseline_lag_s == DemoSpec().baseline_lag_s
    spec = DemoSpec(partitions=2, poison_at_s=30.0, guard=False).validate()  # a poison is fine
    assert not load_config(cluster_config(spec, tmp_path / "off")).guard.enabled
    assert load_config(cluster_config(DemoSpec(), tmp_path / "one")).cluster.partitions == 1


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (["--partitions", "2", "--checkpoint-every", "5"], "--checkpoint-every: the checkpoint"),
        (["--partitions", "0"], "--partitions must be an integer in 1..16, got 0"),
    ],
)
def test_the_partitioned_demo_refuses_what_it_lacks(
    bad: list[str], named: str, tmp_path: Path
) -> None:
    res = runner.invoke(app, ["demo", *bad, "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 2
    assert named in " ".join(res.output.split()).replace("│ ", "").replace(" │", ""), res.output
    assert not (tmp_path / "w").exists()  # nothing started


def test_the_feed_stops_waiting_on_a_full_queue_once_a_rank_died() -> None:
    full: queue.Queue = queue.Queue(maxsize=1)
    full.put("batch")
    feed = SimpleNamespace(run=SimpleNamespace(dead={}))
    threading.Timer(0.3, lambda: feed.run.dead.update({1: "(pid 1) killed"})).start()
    assert ShardedFeed._put(feed, full, "next") is False  # type: ignore[arg-type]
    assert ShardedFeed._put(SimpleNamespace(run=SimpleNamespace(dead={})), queue.Queue(), 1)  # type: ignore[arg-type]


def test_the_auc_phases_of_a_poison_run_split_at_its_start_and_the_restore() -> None:
    points = [(5, 0.8, 0.9), (10, 0.7, None), (15, 0.6, 0.6), (20, 0.5, 0.7), (25, 0.4, 0.4)]
    timeline = [{"t": t, "auc": {"a": a, "b": b, "ckpt": 0.1}} for t, a, b in points]
    marks = {"poison": [6.0, 9.0], "restored": [1.0, 14.0, 18.0]}  # 1.0: an earlier incident
    phases = auc_phases(timeline, marks, ["a", "b"])
    # (10, 15] overlaps the incident (6 to 14): during; (15, 20] and (20, 25] after
    assert phases == pytest.approx({"before": 0.85, "during": 0.65, "after": 0.5})
    assert auc_phases(timeline, {"poison": None}, ["a"]) is None  # no poison, no phases
    never = auc_phases(timeline, {"poison": [6.0, 9.0], "restored": []}, ["a"])
    assert never == pytest.approx({"before": 0.8, "during": 0.55, "after": None})
