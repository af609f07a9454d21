"""Sharded training on a 2-partition cluster of real processes (issue 17): two rank processes
fed batches as ``ekko demo --partitions 2`` feeds them (``feed_rank``) each publish the rows of
their partition to its source over binary write streams, rank 0 the dense tensors to the
partitions holding them; the run learns as the 1-rank trainer does (AUC within 0.003), every
holder of a partition holds exactly the owning rank's weights, and the sources, declaring the
model in [[models]], start no in-node trainer (it would write every partition's rows to one
source) and say so in their status."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_checks import digests, until

from ekko.client.base import Target
from ekko.client.credentials import Credentials
from ekko.client.sync import Client
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.quality.offline import auc
from ekko.train.dlrm import DLRM, DLRMConfig, dense_table_name, embedding_table_name
from ekko.train.sharded_feed import FeedSpec, feed_rank
from ekko.train.sharded_launch import ShardedRun
from ekko.train.sharded_publish import PartitionSources
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig

pytestmark = pytest.mark.integration

STREAM = StreamConfig(seed=5, max_vocab=5_000, initial_items=2_000)
MODEL = {"name": "ctr", "rows_per_table": 4_000, "embedding_dim": 8, "bottom_mlp": [16, 8],
         "top_mlp": [16, 1], "optimizer": "adagrad"}  # fmt: skip
DLRM_CONFIG = DLRMConfig(rows_per_table=4_000, embedding_dim=8, bottom_mlp=(16, 8),
                         top_mlp=(16, 1))  # fmt: skip
EVENTS, BATCH = 16_384, 1024
ADAGRAD = TrainerConfig("adagrad", sparse_lr=0.05, dense_lr=0.01)  # learns in 16 steps
torch.set_num_threads(1)  # the 1-rank reference runs beside the two ranks on a shared machine


def _one_rank_auc() -> float:
    trainer = OnlineTrainer(DLRM(DLRM_CONFIG), ADAGRAD)
    preds, labels = [], []
    for events in itertools.islice(SyntheticStream(STREAM).batches(BATCH), EVENTS // BATCH):
        preds.append(trainer.step(events).predictions)
        labels.append(events.labels)
    return auc(np.concatenate(labels), np.concatenate(preds))


def test_two_ranks_publish_each_partition_to_its_source(tmp_path: Path):
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, wan_delay_ms=[5], models=[MODEL],
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    path = write_cluster(doc, tmp_path / "cluster.toml")
    with LocalCluster(path) as cluster:
        cluster.start()
        cfg = cluster.config
        sources = {p: cfg.source_of(p).name for p in range(2)}
        spec = FeedSpec(DLRM_CONFIG, cfg.placement(), PartitionSources(path, sources), ADAGRAD)
        spawn = mp.get_context("spawn")
        queues, results = [spawn.Queue(), spawn.Queue()], spawn.Queue()
        batches = list(itertools.islice(SyntheticStream(STREAM).batches(BATCH), EVENTS // BATCH))
        with ShardedRun(feed_rank, 2, (spec, queues, results), timeout_s=60) as run:
            for batch in [*batches, None]:
                for q in queues:
                    q.put(batch)
            auc_one = _one_rank_auc()  # while the ranks start
            steps = [results.get(timeout=60) for _ in range(2 * len(batches))]
            reports = run.join(timeout_s=60)
        assert [(r.partitions, r.steps) for r in reports] == [([0], 16), ([1], 16)]
        labels = np.concatenate([s.labels for s in steps])
        auc_two = auc(labels, np.concatenate([s.predictions for s in steps]))
        assert labels.size == EVENTS and auc_one > 0.6  # the model learns the stream
        assert abs(auc_one - auc_two) <= 0.003, (auc_one, auc_two)

        holders = {p: [sources[p], f"dc1-p{p}-r0"] for p in range(2)}
        until(
            "each partition's replica equal to its source",
            lambda: all(digests(cluster, h[1]) == digests(cluster, h[0]) for h in holders.values()),
            20.0,
        )
        creds = Credentials.from_secret_file(tmp_path / "cluster.secret")
        dense = {dense_table_name(k): v.reshape(-1) for k, v in reports[0].dense.items()}
        placement = cfg.placement()
        for p, names in holders.items():
            owner = reports[p]  # partition p belongs to rank p % 2
            for name in names:
                url = cluster.url(name, "")
                with Client(Target.at(url, creds)) as client:
                    tables = {
                        embedding_table_name(i): owner.owned_keys[i] for i in range(26)
                    }  # every key the rank owns, trained or not
                    got = client.lookup_many(tables)
                    for i in range(26):
                        rows = got[embedding_table_name(i)]
                        found = np.asarray(rows.found, dtype=bool)
                        assert found.any(), (name, i)
                        np.testing.assert_array_equal(
                            np.asarray(rows.values)[found], owner.owned_rows[i][found]
                        )
                    mine = {t: np.zeros(1, np.int64) for t in dense
                            if placement.partition_of(t, 0) == p}  # fmt: skip
                    for t, rows in client.lookup_many(mine).items():
                        np.testing.assert_array_equal(np.asarray(rows.values)[0], dense[t])
                status = cluster.get(name, "/v1/status")
                assert set(dense) <= set(status["tables"]), f"{name} lacks a dense table's spec"
        for p in range(2):  # the sources declare [[models]] and start no trainer
            status = cluster.get(sources[p], "/v1/status")
            assert "training" not in status
            assert (
                "not trained in-node: the cluster has 2 partitions" in (status["in_node_training"])
            )
